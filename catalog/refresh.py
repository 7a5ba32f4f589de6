"""`gallery refresh`: re-import catalog entries against the Hub and report how each drifted from its pins.

Each entry is re-imported at the revision it tracks (`mlx.source.requested_revision`, else main) with the
same importer `gallery add` uses, a few entries at a time. Drift is any difference the rewrite would make,
described by what matters to a user: a new commit, changed file hashes, added or removed files, a changed
stop set, chat template, backend or context size, then any other config field. Curated fields (the index
description, icon, tags and urls, the config's description and options, `accept_missing`, a forced backend)
are carried over, not reported. A network error on one entry is reported for that entry; the others go on.

Exit codes: 15 when any entry drifted (with or without --write: the catalog was stale when the run
started); else the exit code of the first entry that failed (e.g. 7 network, 4 gated); else 0.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from catalog.build import build_entry
from catalog.index import Catalog, Entry, write_catalog
from gallery.config import ModelConfig, StopToken
from gallery.errors import BadConfig, DriftDetected, GalleryError, UsageError

DEFAULT_JOBS = 4
_COVERED = {
    "name",
    "backend",
    "context_size",
    "description",
    "options",
    "stopwords",
    "mlx.source",
    "mlx.files",
    "mlx.total_size",
    "mlx.stop_tokens",
    "mlx.chat_template",
    "mlx.decisions.revision",
}
# A decision record changes with the value it explains: not worth a second line when that value's change is shown.
_DECISION_OF = {
    "stop set": "stop_tokens",
    "chat template": "chat_template",
    "backend": "backend",
    "context size": "context_size",
}


@dataclasses.dataclass
class EntryRefresh:
    """The outcome for one entry."""

    name: str
    status: Literal["up-to-date", "drifted", "error"]
    changes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    exit_code: int = 0
    new_entry: Entry | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready outcome."""
        data: dict[str, Any] = {"name": self.name, "status": self.status, "changes": self.changes}
        if self.error is not None:
            data.update(error=self.error, exit_code=self.exit_code)
        return data


@dataclasses.dataclass
class RefreshReport:
    """Every entry's outcome, in catalog order, and whether the catalog was rewritten."""

    results: list[EntryRefresh]
    written: list[str] = dataclasses.field(default_factory=list)

    def exit_code(self) -> int:
        """15 on any drift; else the first failure's exit code; else 0."""
        if any(r.status == "drifted" for r in self.results):
            return DriftDetected.exit_code
        return next((r.exit_code for r in self.results if r.status == "error"), 0)


def _stop_text(tokens: list[StopToken]) -> str:
    return "[" + ", ".join(f"{t.id} {t.text!r}" if t.text else str(t.id) for t in tokens) + "]"


def _template_label(config: ModelConfig) -> str:
    template = config.mlx.chat_template
    return f"sha256 {template.sha256[:12]}" if template.sha256 else template.status


def _changed_paths(old: Any, new: Any, prefix: str, depth: int) -> list[str]:
    """Dotted key paths whose values differ, descending `depth` levels into mappings."""
    if old == new:
        return []
    if depth == 0 or not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix]
    paths = []
    for key in list(old) + [k for k in new if k not in old]:
        path = f"{prefix}.{key}" if prefix else str(key)
        paths.extend(_changed_paths(old.get(key), new.get(key), path, depth - 1))
    return paths


def describe_drift(old: Entry, new: Entry) -> list[str]:
    """Human descriptions of every difference between a stored entry and its re-import (empty: no drift)."""
    changes: list[str] = []
    o, n = old.config, new.config
    if o.mlx.source.revision != n.mlx.source.revision:
        changes.append(
            f"new commit: {(o.mlx.source.revision or '-')[:12]} → {(n.mlx.source.revision or '-')[:12]}"
        )
    old_files = {f.filename: f.sha256 for f in old.meta.files}
    new_files = {f.filename: f.sha256 for f in new.meta.files}
    changed = [p for p in old_files if p in new_files and old_files[p] != new_files[p]]
    if changed:
        changes.append(f"file hash changed: {', '.join(changed)}")
    added = [p for p in new_files if p not in old_files]
    removed = [p for p in old_files if p not in new_files]
    if added:
        changes.append(f"files added: {', '.join(added)}")
    if removed:
        changes.append(f"files removed: {', '.join(removed)}")
    if [(t.id, t.text) for t in o.mlx.stop_tokens] != [
        (t.id, t.text) for t in n.mlx.stop_tokens
    ] or o.stopwords != n.stopwords:
        changes.append(f"stop set: {_stop_text(o.mlx.stop_tokens)} → {_stop_text(n.mlx.stop_tokens)}")
    if (o.mlx.chat_template.status, o.mlx.chat_template.sha256) != (
        n.mlx.chat_template.status,
        n.mlx.chat_template.sha256,
    ):
        changes.append(f"chat template: {_template_label(o)} → {_template_label(n)}")
    elif o.mlx.chat_template != n.mlx.chat_template:
        changes.append("chat template settings changed (same text)")
    if o.backend != n.backend:
        changes.append(f"backend: {o.backend} → {n.backend}")
    if o.context_size != n.context_size:
        changes.append(f"context size: {o.context_size} → {n.context_size}")
    covered = _COVERED | {
        f"mlx.decisions.{key}"
        for label, key in _DECISION_OF.items()
        if any(change.startswith(label) for change in changes)
    }
    other = [
        p
        for p in _changed_paths(o.to_data(), n.to_data(), "", 3)
        if not any(p == c or p.startswith(c + ".") for c in covered)
    ]
    if other:
        changes.append(f"other config fields: {', '.join(other)}")
    derived = {
        "files",
        "config",
        "config_file",
    }  # config_file is LocalAI's view of the config: compared above
    meta_old = old.meta.model_dump(exclude=derived)
    meta_new = new.meta.model_dump(exclude=derived)
    meta_changed = [key for key in meta_old if meta_old[key] != meta_new[key]]
    if meta_changed:
        changes.append(f"index fields: {', '.join(meta_changed)}")
    return changes


