"""The one YAML module: reading and writing for configs and catalogs.

Writing is deterministic (schema key order, templates as `|` block literals) so a re-import that
changed nothing produces a byte-identical file and a review diff shows only real changes.

Reading is one loader for every file, so a config gets the same verdict from `run`, `explain`, `serve` and
`validate`: safe (no Python object tags), a single document, no anchors, aliases or merge keys (a config
reads top to bottom, as this project writes it), and duplicate keys collected with their lines (one
duplicate once broke LocalAI's whole gallery listing) — a config with one is refused, a catalog reports
them all. It is built for catalogs of thousands of entries carrying megabytes of chat templates:
libyaml's parser when present, one pass that builds the data, and the key-path → line map computed only
when a problem needs a line (a clean file never pays for it).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from yaml.emitter import ScalarAnalysis

from gallery.errors import BadConfig, OutputExists, WriteFailed

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
        # Read back with the loader the files are read with: libyaml refuses some blocks PyYAML accepts
        # (a line of only a tab).
        return yaml.load(dumped, Loader=_BaseLoader) == {"k": text}
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


# ----- reading -----
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS: dict[str, str] = {}  # plain scalar text -> resolved tag (keys, numbers, booleans repeat a lot)
_PLAIN_TAGS_MAX = 50_000


class YamlDocument:
    """A parsed YAML document: its data, the duplicate keys found, and (on demand) the line of every key path."""

    def __init__(
        self,
        data: Any,
        duplicates: list[tuple[PathKey, int, str]],
        text: str | None = None,
        lines: dict[PathKey, int] | None = None,
    ) -> None:
        self.data = data
        self.duplicates = duplicates
        self._text = text
        self._lines = lines

    @property
    def lines(self) -> dict[PathKey, int]:
        """Key path -> line, computed (by parsing again, with tracking) the first time it is needed."""
        if self._lines is None:
            self._lines = _parse(self._text, track_lines=True)[2] if self._text is not None else {}
            self._text = None
        return self._lines

    def line(self, *path: str | int) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        lines = self.lines
        key: PathKey = tuple(path)
        while key:
            if key in lines:
                return lines[key]
            key = key[:-1]
        return lines.get(())


class _CollectingLoader(_BaseLoader):
    """Safe loader that builds the data and collects duplicate keys in one pass (key lines optionally).

    PyYAML's own constructor walks the node graph a second time through generic machinery; catalogs are
    plain maps, lists and strings, so those are built here directly and only other scalars (numbers,
    booleans, null, timestamps) go through the safe constructor.
    """

    def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
        # Same answers as the base resolver (SafeLoader has no path resolvers), with quoted and block scalars
        # short-circuited to str and plain scalars memoized.
        if kind is yaml.ScalarNode:
            if not implicit[0]:
                return _STR_TAG
            tag = _PLAIN_TAGS.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(_PLAIN_TAGS) < _PLAIN_TAGS_MAX:
                    _PLAIN_TAGS[value] = tag
            return tag
        return super().resolve(kind, value, implicit)

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        return None  # no path resolvers: nothing to track

    def ascend_resolver(self) -> None:
        return None

    def build(
        self, root: yaml.Node, lines: dict[PathKey, int] | None
    ) -> tuple[Any, list[tuple[PathKey, int, str]]]:
        """The document's data and its duplicate keys; fills `lines` when given."""
        duplicates: list[tuple[PathKey, int, str]] = []
        seen: set[int] = set()
        holder: list[Any] = [None]
        # (node, path, container, slot): put the built value of node into container[slot].
        stack: list[tuple[yaml.Node, PathKey, Any, Any]] = [(root, (), holder, 0)]
        while stack:
            node, path, container, slot = stack.pop()
            if id(node) in seen:
                raise YamlError("anchors and aliases are not allowed", node.start_mark.line + 1)
            seen.add(id(node))
            if lines is not None and path not in lines:
                lines[path] = node.start_mark.line + 1
            if isinstance(node, yaml.ScalarNode):
                container[slot] = (
                    node.value if node.tag == _STR_TAG else self.construct_object(node, deep=True)
                )
            elif isinstance(node, yaml.MappingNode):
                if node.tag != _MAP_TAG:
                    raise YamlError(f"tag {node.tag} is not allowed", node.start_mark.line + 1)
                mapping: dict[Any, Any] = {}
                container[slot] = mapping
                first_line: dict[Any, int] = {}
                last: dict[Any, yaml.Node] = {}
                for key_node, value_node in node.value:
                    if not isinstance(key_node, yaml.ScalarNode):
                        raise YamlError("mapping keys must be plain scalars", key_node.start_mark.line + 1)
                    if key_node.tag == _MERGE_TAG or key_node.value == "<<":
                        raise YamlError("merge keys (<<) are not allowed", key_node.start_mark.line + 1)
                    key = key_node.value if key_node.tag == _STR_TAG else self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    if key in first_line:
                        duplicates.append(
                            ((*path, key), line, f"duplicate key {key!r} (first at line {first_line[key]})")
                        )
                        if lines is not None:
                            key_path = (*path, key)
                            lines[key_path] = line
                    else:
                        first_line[key] = line
                        if lines is not None:
                            lines.setdefault((*path, key), line)
                    mapping[key] = None
                    last[key] = value_node  # the last value of a duplicated key wins, as in PyYAML
                for key, value_node in last.items():
                    if type(value_node) is yaml.ScalarNode and value_node.tag == _STR_TAG:
                        # Most values are strings: set them here instead of a round trip through the stack.
                        if id(value_node) in seen:
                            raise YamlError(
                                "anchors and aliases are not allowed", value_node.start_mark.line + 1
                            )
                        seen.add(id(value_node))
                        mapping[key] = value_node.value
                    else:
                        stack.append((value_node, (*path, key), mapping, key))
            elif isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ_TAG:
                    raise YamlError(f"tag {node.tag} is not allowed", node.start_mark.line + 1)
                items: list[Any] = [None] * len(node.value)
                container[slot] = items
                for index, item in enumerate(node.value):
                    if lines is not None:
                        item_path = (*path, index)
                        lines[item_path] = item.start_mark.line + 1
                    stack.append((item, (*path, index), items, index))
            else:  # pragma: no cover - the composer only makes the three kinds
                raise YamlError(f"unexpected YAML node {type(node).__name__}", node.start_mark.line + 1)
        return holder[0], duplicates


