"""Decide whether loading the checkpoint needs the repo's own Python code (`trust_remote_code`).

The tokenizer needs it when tokenizer_config.json maps AutoTokenizer to a module of the repo and names that
module's class as its `tokenizer_class` (transformers has no class of that name to fall back to); the model
needs it when mlx-lm would build it from the checkpoint's own module (`model_file`). The runtime keeps
`trust_remote_code` off unless the config pins it on, so the importer says so at import time instead of
leaving a config that only fails at load.
"""

from __future__ import annotations

import dataclasses

from gallery.config import Decision, Evidence
from gallery.families import LibrarySupport
from importers.metadata import RepoMetadata

HOW_TO_ENABLE = (
    "`gallery import … --trust-remote-code` pins it on (review the repo's code first), or set "
    "`mlx.trust_remote_code: true` in the config, or the load option `trust_remote_code:true`"
)


@dataclasses.dataclass
class RemoteCodeDecision:
    """Which parts need remote code, whether it is pinned on, and what to tell the user."""

    needed: list[str]
    trusted: bool
    decision: Decision | None
    warnings: list[str]


def _tokenizer_code(meta: RepoMetadata) -> str | None:
    """`module.Class` of the repo's own tokenizer when the tokenizer cannot load without it, else None."""
    tokenizer_config = meta.json_object("tokenizer_config.json") or {}
    auto_map = tokenizer_config.get("auto_map")
    if not isinstance(auto_map, dict):
        return None
    entry = auto_map.get("AutoTokenizer")
    paths = [p for p in (entry if isinstance(entry, list) else [entry]) if isinstance(p, str) and p]
    if not paths:
        return None
    named = tokenizer_config.get("tokenizer_class")
    for path in paths:
        cls = path.rsplit(".", 1)[-1]
        # transformers falls back to its own class of that name when it has one; a custom name has none.
        if not isinstance(named, str) or named in (cls, cls.removesuffix("Fast")):
            return path.split("--")[-1]
    return None


def decide_remote_code(meta: RepoMetadata, support: LibrarySupport, *, trusted: bool) -> RemoteCodeDecision:
    """Whether the chosen backend's load needs trust_remote_code (tokenizer or model code), and the warning."""
    evidence: list[Evidence] = []
    needed: list[str] = []
    tokenizer = _tokenizer_code(meta)
    if tokenizer:
        needed.append(f"the tokenizer ({tokenizer}, tokenizer_config.json auto_map)")
        evidence.append(
            Evidence(
                source="tokenizer_config.json",
                field="auto_map.AutoTokenizer",
                detail=f"{tokenizer}: the repo's own tokenizer code",
                value=tokenizer,
            )
        )
    if support.custom_code:
        needed.append(f"the model ({support.custom_code}, config.json model_file)")
        evidence.append(
            Evidence(
                source="config.json",
                field="model_file",
                detail=f"{support.custom_code}: {support.library} builds the model from the repo's own module",
            )
        )
    if not needed:
        return RemoteCodeDecision([], trusted, None, [])
    if trusted:
        evidence.insert(0, Evidence(source="cli", field="--trust-remote-code", detail="turned on explicitly"))
        value = "on (requested): " + "; ".join(needed)
        warnings = [
            f"trust_remote_code is pinned on: loading runs the repo's own code for {'; '.join(needed)}"
        ]
    else:
        value = "needed, but off: " + "; ".join(needed)
        warnings = [
            f"loading needs trust_remote_code for {' and '.join(needed)}, and it is off: the load will fail "
            f"until it is on — {HOW_TO_ENABLE}"
        ]
    return RemoteCodeDecision(needed, trusted, Decision(value=value, evidence=evidence), warnings)
