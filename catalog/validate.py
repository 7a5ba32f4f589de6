"""`gallery validate`: check catalogs and model configs offline, the way CI needs it.

Every problem is reported (not just the first) with its file and line: schema errors, duplicate YAML keys
and names, unsupported backends, unpinned or short revisions, malformed or disagreeing sha256 values,
file names that could escape their folder, templates that do not compile or render the probe
conversations in the sandbox (plus an image probe for mlx-vlm configs, which must show the image marker),
template text that does not match its pinned sha256, missing templates not explicitly accepted, and stop
sets that are empty or miss a declared end-of-sequence / end-of-turn token.

The stop-set rule, without guessing from token text: a token is *declared* when the tokenizer names it
(`eos_token`, which the template also sees) or the config records a declared end-of-turn token
(`tokenizer_config.json:eot_token` among a stop token's sources, or in the stop decision's evidence).
Every declared token must be in the stop set. The rendered probe then shows what follows the assistant's
turn: if that starts with a stop token, the set covers the end of a turn; if it starts with a declared
token missing from the set, that is an error (reported above); if it starts with anything else, nothing
declares it, so it is a warning for a reviewer, never a guess.

Templates are compiled and rendered once per (template sha256, variables, probe kind): a catalog of
thousands of entries built on a handful of templates renders each only once. No network, no MLX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import threading
from collections import OrderedDict
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
from gallery.chat_template import (
    PROBE_IMAGE,
    PROBE_TEXT,
    PROBE_TEXT_NO_SYSTEM,
    TemplateError,
    compile_template,
    render_chat,
    template_sha256,
)
from gallery.config import ModelConfig
from gallery.errors import BadConfig, ValidationFailed
from gallery.sharding import ShardingRefused, configured_plan

OutputFormat = Literal["text", "json", "github"]
Locate = Callable[..., tuple[str, int | None]]

EXIT_OK = 0
EXIT_UNREADABLE = BadConfig.exit_code
EXIT_PROBLEMS = ValidationFailed.exit_code

_ASSISTANT_PROBE_TEXT = next(m["content"] for m in PROBE_TEXT if m["role"] == "assistant")
_USER_PROBE_TEXTS = [m["content"] for m in PROBE_TEXT if m["role"] == "user"]
_IMAGE_PROBE_TEXT_ONLY: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}]}
]
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


# ----------------------------------------------------------------------------------------------- templates
@dataclasses.dataclass(frozen=True)
class _TemplateVerdict:
    """What rendering one template on the probes showed: problems (code, where, message) and the text render."""

    problems: tuple[tuple[str, tuple[str, ...], str], ...]
    text_render: str | None


_VERDICTS: OrderedDict[tuple[Any, ...], _TemplateVerdict] = OrderedDict()
_VERDICTS_LOCK = threading.Lock()
_VERDICTS_MAX = 512


def _template_verdict(
    text: str,
    sha256: str,
    variables: dict[str, str],
    supports_system: bool,
    image_probe: bool,
    marker: str | None,
) -> _TemplateVerdict:
    """Compile and render a template on the probes, cached by everything the result depends on."""
    key = (sha256, tuple(sorted(variables.items())), supports_system, image_probe, marker)
    with _VERDICTS_LOCK:
        cached = _VERDICTS.get(key)
        if cached is not None:
            _VERDICTS.move_to_end(key)
            return cached
    verdict = _render_probes(text, variables, supports_system, image_probe, marker)
    with _VERDICTS_LOCK:
        _VERDICTS[key] = verdict
        while len(_VERDICTS) > _VERDICTS_MAX:
            _VERDICTS.popitem(last=False)
    return verdict


def _render_probes(
    text: str, variables: dict[str, str], supports_system: bool, image_probe: bool, marker: str | None
) -> _TemplateVerdict:
    problems: list[tuple[str, tuple[str, ...], str]] = []
    where = ("mlx", "chat_template", "text")
    try:
        compile_template(text)
    except TemplateError as exc:
        return _TemplateVerdict(
            ((("template-error", where, f"the chat template does not compile: {exc}"),)), None
        )
    rendered: str | None = None
    probe = PROBE_TEXT if supports_system else PROBE_TEXT_NO_SYSTEM
    try:
        rendered = render_chat(text, probe, variables=variables)
    except TemplateError as exc:
        hint = ""
        if supports_system:
            try:
                render_chat(text, PROBE_TEXT_NO_SYSTEM, variables=variables)
                hint = (
                    " (it renders without the system message: set mlx.chat_template.supports_system: false)"
                )
            except TemplateError:
                pass
        problems.append(("template-error", where, f"the chat template fails the text probe: {exc}{hint}"))
    if rendered is not None:
        missing = [text for text in _USER_PROBE_TEXTS if text not in rendered]
        if missing:
            problems.append(
                (
                    "template-error",
                    where,
                    f"the rendered text probe lacks the user's message {missing[0]!r}: "
                    "the template drops conversation content",
                )
            )
    if image_probe:
        problems.extend(_image_probe(text, variables, marker))
    return _TemplateVerdict(tuple(problems), rendered)


def _image_probe(
    text: str, variables: dict[str, str], marker: str | None
) -> list[tuple[str, tuple[str, ...], str]]:
    where = ("mlx", "chat_template", "text")
    try:
        with_image = render_chat(text, PROBE_IMAGE, variables=variables)
        text_only = render_chat(text, _IMAGE_PROBE_TEXT_ONLY, variables=variables)
    except TemplateError as exc:
        return [("template-image", where, f"the chat template fails the image probe: {exc}")]
    if marker is None:
        return [
            (
                "template-image",
                ("mlx", "media"),
                "an mlx-vlm config must record the image marker "
                "(mlx.media.marker or mlx.media.image_token) so the image probe can prove images reach the prompt",
            )
        ]
    if with_image.count(marker) <= text_only.count(marker):
        return [
            (
                "template-image",
                where,
                f"the image probe does not show the image marker {marker!r}: "
                "images would be dropped silently",
            )
        ]
    return []


# ----------------------------------------------------------------------------------------------- stop set
def declared_end_tokens(config: ModelConfig) -> list[tuple[str, str]]:
    """(what, token text) for every declared end token: the tokenizer's eos_token and any declared end-of-turn."""
    declared: list[tuple[str, str]] = []
    eos = config.mlx.chat_template.variables.get("eos_token")
    if eos:
        declared.append(("the tokenizer's eos_token", eos))
    for token in config.mlx.stop_tokens:
        if token.text and any(source.endswith(":eot_token") for source in token.sources):
            declared.append(("the declared end-of-turn token", token.text))
    decision = config.mlx.decisions.get("stop_tokens")
    for evidence in decision.evidence if decision else []:
        if evidence.field == "eot_token" and evidence.value:
            declared.append(
                (f"the declared end-of-turn token (per {evidence.source}:eot_token)", evidence.value)
            )
    seen: set[str] = set()
    unique = []
    for what, text in declared:
        if text not in seen:
            seen.add(text)
            unique.append((what, text))
    return unique


