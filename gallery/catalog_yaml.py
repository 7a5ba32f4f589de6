"""Fast, line-tracking YAML reading for catalogs, where every problem must be reported, not just the first.

Like `gallery.yamlio.load_yaml` (safe, single document, no merge keys, a line for every key path), but:
duplicate keys are collected instead of stopping at the first one, so a catalog with two bad entries
shows both and the rest of the file is still checked (the last value wins, as in PyYAML); anchors,
aliases and non-standard tags are refused; and it is built for catalogs of thousands of entries that
carry megabytes of chat templates: libyaml's parser when present, one pass that builds the data, and
the key-path → line map computed only when a problem needs a line (a clean file never pays for it).
"""

from __future__ import annotations

from typing import Any

import yaml

from gallery.yamlio import PathKey, YamlError, yaml_error

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS: dict[str, str] = {}  # plain scalar text -> resolved tag (keys, numbers, booleans repeat a lot)
_PLAIN_TAGS_MAX = 50_000


class YamlDocument:
    """A parsed YAML document: its data, the duplicate keys found, and (on demand) the line of every key path."""

    def __init__(self, data: Any, duplicates: list[tuple[PathKey, int, str]], text: str | None = None,
                 lines: dict[PathKey, int] | None = None) -> None:
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


class _CollectingLoader(_BaseLoader):  # type: ignore[misc, valid-type]
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

    def build(self, root: yaml.Node, lines: dict[PathKey, int] | None) -> tuple[Any, list[tuple[PathKey, int, str]]]:
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
                container[slot] = node.value if node.tag == _STR_TAG else self.construct_object(node, deep=True)
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
                        duplicates.append(((*path, key), line, f"duplicate key {key!r} (first at line {first_line[key]})"))
                        if lines is not None:
                            lines[(*path, key)] = line
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
                            raise YamlError("anchors and aliases are not allowed", value_node.start_mark.line + 1)
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
                        lines[(*path, index)] = item.start_mark.line + 1
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
