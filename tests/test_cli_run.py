"""`gallery run` as people use it, on real tiny models in subprocesses: an image named without a slash, the
prompt from stdin, --json, one warning for a model without a template, and Ctrl-C in a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pexpect
import pytest

from tests.plugins.models import fixture_info
from tests.terminal_support import SHOW_CURSOR, gallery, spawn, strip_ansi, user_env

pytestmark = pytest.mark.mlx


@pytest.fixture
def person(tmp_path: Path) -> tuple[dict[str, str], Path]:
    work = tmp_path / "work"
    work.mkdir()
    return user_env(tmp_path / "home", HF_HUB_OFFLINE="1"), work


def test_an_image_named_without_a_slash_is_a_file(
    vlm_model: Path, person: tuple[dict[str, str], Path]
) -> None:
    from PIL import Image

    env, work = person
    Image.new("RGB", (32, 32), (255, 0, 0)).save(work / "red.png")
    done = gallery(
        "run",
        str(vlm_model),
        "-p",
        "What is in this image?",
        "--image",
        "red.png",
        "--max-tokens",
        "3",
        "--json",
        env=env,
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["route"] == "mlx-vlm"  # the image reached the vision path
    missing = gallery("run", str(vlm_model), "-p", "hi", "--image", "nope.png", env=env, cwd=work)
    assert missing.returncode == 2 and "image nope.png: no such file" in missing.stderr


def test_the_prompt_comes_from_stdin(scripted_text_model: Path, person: tuple[dict[str, str], Path]) -> None:
    env, work = person
    answer = fixture_info(scripted_text_model)["answer"]
    piped = gallery("run", str(scripted_text_model), input="hello from a pipe\n", env=env, cwd=work)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == answer
    dash = gallery("run", str(scripted_text_model), "-p", "-", "--json", input="hi\n", env=env, cwd=work)
    assert dash.returncode == 0, dash.stderr
    data = json.loads(dash.stdout)
    assert (
        data["content"] == answer and data["finish_reason"] == "stop" and data["usage"]["prompt_tokens"] > 1
    )
    empty = gallery("run", str(scripted_text_model), input="", env=env, cwd=work)
    assert empty.returncode == 2 and "empty" in empty.stderr


def test_a_model_without_a_template_warns_once_and_names_raw(
    text_notemplate_model: Path, person: tuple[dict[str, str], Path]
) -> None:
    env, work = person
    done = gallery(
        "run", str(text_notemplate_model), "--raw", "-p", "Hello", "--max-tokens", "3", env=env, cwd=work
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.lower().count("template") == 1 or done.stderr.count("gallery: warning:") == 1, (
        done.stderr
    )
    warning = next(line for line in done.stderr.splitlines() if "template" in line)
    assert "--raw" in warning and "chat_template.jinja" in warning
    chat = gallery("run", str(text_notemplate_model), "-p", "Hello", env=env, cwd=work)
    assert chat.returncode == 2 and "no chat template" in chat.stderr.lower()


def test_ctrl_c_ends_the_line_and_exits_130(vlm_model: Path, person: tuple[dict[str, str], Path]) -> None:
    env, work = person
    child = spawn(
        "run", str(vlm_model), "-p", "tell me a long story", "--max-tokens", "3000", env=env, cwd=work
    )
    child.expect("answering")
    child.expect_exact(SHOW_CURSOR)  # the spinner is gone (its own frames could match the words below)
    child.expect(r"\w+ \w+")  # words of the answer have come
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    screen = strip_ansi(child.transcript.getvalue())
    assert child.exitstatus == 130, screen
    lines = screen.rstrip().splitlines()
    assert lines[-1] == "gallery: interrupted"  # on its own line, after the partial answer's line was ended
