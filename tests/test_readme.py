"""The README's promises: it opens with the two commands, CI runs the same test command, exit codes match."""

from __future__ import annotations

from pathlib import Path

import pytest

from gallery.errors import exit_code_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_opens_with_a_title_a_paragraph_and_exactly_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == ""
    fence = lines.index("```bash")
    paragraph = lines[2 : fence - 1]
    assert paragraph and all(
        line.strip() and not line.startswith(("#", "```", "|", "-")) for line in paragraph
    )
    assert lines[fence - 1] == "" and lines[fence + 3] == "```"
    assert lines[fence + 1].startswith("./run demo") and lines[fence + 2].startswith("./run test")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run test" in ci


def test_exit_code_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- exit-codes")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- /exit-codes -->")].strip()
    assert table == exit_code_table()


def _block(readme: str, marker: str) -> str:
    start = readme.index(f"<!-- {marker}")
    return readme[readme.index("\n", start) + 1 : readme.index(f"<!-- /{marker} -->")].strip()


def test_load_option_and_fault_tables_match_the_code() -> None:
    from runtime.faults import faults_table
    from runtime.load_options import options_table

    readme = (ROOT / "README.md").read_text()
    assert _block(readme, "load-options") == options_table()
    assert _block(readme, "faults") == faults_table()


def _first_five_minutes() -> list[list[str]]:
    import shlex

    block = _block((ROOT / "README.md").read_text(), "first-five-minutes")
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("gallery ")]
    return [shlex.split(command) for command in commands]


@pytest.mark.mlx
def test_first_five_minutes_run_as_written(hub_factory, smollm2_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The README's walk-through, command by command, against the loopback hub serving the real SmolLM2."""
    import shutil

    import grpc
    import pexpect

    from runtime.proto import backend_pb2, backend_pb2_grpc
    from tests.terminal_support import gallery, spawn, user_env

    commands = _first_five_minutes()
    assert [c[1] for c in commands] == ["pull", "ls", "chat", "serve"]
    repo = tmp_path / "repo"
    shutil.copytree(smollm2_model, repo, ignore=shutil.ignore_patterns("fixture.json", ".*"))
    hub = hub_factory(extra_repos={commands[0][2]: repo})
    env, work = user_env(tmp_path / "home", hub.url), tmp_path / "work"
    work.mkdir()

    pulled = gallery(*commands[0][1:], env=env, cwd=work)
    assert pulled.returncode == 0, pulled.stderr
    listed = gallery(*commands[1][1:], env=env, cwd=work)
    assert listed.returncode == 0 and commands[2][2] in listed.stdout, listed.stderr

    chat = spawn(*commands[2][1:], "--max-tokens", "12", env={**env, "HF_HUB_OFFLINE": "1"}, cwd=work)
    chat.expect(">>> ")
    chat.sendline("What is the capital of France?")
    chat.expect(r"\(prompt \d+ tokens")
    chat.expect(">>> ")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0, chat.transcript.getvalue()

    serve_args = [arg.replace(":50051", ":0") for arg in commands[3][1:]]  # any free port
    server = spawn(*serve_args, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=work)
    try:
        server.expect(r"listening on 127\.0\.0\.1:(\d+)")
        port = int(server.match.group(1))
        server.expect(r"loaded \S+ in")  # the model named on the command line is loaded first
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            reply = stub.Predict(
                backend_pb2.PredictOptions(
                    UseTokenizerTemplate=True,
                    Messages=[backend_pb2.Message(role="user", content="Say hello.")],
                    Tokens=8,
                    Temperature=0,
                ),
                timeout=120,
            )
        assert reply.tokens > 0 and reply.message
    finally:
        server.terminate(force=True)