def _stop_problems(config: ModelConfig, rendered: str | None) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(severity, code, where, message) for the stop set: non-empty, consistent, covering the declared end tokens."""
    problems: list[tuple[str, str, tuple[str, ...], str]] = []
    tokens = config.mlx.stop_tokens
    if not tokens and not config.stopwords:
        return [
            (
                "error",
                "stop-set",
                ("mlx", "stop_tokens"),
                "the stop set is empty: generation would run to max_tokens (mlx.stop_tokens and stopwords)",
            )
        ]
    if not tokens:
        problems.append(
            (
                "warning",
                "stop-set",
                ("stopwords",),
                "no stop token ids (mlx.stop_tokens): the runtime can only stop on strings",
            )
        )
    vocab = config.mlx.vocab_size
    for token in tokens:
        if vocab is not None and token.id >= vocab:
            problems.append(
                (
                    "error",
                    "stop-set",
                    ("mlx", "stop_tokens"),
                    f"stop token id {token.id} is outside the vocabulary (mlx.vocab_size {vocab}): the model "
                    "can never generate it",
                )
            )
        if token.text and token.text not in config.stopwords:
            problems.append(
                (
                    "error",
                    "stopwords",
                    ("stopwords",),
                    f"stopwords lacks {token.text!r} (stop token {token.id}): LocalAI stops on stopwords",
                )
            )
    stop_texts = {t.text for t in tokens if t.text} | set(config.stopwords)
    for what, text in declared_end_tokens(config):
        if text not in stop_texts:
            kind, _, origin = what.partition(" (")
            origin = f" ({origin}" if origin else ""
            problems.append(
                (
                    "error",
                    "stop-set",
                    ("mlx", "stop_tokens"),
                    f"{kind} {text!r}{origin} is not in the stop set: generation would run past the end "
                    "of the turn",
                )
            )
    if rendered is not None:
        at = rendered.find(_ASSISTANT_PROBE_TEXT)
        after = rendered[at + len(_ASSISTANT_PROBE_TEXT) :].lstrip(" \t\r\n") if at >= 0 else ""
        declared = {text for _, text in declared_end_tokens(config)}
        if (
            after
            and not any(after.startswith(s) for s in stop_texts if s)
            and not any(after.startswith(d) for d in declared)
        ):
            problems.append(
                (
                    "warning",
                    "stop-set",
                    ("mlx", "stop_tokens"),
                    f"assistant turns end with {after[:24]!r}, which no stop token or declared eos/eot "
                    "matches: check that the stop set covers the end of a turn",
                )
            )
    return problems


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
        verdict = _template_verdict(
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

    for severity, code, where, message in _stop_problems(config, rendered):
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
