"""`gallery import / explain / schema` end to end: real subprocesses for exit codes and output streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.app import main
from gallery.configfile import parse_config_text, read_config

ROOT = Path(__file__).resolve().parent.parent


def _gallery(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.fixture
def cli_env(hub_env, tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub_env.url,
        HF_HOME=str(tmp_path / "hf-home"),
        GALLERY_HTTP_BACKOFF="0.01",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def test_import_prints_yaml_that_reads_back_identically(cli_env) -> None:
    done = _gallery(["import", "mlx-community/gemma-4-E4B-it-qat-4bit"], cli_env)
    assert done.returncode == 0, done.stderr
    config = parse_config_text(done.stdout, filename="stdout")
    assert config.backend == "mlx-vlm" and {1, 50, 106} <= set(config.mlx.stop_token_ids)
    assert "text: |" in done.stdout  # the template is a readable block literal
    assert "Traceback" not in done.stderr


def test_import_json_and_output_file_rules(cli_env, tmp_path) -> None:
    out = tmp_path / "qwen3.yaml"
    assert _gallery(["import", "Qwen/Qwen3-4B", "-o", str(out)], cli_env).returncode == 0
    first = out.read_text()
    again = _gallery(["import", "Qwen/Qwen3-4B", "-o", str(out)], cli_env)
    assert again.returncode == 11 and "--force" in again.stderr
    assert out.read_text() == first  # untouched
    assert _gallery(["import", "Qwen/Qwen3-4B", "-o", str(out), "--force"], cli_env).returncode == 0
    assert out.read_text() == first  # deterministic: a re-import of the same commit is byte-identical
    as_json = _gallery(["import", "Qwen/Qwen3-4B", "--json", "--name", "my-qwen"], cli_env)
    data = json.loads(as_json.stdout)
    assert data["name"] == "my-qwen" and data["backend"] == "mlx"
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["import", "nobody/nothing"], 3, "not found"),
        (["import", "broken/gated"], 4, "HF_TOKEN"),
        (["import", "Qwen/Qwen3-4B", "--revision", "nope"], 5, "revision"),
        (["import", "broken/malformed-json"], 8, "config.json"),
        (["import", "broken/wrong-types"], 8, "eos_token_id"),
        (["import", "broken/no-config"], 9, "config.json"),
        (["import", "broken/speech"], 10, "speech"),
        (["import", "google/gemma-4-E4B-it", "--strict"], 12, "template"),
        (["import", "not a repo!"], 2, "repo id"),
        (["import", "Qwen/Qwen3-4B", "--backend", "gguf"], 2, "backend"),
        # explain resolves like run (the one resolver): a config file that is not there is not-found
        (["explain", "/nonexistent/config.yaml"], 3, "no such config file"),
        (["import", "./no/such/folder"], 2, "no such file or folder"),
    ],
)
def test_errors_are_one_line_with_documented_codes(cli_env, args, code, words) -> None:
    done = _gallery(args, cli_env)
    assert done.returncode == code, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("gallery: error:")]
    assert len(errors) == 1 and words.lower() in errors[0].lower()
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_offline_and_not_cached_and_network_down(cli_env) -> None:
    offline = _gallery(["import", "Qwen/Qwen3-4B"], {**cli_env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 6 and "cache" in offline.stderr
    down = _gallery(
        ["import", "Qwen/Qwen3-4B"],
        {**cli_env, "HF_ENDPOINT": "http://127.0.0.1:9", "GALLERY_HTTP_ATTEMPTS": "2"},
    )
    assert down.returncode == 7 and "Traceback" not in down.stderr


def test_missing_template_warns_loudly(cli_env) -> None:
    done = _gallery(["import", "google/gemma-4-E4B-it"], cli_env)
    assert done.returncode == 0
    # One warning, once, that says what to do: --raw, or how to pin a template.
    assert done.stderr.count("chat template") == 1, done.stderr
    assert "has no usable chat template" in done.stderr and "--raw" in done.stderr
    assert "chat_template.jinja" in done.stderr
    assert yaml.safe_load(done.stdout)["mlx"]["chat_template"]["status"] == "missing"


def test_explain_from_source_and_from_config(cli_env, tmp_path, capsys) -> None:
    done = _gallery(["explain", "mlx-community/gemma-3-4b-it-text-4bit"], cli_env)
    assert done.returncode == 0
    assert "AGAINST" in done.stdout and "pipeline_tag" in done.stdout
    out = tmp_path / "g.yaml"
    assert _gallery(["import", "Qwen/Qwen2.5-VL-3B-Instruct", "-o", str(out)], cli_env).returncode == 0
    assert main(["explain", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["decisions"]["backend"]["value"].startswith("mlx-vlm")
    assert read_config(out).mlx.chat_template.source == "chat_template.json:chat_template"


def test_explain_rejects_a_broken_config(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbackend: mlx\nbackend: mlx-vlm\n")
    assert main(["explain", str(bad)]) == 13
    assert "duplicate key 'backend'" in capsys.readouterr().err


def test_schema_is_json_schema(capsys) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "MLX gallery ModelConfig"
    assert "backend" in schema["properties"] and "mlx" in schema["required"]


def test_help_works_without_network(capsys) -> None:
    assert main(["--help"]) == 0
    assert "import" in capsys.readouterr().out
