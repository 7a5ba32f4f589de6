"""`gallery validate`: check catalogs and model configs offline, the way CI needs it.

Every problem is reported (not just the first) with its file and line: schema errors, duplicate YAML keys
and names, unsupported backends, unpinned or short revisions, malformed or disagreeing sha256 values,
file names that could escape their folder, templates that do not compile or render the probe
conversations in the sandbox (plus an image probe for mlx-vlm configs, which must show the image marker),
template text that does not match its pinned sha256, missing templates not explicitly accepted, and stop
sets that are empty or miss a declared end-of-sequence / end-of-turn token.

The template probes and the stop-set rule are catalog.probes'. No network, no MLX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from catalog.index import (
    ENTRIES_DIR,
    INDEX_FILE,
    MAX_INDEX_BYTES,
    Problem,
    RawEntry,
    describe_location,
    file_uri,
    human_size,
    index_problems,
    iter_entries,
    path_problem,
    read_document,
    schema_problems,
)
from catalog.probes import stop_problems, template_verdict
from gallery.chat_template import template_sha256
from gallery.config import ModelConfig
from gallery.errors import BadConfig, ValidationFailed
from gallery.sharding import ShardingRefused, configured_plan

OutputFormat = Literal["text", "json", "github"]
Locate = Callable[..., tuple[str, int | None]]

EXIT_OK = 0
EXIT_UNREADABLE = BadConfig.exit_code
EXIT_PROBLEMS = ValidationFailed.exit_code

_WEIGHT_SUFFIXES = (".safetensors",)
_REQUIRED_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


# ----------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class Report:
    """Everything one `gallery validate` run found."""

    problems: list[Problem] = dataclasses.field(default_factory=list)
    files: int = 0
    entries: int = 0
    unreadable: bool = False

    @property
    def errors(self) -> int:
        """How many error-level problems."""
        return sum(1 for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> int:
        """How many warnings."""
        return sum(1 for p in self.problems if p.severity == "warning")

    def exit_code(self, *, strict: bool = False) -> int:
        """13 when a file could not be read, 14 when problems were found (warnings too with strict), else 0."""
        if self.unreadable:
            return EXIT_UNREADABLE
        if self.errors or (strict and self.warnings):
            return EXIT_PROBLEMS
        return EXIT_OK

    def sorted_problems(self) -> list[Problem]:
        """Problems in file order, then line order."""
        return sorted(self.problems, key=lambda p: (p.file, p.line or 0, p.severity, p.code, p.message))


# ----------------------------------------------------------------------------------------------- configs
def check_config(
    config: ModelConfig, locate: Locate, entry: str | None, *, in_catalog: bool
) -> list[Problem]:
    """The semantic checks of one valid config; `locate(*keypath)` gives (file, line) for a key path."""
    problems: list[Problem] = []

    def add(severity: str, code: str, where: tuple[str | int, ...], message: str) -> None:
        file, line = locate(*where)
        problems.append(Problem(file, line, severity, code, message, entry))  # type: ignore[arg-type]

    source = config.mlx.source
    if in_catalog and source.local_path is not None:
        add(
            "error",
            "local-source",
            ("mlx", "source", "local_path"),
            "a catalog entry must come from a Hub repo, not a local folder (not portable)",
        )
    if source.repo is not None and source.revision is None:
        add(
            "error",
            "bad-revision",
            ("mlx", "source"),
            "mlx.source.revision is not pinned: it must be a full 40-hex commit hash",
        )
    for index, repo_file in enumerate(config.mlx.files):
        problem = path_problem(repo_file.path)
        if problem:
            add("error", "unsafe-path", ("mlx", "files", index, "path"), problem)

    template = config.mlx.chat_template
    rendered: str | None = None
    if template.status == "pinned" and template.text:
        actual = template_sha256(template.text)
        if template.sha256 is None:
            add(
                "error",
                "template-sha256",
                ("mlx", "chat_template"),
                f"the pinned template has no sha256 (its text hashes to {actual})",
            )
        elif template.sha256 != actual:
            add(
                "error",
                "template-sha256",
                ("mlx", "chat_template", "sha256"),
                f"the template text's sha256 is {actual[:16]}…, not the pinned {template.sha256[:16]}…: "
                "the text was changed without re-pinning",
            )
        vlm_images = config.backend == "mlx-vlm" and (
            config.mlx.media.image or not (config.mlx.media.audio or config.mlx.media.video)
        )
        marker = config.mlx.media.marker or config.mlx.media.image_token
        verdict = template_verdict(
            template.text, actual, dict(template.variables), template.supports_system, vlm_images, marker
        )
        for code, where, message in verdict.problems:
            add("error", code, where, message)
        rendered = verdict.text_render
    elif template.accept_missing:
        add(
            "warning",
            "template-missing",
            ("mlx", "chat_template", "status"),
            f"no usable chat template (status {template.status}), accepted by mlx.chat_template.accept_missing",
        )
    else:
        add(
            "error",
            "template-missing",
            ("mlx", "chat_template", "status"),
            f"no usable chat template (status {template.status}): chat requests cannot be formatted as the model "
            "expects; set mlx.chat_template.accept_missing: true to accept this knowingly",
        )

    drafter = config.mlx.drafter
    if drafter is not None:
        from gallery.drafters import pairing_problem

        problem = pairing_problem(config.mlx.model_type, drafter.kind, drafter.model_type)
        if problem:
            add("error", "drafter-pairing", ("mlx", "drafter", "kind"), f"mlx.drafter: {problem}")
        if in_catalog and drafter.local_path is not None and drafter.repo is None:
            add(
                "error",
                "local-source",
                ("mlx", "drafter", "local_path"),
                "a catalog entry's drafter must be pinned on the Hub",
            )
    for severity, code, where, message in stop_problems(config, rendered):
        add(severity, code, where, message)
    if config.distributed is not None:
        try:
            configured_plan(config)
        except ShardingRefused as exc:
            add("error", "cannot-shard", ("distributed",), str(exc))
    return problems


def check_entry(item: RawEntry) -> list[Problem]:
    """Cross-checks between an entry's index fields and its (valid) config, then the config's own checks."""
    meta, config = item.meta, item.config
    problems: list[Problem] = []
    if config is None:
        return problems
    name = item.name
    index_file = str(item.index_path)
    problems.extend(check_config(config, item.config_location, name, in_catalog=True))
    if meta is None:
        return problems

    def add(severity: str, code: str, where: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(index_file, item.index_line(*where), severity, code, message, name))  # type: ignore[arg-type]

    if meta.name != config.name:
        add(
            "error",
            "name-mismatch",
            ("name",),
            f"entry name {meta.name!r} differs from its config's name {config.name!r}",
        )
    if meta.license and config.license and meta.license != config.license:
        add(
            "warning",
            "license",
            ("license",),
            f"license {meta.license!r} differs from the config's {config.license!r}",
        )
    repo, revision = config.mlx.source.repo, config.mlx.source.revision
    pinned = {f.path: f for f in config.mlx.files}
    seen: dict[str, int] = {}
    total: int | None = 0
    for index, file in enumerate(meta.files):
        if file.filename in seen:
            add(
                "error",
                "duplicate-file",
                ("files", index, "filename"),
                f"file {file.filename!r} is listed twice (first as files[{seen[file.filename]}])",
            )
            continue
        seen[file.filename] = index
        repo_file = pinned.get(file.filename)
        if repo_file is None:
            add(
                "error",
                "unknown-file",
                ("files", index, "filename"),
                f"{file.filename!r} is not a file of the pinned revision (mlx.files)",
            )
            total = None
            continue
        if repo_file.sha256 and repo_file.sha256 != file.sha256:
            add(
                "error",
                "sha256-mismatch",
                ("files", index, "sha256"),
                f"sha256 of {file.filename} is {file.sha256[:16]}…, but the Hub's LFS sha256 pinned in the config is "
                f"{repo_file.sha256[:16]}…",
            )
        if repo and revision and file.uri != file_uri(repo, revision, file.filename):
            add(
                "error",
                "bad-uri",
                ("files", index, "uri"),
                f"uri must be the pinned URL {file_uri(repo, revision, file.filename)}",
            )
        if total is not None and repo_file.size is not None:
            total += repo_file.size
        else:
            total = None
    needed = [path for path in pinned if path in _REQUIRED_FILES or path.endswith(_WEIGHT_SUFFIXES)]
    missing = [path for path in needed if path not in seen]
    if missing:
        add(
            "error",
            "incomplete-files",
            ("files",),
            f"files lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''} of the pinned revision: "
            "an install would be incomplete",
        )
    if not any(path.endswith(_WEIGHT_SUFFIXES) for path in pinned):
        add(
            "warning",
            "no-weights",
            ("files",),
            "the pinned revision lists no *.safetensors weights: an install would not give a loadable model",
        )
    if meta.size and total is not None and meta.size != human_size(total):
        add(
            "warning",
            "size",
            ("size",),
            f"size says {meta.size!r} but the files add up to {human_size(total)}",
        )
    return problems


# ----------------------------------------------------------------------------------------------- files
def _unreadable(report: Report, path: Path, exc: BadConfig) -> None:
    line = exc.line if exc.file == str(path) else None
    text = ": ".join(part for part in (exc.field, exc.problem) if part)
    report.problems.append(Problem(str(path), line, "error", "unreadable", text))
    report.unreadable = True


def validate_catalog(path: Path, report: Report, doc: Any = None) -> set[str]:
    """Validate a catalog index and every entry's config. Returns the config files it covered."""
    covered: set[str] = set()
    if doc is None:
        try:
            doc = read_document(path, MAX_INDEX_BYTES, "catalog index")
        except BadConfig as exc:
            _unreadable(report, path, exc)
            return covered
    report.files += 1
    report.problems.extend(index_problems(path, doc))
    first_position: dict[str, int] = {}
    for item in iter_entries(path, doc):
        report.entries += 1
        if item.config_file is not None:
            covered.add(os.path.abspath(item.config_file))
            if item.config_doc is not None or item.unreadable:
                report.files += 1
        report.unreadable |= item.unreadable
        report.problems.extend(item.problems)
        report.problems.extend(check_entry(item))
        name = item.name
        if name is not None:
            key = name.lower()
            if key in first_position:  # lines are looked up only now: a clean catalog never needs them
                first_line = doc.line(first_position[key], "name")
                report.problems.append(
                    Problem(
                        str(path),
                        item.index_line("name"),
                        "error",
                        "duplicate-name",
                        f"duplicate name {name!r} (first at line {first_line})",
                        name,
                    )
                )
            else:
                first_position[key] = item.position
    _orphans(path, covered, report)
    return covered


