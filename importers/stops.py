"""Decide the stop-token set: the union of every place that declares an end of sequence.

Sources, each partial on its own: the tokenizer's `eos_token`; config.json `eos_token_id` (int or
list, top-level and in language sub-configs); generation_config.json `eos_token_id` (often the most
complete); and a declared end-of-turn token (`eot_token` in newer tokenizer configs). The tokenizer's
own eos is never dropped; a token is never added just because its text looks like an end marker.
"""

from __future__ import annotations

import dataclasses

from gallery.config import Decision, Evidence, StopToken
from importers.metadata import RepoMetadata, int_ids, token_text
from importers.vocab import SpecialVocab


@dataclasses.dataclass
class StopDecision:
    """The pinned stop tokens, texts that could not be mapped to ids, and the decision record."""

    tokens: list[StopToken]
    unmapped_texts: list[str]
    eos_text: str | None
    decision: Decision
    warnings: list[str]


def decide_stops(meta: RepoMetadata, vocab: SpecialVocab) -> StopDecision:
    """Collect and merge every declared end-of-sequence token, with its id, text and sources."""
    by_id: dict[int, tuple[str | None, list[str]]] = {}
    unmapped: list[str] = []
    evidence: list[Evidence] = []
    warnings: list[str] = []

    def add_id(token_id: int, source: str, text: str | None = None) -> None:
        known_text, sources = by_id.get(token_id, (None, []))
        if source not in sources:
            sources.append(source)
        by_id[token_id] = (known_text or text, sources)

    def add_text(text: str, source: str) -> None:
        mapped = vocab.id_of(text)
        if mapped is None:
            unmapped.append(text)
            warnings.append(
                f"{source} names {text!r}, but no file maps it to an id: it stops only as a string"
            )
            return
        add_id(mapped[0], source, text)

    tokenizer_config = meta.tokenizer_config
    eos_text = token_text(tokenizer_config.get("eos_token"), "tokenizer_config.json", "eos_token")
    eos_source = "tokenizer_config.json:eos_token"
    if eos_text is None:
        eos_text = token_text(
            meta.special_tokens_map.get("eos_token"), "special_tokens_map.json", "eos_token"
        )
        eos_source = "special_tokens_map.json:eos_token"
    if eos_text is not None:
        add_text(eos_text, eos_source)
        evidence.append(
            Evidence(
                source=eos_source.split(":")[0],
                field="eos_token",
                detail=f"tokenizer eos {eos_text!r}",
                value=eos_text,
            )
        )

    for path, node in meta.sub_configs():
        field = f"{path}.eos_token_id" if path else "eos_token_id"
        ids = int_ids(node.get("eos_token_id"), "config.json", field)
        for token_id in ids:
            add_id(token_id, f"config.json:{field}")
        if ids:
            evidence.append(Evidence(source="config.json", field=field, detail=f"ids {ids}"))

    gen_ids = int_ids(meta.generation_config.get("eos_token_id"), "generation_config.json", "eos_token_id")
    for token_id in gen_ids:
        add_id(token_id, "generation_config.json:eos_token_id")
    if gen_ids:
        evidence.append(
            Evidence(source="generation_config.json", field="eos_token_id", detail=f"ids {gen_ids}")
        )

    eot_text = token_text(tokenizer_config.get("eot_token"), "tokenizer_config.json", "eot_token")
    if eot_text is not None:
        add_text(eot_text, "tokenizer_config.json:eot_token")
        evidence.append(
            Evidence(
                source="tokenizer_config.json",
                field="eot_token",
                detail=f"declared end-of-turn token {eot_text!r}",
                value=eot_text,
            )
        )

    tokens: list[StopToken] = []
    for token_id in sorted(by_id):
        text, sources = by_id[token_id]
        if text is None:
            found = vocab.text_of(token_id)
            text = found[0] if found else None
        if text is None:
            warnings.append(f"stop id {token_id} ({', '.join(sources)}) has no text in any tokenizer file")
        tokens.append(StopToken(id=token_id, text=text, sources=sources))

    single_source = [t for t in tokens if len(t.sources) == 1 and len(tokens) > 1]
    conflicts = [f"{t.id} {t.text!r} is declared only by {t.sources[0]}" for t in single_source]
    if not tokens and not unmapped:
        warnings.append("no end-of-sequence token is declared anywhere: generation will run to max_tokens")
    value = ", ".join(f"{t.id} {t.text!r}" if t.text else str(t.id) for t in tokens) or "none"
    if unmapped:
        value += f"; as strings only: {', '.join(repr(u) for u in unmapped)}"
    return StopDecision(
        tokens=tokens,
        unmapped_texts=unmapped,
        eos_text=eos_text,
        decision=Decision(value=value, evidence=evidence, conflicts=conflicts),
        warnings=warnings,
    )
