"""The conventions a person expects of a command line, each checked the way they meet it: -h, --version, shell
completion, colour only in a terminal and never with NO_COLOR, tables and the explain table within the real
terminal width, one line per error, --json where there is output, numbers checked, no folders created by a
typo in -o, `import` at a terminal, `explain NAME`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pexpect
import pytest
import yaml

from tests.catalog_support import run_cli
from tests.terminal_support import ROOT, gallery, spawn, strip_ansi, user_env

ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7]|4[0-8])[;m]")  # a foreground/background colour


@pytest.fixture
def person(hub_session, tmp_path: Path) -> tuple[dict[str, str], Path]:  # type: ignore[no-untyped-def]
    """A user's environment (fresh HOME, the recorded hub) and a working folder that is not the project."""
    work = tmp_path / "work"
    work.mkdir()
    return user_env(tmp_path / "home", hub_session.url), work


def _terminal_output(*args: str, env: dict[str, str], cwd: Path, columns: int = 80) -> tuple[str, int]:
    child = spawn(*args, env=env, cwd=cwd, columns=columns)
    child.expect(pexpect.EOF)
    child.close()
    return child.transcript.getvalue(), child.exitstatus


def test_help_version_and_completion(person: tuple[dict[str, str], Path]) -> None:
    env, work = person
    for args in (["-h"], ["--help"], ["pull", "-h"], ["chat", "-h"], ["run", "-h"]):
        done = gallery(*args, env=env, cwd=work)
        assert done.returncode == 0 and done.stdout.startswith("Usage: gallery"), (args, done.stderr)
    version = gallery("--version", env=env, cwd=work)
    assert version.returncode == 0 and re.fullmatch(r"gallery \d+\.\d+\.\d+\n", version.stdout)
    script = gallery("--show-completion", "bash", env=env, cwd=work)
    assert script.returncode == 0 and "_GALLERY_COMPLETE" in script.stdout
    completed = gallery(
        env={
            **env,
            "_GALLERY_COMPLETE": "complete_bash",
            "COMP_WORDS": "gallery show qwen",
            "COMP_CWORD": "2",
        },
        cwd=work,
    )
    assert "qwen3-4b-4bit" in completed.stdout and "qwen2.5-vl-3b-instruct" in completed.stdout
    bare = gallery(env=env, cwd=work)  # no arguments: the help, not an error line
    assert bare.returncode == 2 and bare.stdout.startswith("Usage: gallery") and "error" not in bare.stderr


def test_colour_only_in_a_terminal_and_never_with_no_color(person: tuple[dict[str, str], Path]) -> None:
    env, work = person
    coloured, code = _terminal_output("catalog", env={**env, "TERM": "xterm-256color"}, cwd=work)
    assert code == 0 and COLOUR.search(coloured)  # "no weights" in yellow
    plain, code = _terminal_output(
        "catalog", env={**env, "TERM": "xterm-256color", "NO_COLOR": "1"}, cwd=work
    )
    assert code == 0 and not COLOUR.search(plain) and "no weights" in plain
    piped = gallery("catalog", env={**env, "TERM": "xterm-256color"}, cwd=work)
    assert piped.returncode == 0 and not ANSI.search(piped.stdout + piped.stderr)


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_tables_fit_the_real_terminal(person: tuple[dict[str, str], Path], columns: int) -> None:
    env, work = person
    # explain takes catalog names, as the README says
    for args in (["catalog"], ["explain", "qwen3-4b-4bit"]):
        text, code = _terminal_output(*args, env={**env, "COLUMNS": "141"}, cwd=work, columns=columns)
        lines = strip_ansi(text).splitlines()
        assert code == 0, text
        assert lines and max(len(line) for line in lines) <= columns, (args, columns, text)
    assert "stop_tokens" in strip_ansi(text)