def _orphans(path: Path, covered: set[str], report: Report) -> None:
    folder = path.parent / ENTRIES_DIR
    if not folder.is_dir():
        return
    for config_file in sorted(folder.glob("*.y*ml")):
        if os.path.abspath(config_file) not in covered:
            report.problems.append(
                Problem(
                    str(config_file),
                    None,
                    "warning",
                    "orphan-config",
                    f"not referenced by {path.name}: remove it or add an entry for it",
                )
            )


def validate_config_file(path: Path, report: Report, doc: Any = None) -> None:
    """Validate a standalone model config file (schema, pins, template, stop set)."""
    if doc is None:
        try:
            doc = read_document(path, MAX_INDEX_BYTES, "model config")
        except BadConfig as exc:
            _unreadable(report, path, exc)
            return
    report.files += 1
    file = str(path)
    if doc.duplicates:
        # run, explain and serve refuse a config with a duplicate key outright (which value was meant is unknown);
        # so does validate, rather than going on to judge the last value of each key.
        report.problems.extend(
            Problem(file, line, "error", "duplicate-key", message) for _k, line, message in doc.duplicates
        )
        return
    try:
        config = ModelConfig.model_validate(doc.data)
    except ValidationError as exc:
        name = (
            doc.data.get("name")
            if isinstance(doc.data, dict) and isinstance(doc.data.get("name"), str)
            else None
        )
        report.problems.extend(
            dataclasses.replace(p, code="config-schema" if p.code == "schema" else p.code)
            for p in schema_problems(exc, file, doc, (), name)
        )
        return
    report.entries += 1
    report.problems.extend(
        check_config(config, lambda *key: (file, doc.line(*key)), config.name, in_catalog=False)
    )


