"""What a new user does, in real processes, with a fresh HOME, from a folder that is not the project's:
loopback hub -> `gallery pull` -> `gallery ls` -> `gallery run NAME` -> `gallery chat NAME` in a pseudo-terminal
(Ctrl-C during an answer, two turns, one /image, /exit) -> `gallery rm`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pexpect
import pytest

from tests.terminal_support import SHOW_CURSOR, gallery, spawn, strip_ansi, user_env

pytestmark = pytest.mark.mlx
REPO = "test-org/tiny-vlm"
NAME = "tiny-vlm"


@pytest.fixture
def new_user(hub_factory, vlm_model: Path, tmp_path: Path) -> tuple[dict[str, str], Path]:  # type: ignore[no-untyped-def]
    """A loopback hub serving the tiny VLM, and a new user's environment and working folder."""
    repo = tmp_path / "repo"
    shutil.copytree(vlm_model, repo, ignore=shutil.ignore_patterns("fixture.json", ".*"))
    hub = hub_factory(extra_repos={REPO: repo})
    work = tmp_path / "somewhere" / "else"
    work.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(work / "red.png")  # a bare file name, no slash
    return user_env(tmp_path / "home", hub.url), work


def test_pull_ls_run_chat_rm(new_user: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, work = new_user
    home = Path(env["HOME"])

    pulled = gallery("pull", REPO, env=env, cwd=work)
    assert pulled.returncode == 0, pulled.stderr
    assert (
        home / ".local/share/mlx-gallery/catalog/index.yaml"
    ).is_file()  # the user's catalog, not the package's
    snapshots = list((home / ".cache/huggingface/hub/models--test-org--tiny-vlm/snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "model.safetensors").is_file()
    assert f"gallery chat {NAME}" in pulled.stderr

    listed = gallery("ls", "--json", env=env, cwd=work)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == [NAME] and rows[0]["where"] == str(snapshots[0])
    assert rows[0]["backend"] == "mlx-vlm" and len(rows[0]["revision"]) == 40

    offline = {**env, "HF_HUB_OFFLINE": "1"}
    ran = gallery("run", NAME, "-p", "hello", "--max-tokens", "5", "--json", env=offline, cwd=work)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["usage"]["completion_tokens"] == 5

    # Greedy, so the answers run to --max-tokens (a sampled answer can end at its first token, and a Ctrl-C
    # would then land after it). The interrupted answer comes first, on an empty context, so it has room for
    # the longest answer: it is still running when the Ctrl-C lands even on a loaded machine.
    chat = spawn(
        "chat", NAME, "--max-tokens", "1500", "--temperature", "0", env=offline, cwd=work, columns=80
    )
    chat.expect(">>> ")
    chat.sendline("tell me a long story")
    chat.expect("answering")  # the first piece of the answer has come
    # Ctrl-C only once the spinner is gone: rich's Live shows the cursor again as the last step of stopping,
    # and an interrupt inside that stop would leave its stdout redirect behind (a definite state, not a race).
    chat.expect_exact(SHOW_CURSOR)
    chat.sendintr()  # Ctrl-C during the answer
    chat.expect(r"answer stopped")
    chat.expect(">>> ")  # the session goes on
    chat.sendline("hello")
    chat.expect(r"\(prompt (\d+) tokens, \d+ cached · answer (\d+) tokens")
    first_prompt, first_answer = int(chat.match.group(1)), int(chat.match.group(2))
    chat.expect(">>> ")
    chat.sendline("/image red.png")
    chat.expect("attached red.png")
    chat.expect(">>> ")
    chat.sendline("What is in this image?")
    chat.expect(r"\(prompt (\d+) tokens")
    second_prompt = int(chat.match.group(1))
    # The whole conversation went with the second message: the first turn, its answer, and the image.
    assert second_prompt > first_prompt + first_answer
    chat.expect(">>> ")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    raw = chat.transcript.getvalue()
    transcript = strip_ansi(raw)
    assert chat.exitstatus == 0, transcript
    # signs of life while the model loads and while a prompt is processed: a spinner with the elapsed time
    assert re.search(r"loading tiny-vlm\S* \S*0:00:0\d", raw) and "processing the prompt" in raw
    assert "Traceback" not in transcript
    # What the CLI formats itself fits the 80-column terminal (the model's answer wraps as the terminal wraps it).
    own = [line for line in transcript.splitlines() if line.startswith(("(", "chatting with", "gallery:"))]
    assert own and max(len(line) for line in own) <= 80, transcript

    removed_without_asking = gallery("rm", NAME, env=env, cwd=work)
    assert removed_without_asking.returncode == 2 and "--yes" in removed_without_asking.stderr
    removed = gallery("rm", NAME, "--yes", env=env, cwd=work)
    assert removed.returncode == 0, removed.stderr
    assert not (home / ".cache/huggingface/hub/models--test-org--tiny-vlm").exists()
    assert json.loads(gallery("ls", "--json", env=env, cwd=work).stdout) == []
    gone = gallery("run", NAME, "-p", "hi", env=offline, cwd=work)
    assert gone.returncode == 17 and re.search(
        r"not in the local cache; run `gallery pull NAME`", gone.stderr
    )