def test_errors_are_one_line_and_numbers_are_checked(person: tuple[dict[str, str], Path]) -> None:
    env, work = person
    cases = [
        (["run"], "Missing argument"),
        (["run", "x", "--max-tokens", "0"], "--max-tokens"),
        (["run", "x", "--max-tokens", "-5"], "--max-tokens"),
        (["chat", "x", "--max-tokens", "0"], "--max-tokens"),
        (["run", "x", "--temperature", "-1"], "--temperature"),
        (["refresh", "--jobs", "0"], "--jobs"),
        (["pull"], "Missing argument"),
        (["bogus"], "No such command"),
    ]
    for args, words in cases:
        done = gallery(*args, env=env, cwd=work)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("gallery: error:"), (args, done.stderr)
        assert words in done.stderr, (args, done.stderr)


def test_a_missing_output_folder_is_an_error_not_created(person: tuple[dict[str, str], Path]) -> None:
    env, work = person
    for args in (
        ["import", "Qwen/Qwen3-4B", "-o", "missing/dir/x.yaml"],
        ["export", "qwen3-4b-4bit", "-o", "missing/dir/x.yaml"],
    ):
        done = gallery(*args, env=env, cwd=work)
        assert done.returncode == 18, (args, done.stderr)
        assert "missing/dir" in done.stderr and "does not exist" in done.stderr
        assert not (work / "missing").exists()


def test_json_output(person: tuple[dict[str, str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    env, work = person
    for args in (
        ["validate", "--json"],
        ["list", "--json"],
        ["ls", "--json"],
        ["show", "qwen3-4b-4bit", "--json"],
    ):
        done = gallery(*args, env=env, cwd=work)
        assert done.returncode == 0, (args, done.stderr)
        json.loads(done.stdout)
    shown = json.loads(gallery("show", "smollm3-3b", "--json", env=env, cwd=work).stdout)
    assert shown["weights"] is False and shown["installed"] is None


def test_import_at_a_terminal_prints_decisions_and_says_where_the_yaml_went(
    person: tuple[dict[str, str], Path],
) -> None:
    env, work = person
    text, code = _terminal_output("import", "mlx-community/Qwen3-4B-4bit", env=env, cwd=work)
    plain = strip_ansi(text)
    assert code == 0, plain
    written = work / "qwen3-4b-4bit.yaml"
    assert written.is_file() and f"wrote {written.name}" in plain
    assert "stop_tokens" in plain and "chat_template" in plain  # the decision summary
    assert "schema_version" not in plain  # not 585 lines of YAML
    assert max(len(line) for line in plain.splitlines()) <= 80
    again, code = _terminal_output("import", "mlx-community/Qwen3-4B-4bit", env=env, cwd=work)
    assert code == 11 and "--force" in again
    piped = gallery("import", "mlx-community/Qwen3-4B-4bit", env=env, cwd=work)
    assert piped.returncode == 0 and yaml.safe_load(piped.stdout)["name"] == "qwen3-4b-4bit"
    dash, code = _terminal_output("import", "mlx-community/Qwen3-4B-4bit", "-o", "-", env=env, cwd=work)
    assert code == 0 and "schema_version: 1" in dash


def test_add_without_a_catalog_never_writes_the_package(hub_env, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from catalog.index import bundled_catalog_path, user_catalog_path

    before = bundled_catalog_path().read_bytes()
    done = run_cli(capsys, "add", "mlx-community/Qwen3-4B-4bit", "--name", "my-qwen")
    assert done.code == 0, done.err
    assert bundled_catalog_path().read_bytes() == before
    assert str(user_catalog_path()) in done.err
    listed = [row["name"] for row in run_cli(capsys, "catalog", "--json").json()]
    assert "my-qwen" in listed and "qwen3-4b-4bit" in listed  # the user's catalog, then the bundled one
    taken = run_cli(capsys, "add", "mlx-community/Qwen3-4B-4bit", "--name", "qwen3-4b-4bit")
    assert taken.code == 11  # a name the bundled catalog has would be ambiguous


def test_readme_points_nowhere_outside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        assert not target.startswith("../") and not target.startswith("/"), target
        if not target.startswith(("#", "http")):
            assert (ROOT / target.split("#")[0]).exists(), target