def _parse(text: str, *, track_lines: bool) -> tuple[Any, list[tuple[PathKey, int, str]], dict[PathKey, int]]:
    loader = _CollectingLoader(text)
    lines: dict[PathKey, int] | None = {} if track_lines else None
    try:
        if not loader.check_node():
            return None, [], {}
        node = loader.get_node()
        if loader.check_node():
            raise YamlError("expected one YAML document, found several")
        if node is None:
            return None, [], {}
        data, duplicates = loader.build(node, lines)
        return data, duplicates, lines or {}
    except (yaml.YAMLError, RecursionError, MemoryError) as exc:
        raise yaml_error(exc) from None
    finally:
        loader.dispose()


def read_yaml_document(text: str, *, track_lines: bool = False) -> YamlDocument:
    """Parse one YAML document safely. Raises YamlError (with a line when known) when it cannot be read.

    Key lines are computed lazily (YamlDocument.lines) unless track_lines asks for them now.
    """
    data, duplicates, lines = _parse(text, track_lines=track_lines)
    return YamlDocument(data, duplicates, None if track_lines else text, lines if track_lines else None)


def yaml_error(exc: BaseException) -> YamlError:
    """One-line YamlError (with the line when PyYAML knows it) for a failure while loading YAML."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        return YamlError(f"invalid YAML: {' '.join(problem.split())}", mark.line + 1 if mark else None)
    if isinstance(exc, yaml.YAMLError):
        return YamlError(f"invalid YAML: {' '.join(str(exc).split())}")
    return YamlError("invalid YAML: nested too deeply or too large")  # RecursionError, MemoryError


def atomic_write(path: Path, text: str, *, overwrite: bool = True, create_parents: bool = False) -> None:
    """Write text to path through a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and an interrupted write leaves the old file (or none).
    With overwrite=False an existing file is never replaced (OutputExists). A missing folder is an error
    unless create_parents; any other failure (disk full, permissions) is WriteFailed, and no partial
    file is left behind.
    """
    path = Path(path)
    try:
        if create_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            raise WriteFailed(path, f"the folder {path.parent} does not exist")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteFailed.from_os_error(path, exc) from None
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
    except FileExistsError:
        _remove(tmp_name)
        raise OutputExists(f"{path} exists; use --force to replace it", path=path) from None
    except OSError as exc:
        _remove(tmp_name)
        raise WriteFailed.from_os_error(path, exc) from None
    except BaseException:
        _remove(tmp_name)
        raise


def _remove(name: str) -> None:
    if os.path.exists(name):
        os.unlink(name)


def read_yaml_file(path: str | Path, *, limit: int, what: str) -> YamlDocument:
    """Read and parse a UTF-8 YAML file. Raises BadConfig (with file and line) when it cannot be read or parsed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise BadConfig(f"{size} bytes is too large for a {what} (limit {limit})", file=path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadConfig("no such file", file=path) from None
    except IsADirectoryError:
        raise BadConfig(f"is a folder, not a {what}", file=path) from None
    except UnicodeDecodeError:
        raise BadConfig("not UTF-8 text", file=path) from None
    except OSError as exc:
        raise BadConfig(f"cannot read ({exc.strerror})", file=path) from None
    try:
        return read_yaml_document(text)
    except YamlError as exc:
        raise BadConfig(str(exc), file=path, line=exc.line) from None