def validate_paths(paths: Iterable[Path]) -> Report:
    """Validate catalogs (a list of entries, or a folder holding index.yaml) and standalone config files.

    A config file that a validated catalog already covers is not checked twice.
    """
    with _gc_paused():
        return _validate_paths(list(paths))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while reading thousands of (acyclic) YAML documents.

    Each document allocates hundreds of containers; with the collector on, its full passes over an ever
    larger heap cost about a third of a large catalog's validation time. Cycles made meanwhile are
    collected when it is re-enabled.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _validate_paths(paths: list[Path]) -> Report:
    report = Report()
    parsed: list[tuple[Path, Any]] = []
    for raw_path in paths:
        path = raw_path / INDEX_FILE if raw_path.is_dir() else raw_path
        try:
            parsed.append((path, read_document(path, MAX_INDEX_BYTES, "catalog or config")))
        except BadConfig as exc:
            _unreadable(report, path, exc)
    covered: set[str] = set()
    standalone: list[tuple[Path, Any]] = []
    for path, doc in parsed:
        if isinstance(doc.data, list):
            covered |= validate_catalog(path, report, doc)
        elif isinstance(doc.data, dict):
            standalone.append((path, doc))
        else:
            report.files += 1
            kind = "empty" if doc.data is None else f"a {type(doc.data).__name__}"
            report.problems.append(
                Problem(
                    str(path),
                    1,
                    "error",
                    "not-a-catalog",
                    f"expected a catalog (a list of entries) or a model config (a mapping), got {kind}",
                )
            )
    for path, doc in standalone:
        if os.path.abspath(path) not in covered:
            validate_config_file(path, report, doc)
    return report


