"""Pin a documented drafter for an imported model: the pairings are data (`importers/drafters.yaml`), the checks
are mlx-vlm's rules (gallery.drafters), and the drafter's own files decide.

A model matches a pairing by its model type and a name its repo contains as a whole word
(`mlx-community/gemma-4-E4B-it-qat-4bit` contains `gemma-4-E4B-it`). The drafter repo is then read like any
import (model info and its small files, at one commit, through the one Hub module); it is pinned — repo, commit,
kind, model type, its weights and config with sha256 — only when its config agrees with the kind and the target's
sizes. When it cannot be read (offline, not on this hub) or disagrees, the pairing is recorded as a suggestion
with the reason, and a warning says so: never a silent guess.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from gallery.config import Decision, Drafter, Evidence, ModelConfig, RepoFile
from gallery.drafters import drafter_model_type, pairing_problem, size_problem
from gallery.errors import GalleryError
from gallery.yamlio import read_yaml_document

PAIRINGS_FILE = Path(__file__).with_name("drafters.yaml")
DATA_SOURCE = "importers/drafters.yaml"


@dataclasses.dataclass(frozen=True)
class Pairing:
    """One documented pairing."""

    model_type: str
    name: str
    drafter: str
    kind: str
    evidence: str

    def matches(self, model_type: str | None, repo_id: str) -> bool:
        """Whether a model of this type, from this repo, is the pairing's target."""
        if model_type != self.model_type:
            return False
        pattern = rf"(?i)(?:^|[/_.-]){re.escape(self.name)}(?:$|[_.-])"
        return re.search(pattern, repo_id) is not None and repo_id.lower() != self.drafter.lower()


@functools.lru_cache(maxsize=1)
def pairings() -> tuple[Pairing, ...]:
    """The documented pairings, in preference order."""
    data = read_yaml_document(PAIRINGS_FILE.read_text(encoding="utf-8")).data
    rows = data.get("pairings") if isinstance(data, dict) else None
    found = []
    for row in rows or []:
        target = row["target"]
        found.append(
            Pairing(
                str(target["model_type"]), str(target["name"]), row["drafter"], row["kind"], row["evidence"]
            )
        )
    return tuple(found)


def matching(config: ModelConfig) -> list[Pairing]:
    """The documented drafters for a config (Hub imports of mlx-vlm models only)."""
    repo = config.mlx.source.repo
    if repo is None or config.backend != "mlx-vlm":
        return []
    return [p for p in pairings() if p.matches(config.mlx.model_type, repo)]


def _drafter_pin(
    pairing: Pairing, target_config: dict[str, Any], **fetch_options: Any
) -> tuple[Drafter, list[Evidence]]:
    """Read the drafter repo and build its pin; raises ValueError (why it cannot be pinned) or GalleryError."""
    from importers.fetch import fetch
    from importers.source import ModelSource

    snapshot = fetch(ModelSource(repo_id=pairing.drafter), **fetch_options)
    raw = snapshot.files.get("config.json")
    if raw is None or snapshot.commit is None:
        raise ValueError(f"{pairing.drafter} has no readable config.json")
    drafter_config = json.loads(raw)
    model_type = drafter_model_type(drafter_config)
    problem = pairing_problem(target_config.get("model_type"), pairing.kind, model_type) or size_problem(
        target_config, drafter_config, model_type, pairing.kind
    )
    if problem:
        raise ValueError(problem)
    files = []
    for path, meta in sorted(snapshot.listing.items()):
        read = snapshot.files.get(path)
        if path.endswith(".safetensors") and meta.sha256:
            files.append(RepoFile(path=path, size=meta.size, sha256=meta.sha256, blob_id=meta.blob_id))
        elif path.endswith(".json") and read is not None:  # small git files: hashed from the bytes read
            files.append(
                RepoFile(
                    path=path, size=meta.size, sha256=hashlib.sha256(read).hexdigest(), blob_id=meta.blob_id
                )
            )
    if not any(f.path.endswith(".safetensors") for f in files):
        raise ValueError(
            f"{pairing.drafter}@{snapshot.commit[:12]} lists no .safetensors weights with a sha256"
        )
    evidence = [
        Evidence(
            source=f"{pairing.drafter}:config.json",
            field="model_type",
            detail=f"the drafter is a {model_type} (mlx-vlm runs it with kind {pairing.kind}); its sizes match",
            value=model_type,
            strength="decisive",
        )
    ]
    pin = Drafter(
        repo=pairing.drafter,
        revision=snapshot.commit,
        kind=pairing.kind,  # type: ignore[arg-type]  # checked against DRAFTER_KINDS by pairing_problem
        model_type=model_type,
        files=files,
    )
    return pin, evidence


def suggest_drafter(config: ModelConfig) -> ModelConfig:
    """The config with its documented drafters recorded as a suggestion (no network; `--drafter` pins one)."""
    candidates = matching(config)
    if not candidates:
        return config
    mlx = config.mlx.model_copy(deep=True)
    mlx.decisions["drafter"] = Decision(
        value="suggested (import with --drafter to pin): "
        + ", ".join(f"{p.drafter} ({p.kind})" for p in candidates),
        evidence=[
            Evidence(source=DATA_SOURCE, field=p.drafter, detail=p.evidence, strength="medium")
            for p in candidates
        ],
    )
    return config.model_copy(update={"mlx": mlx})


def pin_drafter(
    config: ModelConfig, target_config: dict[str, Any], warnings: list[str], **fetch_options: Any
) -> ModelConfig:
    """The config with the first documented drafter that verifies pinned (or a suggestion recorded)."""
    candidates = matching(config)
    if not candidates:
        return config
    evidence: list[Evidence] = []
    conflicts: list[str] = []
    pinned: Drafter | None = None
    for pairing in candidates:
        evidence.append(
            Evidence(source=DATA_SOURCE, field=pairing.drafter, detail=pairing.evidence, strength="medium")
        )
        try:
            pin, found = _drafter_pin(pairing, target_config, **fetch_options)
        except (GalleryError, ValueError, KeyError) as exc:
            conflicts.append(
                f"{pairing.drafter} ({pairing.kind}) not pinned: {' '.join(str(exc).split())[:300]}"
            )
            continue
        pinned = pin
        evidence.extend(found)
        break
    mlx = config.mlx.model_copy(deep=True)
    if pinned is not None:
        mlx.drafter = pinned
        value = f"{pinned.repo}@{(pinned.revision or '')[:12]} ({pinned.kind})"
    else:
        value = "suggested: " + ", ".join(f"{p.drafter} ({p.kind})" for p in candidates)
        warning = (
            f"documented drafter(s) for this model could not be pinned ({'; '.join(conflicts)}); "
            "pin one by hand in mlx.drafter, or re-import when the Hub is reachable"
        )
        warnings.append(warning)
        mlx.warnings = [*mlx.warnings, warning]
    mlx.decisions["drafter"] = Decision(value=value, evidence=evidence, conflicts=conflicts)
    return config.model_copy(update={"mlx": mlx})