def _forced_backend(config: ModelConfig) -> str | None:
    decision = config.mlx.decisions.get("backend")
    if decision and decision.evidence and decision.evidence[0].source == "cli":
        return config.backend
    return None


def refresh_entry(
    entry: Entry, *, token: str | bool | None = None, cache_dir: Path | None = None
) -> EntryRefresh:
    """Re-import one entry and compare. Never raises a GalleryError: failures become an 'error' outcome."""
    config = entry.config
    source = config.mlx.source
    if source.repo is None:
        return EntryRefresh(
            entry.name,
            "error",
            error="the entry has no Hub repo to refresh from",
            exit_code=BadConfig.exit_code,
        )
    index_sha = {f.filename: f.sha256 for f in entry.meta.files}
    known = {f.blob_id: index_sha[f.path] for f in config.mlx.files if f.blob_id and f.path in index_sha}
    try:
        built = build_entry(
            source.repo,
            name=entry.name,
            revision=source.requested_revision,
            backend=_forced_backend(config),
            description=config.description,
            options=list(config.options),
            accept_missing_template=config.mlx.chat_template.accept_missing,
            token=token,
            cache_dir=cache_dir,
            known_sha256=known,
            inline=entry.config_ref is None,
            drafter=config.mlx.drafter is not None and config.mlx.drafter.repo is not None,
        )
    except GalleryError as exc:
        return EntryRefresh(entry.name, "error", error=str(exc), exit_code=exc.exit_code)
    meta = built.entry.meta.model_copy(
        update={
            "description": entry.meta.description,
            "icon": entry.meta.icon,
            "tags": list(entry.meta.tags),
            "urls": list(entry.meta.urls),
            "config": entry.config_ref if entry.config_ref is not None else built.entry.config.to_data(),
        }
    )
    new_entry = Entry(meta=meta, config=built.entry.config, config_ref=entry.config_ref)
    changes = describe_drift(entry, new_entry)
    return EntryRefresh(
        entry.name, "drifted" if changes else "up-to-date", changes=changes, new_entry=new_entry
    )


def select_entries(catalog: Catalog, names: Iterable[str]) -> list[Entry]:
    """The entries to refresh: all, or the named ones (an unknown or invalid name is an error up front)."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return list(catalog.entries)
    return [catalog.get(name) for name in wanted]


def refresh_catalog(
    catalog: Catalog,
    names: Iterable[str] = (),
    *,
    write: bool = False,
    jobs: int = DEFAULT_JOBS,
    token: str | bool | None = None,
    cache_dir: Path | None = None,
) -> RefreshReport:
    """Refresh the selected entries with at most `jobs` imports in flight; with write, rewrite drifted ones."""
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    selected = select_entries(catalog, names)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(jobs, max(1, len(selected)))) as pool:
        results = list(pool.map(lambda e: refresh_entry(e, token=token, cache_dir=cache_dir), selected))
    report = RefreshReport(results=results)
    drifted = {r.name: r.new_entry for r in results if r.status == "drifted" and r.new_entry is not None}
    if write and drifted:
        entries = [drifted.get(entry.name, entry) for entry in catalog.entries]
        write_catalog(catalog.path, entries, changed=set(drifted), expect_fingerprint=catalog.fingerprint)
        report.written = list(drifted)
    return report


def format_refresh(report: RefreshReport, *, as_json: bool, write: bool) -> str:
    """The report as text (an entry per block) or JSON."""
    if as_json:
        return (
            json.dumps(
                {
                    "exit_code": report.exit_code(),
                    "written": report.written,
                    "entries": [r.as_dict() for r in report.results],
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
    lines = []
    for result in report.results:
        if result.status == "error":
            lines.append(f"{result.name}: error (exit {result.exit_code}): {result.error}")
            continue
        lines.append(f"{result.name}: {result.status}")
        lines.extend(f"  - {change}" for change in result.changes)
    counts = {
        status: sum(1 for r in report.results if r.status == status)
        for status in ("drifted", "up-to-date", "error")
    }
    summary = (
        f"{len(report.results)} entries: {counts['drifted']} drifted, {counts['up-to-date']} up to date, "
        f"{counts['error']} failed"
    )
    if report.written:
        summary += f"; rewrote {len(report.written)} entr{'y' if len(report.written) == 1 else 'ies'}"
    elif counts["drifted"] and not write:
        summary += "; run with --write to update them"
    lines.append(summary)
    return "\n".join(lines) + "\n"
