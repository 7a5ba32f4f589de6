"""YAML reading and writing for configs and catalogs.

Writing is deterministic (schema key order, templates as `|` block literals) so a re-import that
changed nothing produces a byte-identical file and a review diff shows only real changes. Reading is
safe (no Python object tags), rejects duplicate keys (one duplicate once broke LocalAI's whole gallery
listing), and remembers the line of every key so validation errors can point at it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from yaml.emitter import ScalarAnalysis

PathKey = tuple[str | int, ...]


class YamlError(ValueError):
    """A YAML document that cannot be read: syntax, duplicate keys, or a forbidden construct."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


def _printable_block(text: str) -> bool:
    """Whether text has only characters a literal block can carry (printable, tabs, line breaks)."""
    for char in text:
        code = ord(char)
        if char in "\n\t":
            continue
        if code < 0x20 or 0x7F <= code < 0xA0 or char in "\ufeff\u2028\u2029" or 0xD800 <= code < 0xE000:
            return False
    return True


class _ForceBlockDumper(yaml.SafeDumper):
    """SafeDumper that allows `|` block literals for multi-line printable strings.

    PyYAML refuses block style for a string with a space before a line break, which chat templates
    often have, and falls back to an escaped one-line string no reviewer can read.
    """

    def analyze_scalar(self, scalar: str) -> ScalarAnalysis:
        analysis = super().analyze_scalar(scalar)
        if "\n" in scalar and not analysis.allow_block and _printable_block(scalar):
            analysis.allow_block = True
        return analysis

    def ignore_aliases(self, data: Any) -> bool:
        return True  # configs must read top to bottom, without anchors


class _Dumper(_ForceBlockDumper):
    """The writer: block literals only where they provably read back byte-exact, else quoted."""

    def analyze_scalar(self, scalar: str) -> ScalarAnalysis:
        analysis = super().analyze_scalar(scalar)
        if analysis.allow_block and "\n" in scalar and not _literal_roundtrips(scalar):
            analysis.allow_block = False
        return analysis


# Characters YAML treats as line breaks or cannot carry unescaped: such strings are written double-quoted,
# where PyYAML escapes them (its plain and literal styles would read them back as other characters).
_NEEDS_ESCAPES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def _represent_str(dumper: yaml.representer.SafeRepresenter, data: str) -> yaml.ScalarNode:
    if _NEEDS_ESCAPES.search(data):
        style: str | None = '"'
    else:
        style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_ForceBlockDumper.add_representer(str, _represent_str)
_Dumper.add_representer(str, _represent_str)


def _literal_roundtrips(text: str) -> bool:
    # Edge cases (blank lines of spaces at the start, odd indentation) can make a literal block read back
    # differently; checking the round trip is cheaper than enumerating YAML's rules.
    try:
        dumped = yaml.dump({"k": text}, Dumper=_ForceBlockDumper, width=100000, allow_unicode=True)
        return yaml.safe_load(dumped) == {"k": text}
    except yaml.YAMLError:
        return False


def dump_yaml(data: Any) -> str:
    """Serialize plain data to YAML: insertion key order, block literals for multi-line strings."""
    return yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=100000,  # never fold long lines: templates and descriptions must survive byte-exact
        indent=2,
    )


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and records each mapping key's line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: dict[PathKey, int] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        self._record(node, ())
        return super().construct_document(node)

    def _record(self, node: yaml.Node, path: PathKey) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise YamlError("mapping keys must be plain scalars", key_node.start_mark.line + 1)
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key == "<<":
                    raise YamlError("merge keys (<<) are not allowed", line)
                if key in seen:
                    raise YamlError(f"duplicate key {key!r} (first at line {seen[key]})", line)
                seen[key] = line
                self.lines[(*path, key)] = line
                self._record(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self._record(item, (*path, index))


def load_yaml(text: str) -> tuple[Any, dict[PathKey, int]]:
    """Parse YAML safely. Returns the data and a map from key path to line number.

    Raises YamlError (with a line when known) for syntax errors, duplicate keys, merge keys and
    anything but a single document.
    """
    loader = _LineLoader(text)
    try:
        if not loader.check_node():
            return None, {}
        node = loader.get_node()
        if loader.check_node():
            raise YamlError("expected one YAML document, found several")
        data = loader.construct_document(node) if node is not None else None
        return data, loader.lines
    except (yaml.YAMLError, RecursionError, MemoryError) as exc:
        raise yaml_error(exc) from None
    finally:
        loader.dispose()


def yaml_error(exc: BaseException) -> YamlError:
    """One-line YamlError (with the line when PyYAML knows it) for a failure while loading YAML."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        return YamlError(f"invalid YAML: {' '.join(problem.split())}", mark.line + 1 if mark else None)
    if isinstance(exc, yaml.YAMLError):
        return YamlError(f"invalid YAML: {' '.join(str(exc).split())}")
    return YamlError("invalid YAML: nested too deeply or too large")  # RecursionError, MemoryError


def atomic_write(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write text to path through a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and an interrupted write leaves the old file (or none).
    With overwrite=False an existing file is never replaced (FileExistsError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; a config must stay readable like any other file (keep an existing mode).
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            # link() fails if the target exists, unlike rename(): no window where we clobber a file.
            os.link(tmp_name, path)
            os.unlink(tmp_name)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
