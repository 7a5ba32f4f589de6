"""`gallery validate` on the starter catalog and on malformed copies of it: the right problem code, file, line
and exit code, in text, JSON and GitHub-annotation output."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from catalog.index import describe_location
from tests.catalog_support import (
    BUNDLED,
    copy_catalog,
    line_after,
    line_of,
    load_data,
    replace_in,
    run_cli,
    save_data,
    set_template,
)


@dataclasses.dataclass
class Expect:
    """What validate must report for one defect."""

    file: Path
    line: int | None
    code: str
    exit_code: int
    message: str  # a part of the message


Case = Callable[[Path], Expect]


def duplicate_key(index: Path) -> Expect:
    replace_in(index, "- name: qwen3-4b-4bit\n", "- name: qwen3-4b-4bit\n  name: qwen3-4b-4bit\n")
    return Expect(
        index, line_of(index, "- name: qwen3-4b-4bit") + 1, "duplicate-key", 14, "duplicate key 'name'"
    )


def bad_indentation(index: Path) -> Expect:
    text = index.read_text()
    target = "    uri: https://huggingface.co/mlx-community/Qwen3-4B-4bit/"
    index.write_text(text.replace(target, "   uri: https://huggingface.co/mlx-community/Qwen3-4B-4bit/", 1))
    return Expect(
        index,
        line_of(index, "   uri: https://huggingface.co/mlx-community/Qwen3-4B-4bit/"),
        "unreadable",
        13,
        "invalid YAML",
    )


def wrong_type(index: Path) -> Expect:
    config = index.parent / "entries" / "qwen3-4b-4bit.yaml"
    replace_in(config, "context_size: 40960", "context_size: forty thousand")
    return Expect(
        config, line_of(config, "context_size: forty"), "config-schema", 14, "context_size: Input should be"
    )


def wrong_index_type(index: Path) -> Expect:
    replace_in(index, "  size: 2.26 GB\n", "  size: 2.26 GB\n  tags_extra: 1\n")
    return Expect(index, line_of(index, "tags_extra: 1"), "schema", 14, "unknown key")


def path_traversal(index: Path) -> Expect:
    replace_in(
        index,
        "  - filename: generation_config.json\n    sha256: 2325",
        "  - filename: ../../../.ssh/authorized_keys\n    sha256: 2325",
    )
    return Expect(
        index, line_of(index, "../../../.ssh/authorized_keys"), "unsafe-path", 14, "escapes its folder"
    )


def backslash_name(index: Path) -> Expect:
    replace_in(
        index,
        "  - filename: generation_config.json\n    sha256: 2325",
        "  - filename: sub\\\\config.json\n    sha256: 2325",
    )
    return Expect(index, line_of(index, "sub\\\\config.json"), "unsafe-path", 14, "backslash")


def template_raises(index: Path) -> Expect:
    config = index.parent / "entries" / "smollm3-3b.yaml"
    set_template(config, "{{ raise_exception('this template refuses every conversation') }}")
    return Expect(
        config, line_of(config, "raise_exception"), "template-error", 14, "refuses every conversation"
    )


def template_syntax(index: Path) -> Expect:
    config = index.parent / "entries" / "smollm3-3b.yaml"
    set_template(config, "{% for message in messages %}{{ message.content }}")
    return Expect(
        config, line_of(config, "for message in messages"), "template-error", 14, "does not compile"
    )


def missing_stop_set(index: Path) -> Expect:
    config = index.parent / "entries" / "qwen3-4b-4bit.yaml"
    data = load_data(config)
    data["mlx"]["stop_tokens"] = []
    data["stopwords"] = []
    save_data(config, data)
    return Expect(config, line_of(config, "stop_tokens: []"), "stop-set", 14, "the stop set is empty")


def missing_declared_eot(index: Path) -> Expect:
    config = index.parent / "entries" / "gemma-4-e4b-it-qat-4bit.yaml"
    data = load_data(config)
    data["mlx"]["stop_tokens"] = [t for t in data["mlx"]["stop_tokens"] if t["id"] != 106]
    data["stopwords"] = [w for w in data["stopwords"] if w != "<turn|>"]
    save_data(config, data)
    return Expect(config, line_of(config, "stop_tokens:"), "stop-set", 14, "end-of-turn token '<turn|>'")


def missing_eos(index: Path) -> Expect:
    config = index.parent / "entries" / "llama-3.2-3b-instruct.yaml"
    data = load_data(config)
    data["mlx"]["stop_tokens"] = [t for t in data["mlx"]["stop_tokens"] if t["id"] != 128009]
    data["stopwords"] = [w for w in data["stopwords"] if w != "<|eot_id|>"]
    save_data(config, data)
    return Expect(config, line_of(config, "stop_tokens:"), "stop-set", 14, "eos_token '<|eot_id|>'")


def bad_sha256(index: Path) -> Expect:
    replace_in(
        index, "sha256: 8f09b74b4758b1c5d8db247ec8023b530d4ffaa4a3b50a516f29e368d7a6831d", "sha256: 8f09b74b"
    )
    return Expect(index, line_of(index, "sha256: 8f09b74b"), "bad-sha256", 14, "64 lowercase hex")


def disagreeing_sha256(index: Path) -> Expect:
    lfs = "bdfaf520ca275d2bcde3b8fb6639624c50fe03ad4082f2df571f3a2068800d1c"
    replace_in(index, f"sha256: {lfs}", f"sha256: {'ab' * 32}")
    return Expect(index, line_of(index, f"sha256: {'ab' * 32}"), "sha256-mismatch", 14, "LFS sha256")


def short_revision(index: Path) -> Expect:
    config = index.parent / "entries" / "llama-3.2-3b-instruct.yaml"
    data = load_data(config)
    data["mlx"]["source"]["revision"] = data["mlx"]["source"]["revision"][:7]
    save_data(config, data)
    return Expect(config, line_of(config, "revision: "), "bad-revision", 14, "full 40-hex commit")


def unsupported_backend(index: Path) -> Expect:
    config = index.parent / "entries" / "gemma-3-4b-it-text-4bit.yaml"
    replace_in(config, "backend: mlx\n", "backend: llama-cpp\n")
    return Expect(config, line_of(config, "backend: llama-cpp"), "unsupported-backend", 14, "not supported")


def template_edited(index: Path) -> Expect:
    config = index.parent / "entries" / "qwen3-4b-4bit.yaml"
    data = load_data(config)
    data["mlx"]["chat_template"]["text"] += "\n"
    save_data(config, data)
    return Expect(config, line_of(config, "    sha256: "), "template-sha256", 14, "without re-pinning")


def image_dropped(index: Path) -> Expect:
    config = index.parent / "entries" / "qwen2.5-vl-3b-instruct.yaml"
    set_template(
        config,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
        "{% else %}{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}",
    )
    return Expect(
        config,
        line_after(config, "  chat_template:", "    text:"),
        "template-image",
        14,
        "image marker '<|image_pad|>'",
    )


def template_missing(index: Path) -> Expect:
    config = index.parent / "entries" / "smollm3-3b.yaml"
    data = load_data(config)
    data["mlx"]["chat_template"] = {"status": "missing"}
    save_data(config, data)
    return Expect(config, line_of(config, "status: missing"), "template-missing", 14, "accept_missing")


def duplicate_name(index: Path) -> Expect:
    replace_in(index, "- name: smollm3-3b\n", "- name: QWEN3-4b-4bit\n")
    return Expect(index, line_of(index, "- name: QWEN3-4b-4bit"), "duplicate-name", 14, "duplicate name")


def name_mismatch(index: Path) -> Expect:
    replace_in(index, "- name: smollm3-3b\n", "- name: smollm3\n")
    return Expect(
        index, line_of(index, "- name: smollm3"), "name-mismatch", 14, "differs from its config's name"
    )


def config_path_escape(index: Path) -> Expect:
    replace_in(index, "config: entries/smollm3-3b.yaml", "config: ../secrets/smollm3-3b.yaml")
    return Expect(index, line_of(index, "config: ../secrets"), "unsafe-path", 14, "escapes its folder")


def not_utf8(index: Path) -> Expect:
    config = index.parent / "entries" / "smollm3-3b.yaml"
    config.write_bytes(b"name: \xff\xfe\n")
    return Expect(config, None, "unreadable", 13, "not UTF-8")


CASES: list[Case] = [
    duplicate_key,
    bad_indentation,
    wrong_type,
    wrong_index_type,
    path_traversal,
    backslash_name,
    template_raises,
    template_syntax,
    missing_stop_set,
    missing_declared_eot,
    missing_eos,
    bad_sha256,
    disagreeing_sha256,
    short_revision,
    unsupported_backend,
    template_edited,
    image_dropped,
    template_missing,
    duplicate_name,
    name_mismatch,
    config_path_escape,
    not_utf8,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_malformed_catalog_reports_problem_in_every_format(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    expect = case(index)

    text = run_cli(capsys, "validate", index)
    assert text.code == expect.exit_code, text.out + text.err
    location = describe_location(str(expect.file), expect.line)
    wanted = f"{location}: error: [{expect.code}]"
    matching = [line for line in text.out.splitlines() if line.startswith(wanted)]
    assert matching, f"no {wanted!r} in:\n{text.out}"
    assert any(expect.message in line for line in matching), text.out
    assert "Traceback" not in text.out + text.err

    as_json = run_cli(capsys, "validate", "--format", "json", index)
    assert as_json.code == expect.exit_code
    report = as_json.json()
    assert report["ok"] is False and report["exit_code"] == expect.exit_code
    found = [
        p
        for p in report["problems"]
        if p["code"] == expect.code and p["line"] == expect.line and p["file"] == str(expect.file)
    ]
    assert found and any(expect.message in p["message"] for p in found), json.dumps(report, indent=1)

    github = run_cli(capsys, "validate", "--format", "github", index)
    assert github.code == expect.exit_code
    file_prop = describe_location(str(expect.file), None).replace(":", "%3A").replace(",", "%2C")
    line_prop = f",line={expect.line}" if expect.line else ""
    prefix = f"::error file={file_prop}{line_prop},title=gallery validate%3A {expect.code}::"
    assert any(
        line.startswith(prefix) and expect.message.replace("%", "%25") in line
        for line in github.out.splitlines()
    ), github.out


def test_only_the_broken_entry_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = copy_catalog(tmp_path / "catalog")
    template_raises(index)
    report = run_cli(capsys, "validate", "--format", "json", index).json()
    assert {p["entry"] for p in report["problems"] if p["severity"] == "error"} == {"smollm3-3b"}
    assert report["entries"] == 6


def test_every_problem_is_reported_not_just_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    for case in (duplicate_key, bad_sha256, short_revision, template_raises, missing_stop_set):
        case(index)
    report = run_cli(capsys, "validate", "--format", "json", index).json()
    codes = {p["code"] for p in report["problems"]}
    assert {"duplicate-key", "bad-sha256", "bad-revision", "template-error", "stop-set"} <= codes
    assert report["exit_code"] == 14


# The recorded hub lists no weight files for these three repos (metadata only), which validate points out.
NO_WEIGHTS = {"qwen2.5-vl-3b-instruct", "llama-3.2-3b-instruct", "smollm3-3b"}


@pytest.mark.parametrize("output", ["text", "json", "github"])
def test_starter_catalog_validates(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "validate", "--format", output)
    assert result.code == 0, result.out
    if output == "json":
        report = result.json()
        assert report["ok"] and report["entries"] == 6 and report["errors"] == 0
        assert {(p["code"], p["entry"]) for p in report["problems"]} == {
            ("no-weights", n) for n in NO_WEIGHTS
        }
    elif output == "text":
        assert result.out.splitlines()[-1] == "0 errors, 3 warnings: 6 entries in 7 files"
        assert "error:" not in result.out
    else:
        assert "::error" not in result.out
        index = describe_location(str(BUNDLED / "index.yaml"), None)
        assert result.out.count(f"::warning file={index},line=") == 3


def test_accepted_missing_template_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = copy_catalog(tmp_path / "catalog")
    config = index.parent / "entries" / "smollm3-3b.yaml"
    data = load_data(config)
    data["mlx"]["chat_template"] = {"status": "missing", "accept_missing": True}
    save_data(config, data)
    result = run_cli(capsys, "validate", index)
    assert result.code == 0, result.out
    assert "warning: [template-missing]" in result.out
    assert run_cli(capsys, "validate", "--strict", index).code == 14
    github = run_cli(capsys, "validate", "--format", "github", index)
    assert github.code == 0 and "::warning file=" in github.out


def test_standalone_config_and_folder_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = copy_catalog(tmp_path / "catalog")
    config = index.parent / "entries" / "qwen3-4b-4bit.yaml"
    # A folder means its index.yaml; a config the index already covers is not checked twice.
    result = run_cli(capsys, "validate", "--format", "json", index.parent, config)
    assert result.code == 0 and result.json()["entries"] == 6
    alone = tmp_path / "alone.yaml"
    alone.write_text(config.read_text().replace("stop_tokens:", "stop_tokens_typo:"))
    result = run_cli(capsys, "validate", alone)
    assert result.code == 14
    assert (
        f"{describe_location(str(alone), line_of(alone, 'stop_tokens_typo'))}: error: [config-schema]"
        in result.out
    )


def test_unreadable_and_odd_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = run_cli(capsys, "validate", tmp_path / "nope.yaml")
    assert missing.code == 13 and "[unreadable]" in missing.out and "no such file" in missing.out
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    result = run_cli(capsys, "validate", scalar)
    assert result.code == 14 and "[not-a-catalog]" in result.out
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("- &a {name: x}\n- *a\n")
    result = run_cli(capsys, "validate", aliases)
    assert result.code == 13 and "anchors and aliases" in result.out
    bad_format = run_cli(capsys, "validate", "--format", "xml")
    assert bad_format.code == 2 and "Traceback" not in bad_format.err


def test_catalog_env_and_option_choose_the_catalog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    bad_sha256(index)
    monkeypatch.setenv("GALLERY_CATALOG", str(index))
    assert run_cli(capsys, "validate").code == 14
    good = copy_catalog(tmp_path / "good")
    assert run_cli(capsys, "validate", "--catalog", good.parent).code == 0


def test_orphan_config_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = copy_catalog(tmp_path / "catalog")
    (index.parent / "entries" / "stray.yaml").write_text("name: stray\n")
    result = run_cli(capsys, "validate", index)
    assert result.code == 0 and "warning: [orphan-config]" in result.out