# ----------------------------------------------------------------------------------------------- output
def _github_escape(text: str, *, property_value: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property_value:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def _count(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def summary_line(report: Report) -> str:
    """One line: how many errors and warnings in how many entries and files."""
    scope = f"{_count(report.entries, 'entry', 'entries')} in {_count(report.files, 'file', 'files')}"
    if not report.problems:
        return f"ok: {scope}, no problems"
    return f"{_count(report.errors, 'error', 'errors')}, {_count(report.warnings, 'warning', 'warnings')}: {scope}"


def format_report(report: Report, output: OutputFormat, *, strict: bool = False) -> str:
    """The report as text (one line per problem), JSON, or GitHub Actions annotations."""
    problems = report.sorted_problems()
    if output == "json":
        data = {
            "ok": report.exit_code(strict=strict) == EXIT_OK,
            "exit_code": report.exit_code(strict=strict),
            "errors": report.errors,
            "warnings": report.warnings,
            "entries": report.entries,
            "files": report.files,
            "problems": [p.as_dict() for p in problems],
        }
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    lines = []
    for problem in problems:
        who = f"{problem.entry}: " if problem.entry else ""
        if output == "github":
            location = describe_location(problem.file, None)
            props = f"file={_github_escape(location, property_value=True)}"
            if problem.line:
                props += f",line={problem.line}"
            title = f"gallery validate: {problem.code}"
            props += f",title={_github_escape(title, property_value=True)}"
            kind = "error" if problem.severity == "error" or strict else "warning"
            lines.append(f"::{kind} {props}::{_github_escape(who + problem.message)}")
        else:
            lines.append(
                f"{describe_location(problem.file, problem.line)}: {problem.severity}: "
                f"[{problem.code}] {who}{problem.message}"
            )
    lines.append(summary_line(report))
    return "\n".join(lines) + "\n"
