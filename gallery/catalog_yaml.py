"""Fast, line-tracking YAML reading for catalogs, where every problem must be reported, not just the first.

Like `gallery.yamlio.load_yaml` (safe, single document, no merge keys, a line for every key path), but:
duplicate keys are collected instead of stopping at the first one, so a catalog with two bad entries
shows both and the rest of the file is still checked (the last value wins, as in PyYAML); anchors and
aliases are refused (an alias bomb cannot blow up the walk); and libyaml's C parser is used when present,
because a catalog of thousands of entries carries megabytes of chat templates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from gallery.yamlio import PathKey, YamlError

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclasses.dataclass
class YamlDocument:
    """A parsed YAML document: its data, the line of every key path, and the duplicate keys found."""

    data: Any
    lines: dict[PathKey, int]
    duplicates: list[tuple[PathKey, int, str]]  # (path of the mapping key, line, message)

    def line(self, *path: str | int) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        key: PathKey = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get(())


class _CollectingLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that records key lines and collects duplicate keys instead of raising."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: dict[PathKey, int] = {}
        self.duplicates: list[tuple[PathKey, int, str]] = []
        self._seen_nodes: set[int] = set()

    def walk(self, root: yaml.Node) -> None:
        # Iterative, so a deeply nested document cannot exhaust the Python stack.
        stack: list[tuple[yaml.Node, PathKey]] = [(root, ())]
        while stack:
            node, path = stack.pop()
            if id(node) in self._seen_nodes:
                raise YamlError("anchors and aliases are not allowed", node.start_mark.line + 1)
            self._seen_nodes.add(id(node))
            self.lines.setdefault(path, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, value_node in node.value:
                    if not isinstance(key_node, yaml.ScalarNode):
                        raise YamlError("mapping keys must be plain scalars", key_node.start_mark.line + 1)
                    key = key_node.value
                    line = key_node.start_mark.line + 1
                    if key == "<<":
                        raise YamlError("merge keys (<<) are not allowed", line)
                    if key in first_line:
                        self.duplicates.append(
                            ((*path, key), line, f"duplicate key {key!r} (first at line {first_line[key]})")
                        )
                        self.lines[(*path, key)] = line
                    else:
                        first_line[key] = line
                        self.lines.setdefault((*path, key), line)
                    stack.append((value_node, (*path, key)))
            elif isinstance(node, yaml.SequenceNode):
                for index, item in enumerate(node.value):
                    self.lines[(*path, index)] = item.start_mark.line + 1
                    stack.append((item, (*path, index)))


def read_yaml_document(text: str) -> YamlDocument:
    """Parse one YAML document safely. Raises YamlError (with a line when known) when it cannot be read."""
    loader = _CollectingLoader(text)
    try:
        if not loader.check_node():
            return YamlDocument(None, {}, [])
        node = loader.get_node()
        if loader.check_node():
            raise YamlError("expected one YAML document, found several")
        if node is None:
            return YamlDocument(None, {}, [])
        loader.walk(node)
        data = loader.construct_document(node)
        return YamlDocument(data, loader.lines, loader.duplicates)
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlError(f"invalid YAML: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {' '.join(str(exc).split())}") from None
    except (RecursionError, MemoryError):
        raise YamlError("invalid YAML: nested too deeply or too large") from None
    finally:
        loader.dispose()
