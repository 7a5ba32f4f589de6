"""Regenerate the bundled starter catalog (gallery/index.yaml + gallery/entries/) with the real importer.

    python -m gallery.catalog_seed                 # from the recorded hub in fixtures/hub (run from the repo root)
    python -m gallery.catalog_seed --check         # exit 1 when the shipped catalog differs from a fresh import
    python -m gallery.catalog_seed --endpoint URL  # from another hub or mirror (token from HF_TOKEN)

Every entry is imported through huggingface_hub exactly as `gallery add` does it, with only the curated
fields below (name, description) added, so a test can prove the shipped catalog equals a fresh import.
A private, temporary Hugging Face cache is used: the recorded hub's commits must never land in a real cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gallery.catalog import ENTRIES_DIR, INDEX_FILE, Entry, render_config, render_index
from gallery.catalog_build import build_entry
from gallery.errors import GalleryError
from gallery.yamlio import atomic_write

PACKAGE_DIR = Path(__file__).resolve().parent
RECORDED_HUB_TOKEN = "hf_test_token"


@dataclasses.dataclass(frozen=True)
class SeedEntry:
    """One starter entry: the repo and the curated description."""

    repo: str
    description: str
    name: str | None = None


SEED: tuple[SeedEntry, ...] = (
    SeedEntry("mlx-community/gemma-4-E4B-it-qat-4bit",
              "Gemma 4 E4B instruct, quantization-aware-trained 4-bit MLX conversion. Text, image, audio and video "
              "input on mlx-vlm; thinking mode (enable_thinking) and tool calls."),
    SeedEntry("mlx-community/Qwen3-4B-4bit",
              "Qwen3 4B, 4-bit MLX conversion. Text on mlx-lm; hybrid thinking (on by default, enable_thinking) "
              "and tool calls."),
    SeedEntry("mlx-community/gemma-3-4b-it-text-4bit",
              "Gemma 3 4B instruct, text-only 4-bit MLX conversion (the vision tower was removed, so mlx-lm "
              "serves it despite the Hub's image-text-to-text tag)."),
    SeedEntry("Qwen/Qwen2.5-VL-3B-Instruct",
              "Qwen2.5-VL 3B instruct, the original checkpoint loaded directly by mlx-vlm. Text, image and "
              "video input."),
    SeedEntry("meta-llama/Llama-3.2-3B-Instruct",
              "Llama 3.2 3B instruct, the original checkpoint loaded directly by mlx-lm; JSON tool calls. Gated: "
              "accept Meta's license on the Hub and set HF_TOKEN before installing."),
    SeedEntry("HuggingFaceTB/SmolLM3-3B",
              "SmolLM3 3B, the original checkpoint loaded directly by mlx-lm. Hybrid reasoning (on by default) "
              "and tool calls."),
)


@contextlib.contextmanager
def _endpoint(url: str) -> Iterator[None]:
    """Point the importer and downloads at `url` for the duration (both read HF_ENDPOINT per call)."""
    previous = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = previous


def build_seed_entries(endpoint: str, *, token: str | None, cache_dir: Path) -> list[Entry]:
    """Import every starter repo from `endpoint` and return the catalog entries, in seed order."""
    entries = []
    with _endpoint(endpoint):
        for seed in SEED:
            built = build_entry(seed.repo, name=seed.name, description=seed.description, token=token,
                                cache_dir=cache_dir)
            entries.append(built.entry)
    return entries


def render_catalog(entries: list[Entry]) -> dict[str, str]:
    """Relative path -> text for every file of the catalog (the index and each entry's config)."""
    files = {INDEX_FILE: render_index(entries)}
    for entry in entries:
        assert entry.config_ref is not None
        files[entry.config_ref] = render_config(entry.config)
    return files


def differences(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Relative paths whose content in out_dir differs from `files` (missing, changed, or stale extras)."""
    changed = [rel for rel, text in files.items()
               if not (out_dir / rel).is_file() or (out_dir / rel).read_text(encoding="utf-8") != text]
    entries_dir = out_dir / ENTRIES_DIR
    extra = [f"{ENTRIES_DIR}/{p.name}" for p in sorted(entries_dir.glob("*.yaml"))
             if f"{ENTRIES_DIR}/{p.name}" not in files] if entries_dir.is_dir() else []
    return changed + extra


def write_seed(out_dir: Path, files: dict[str, str]) -> None:
    """Write the catalog files atomically (configs before the index) and drop stale entry configs."""
    for rel, text in sorted(files.items(), key=lambda item: item[0] == INDEX_FILE):
        atomic_write(out_dir / rel, text)
    entries_dir = out_dir / ENTRIES_DIR
    for stale in sorted(entries_dir.glob("*.yaml")):
        if f"{ENTRIES_DIR}/{stale.name}" not in files:
            stale.unlink()


def generate(endpoint: str | None, token: str | None) -> dict[str, str]:
    """Build the starter catalog's files from `endpoint`, or from the recorded hub when None."""
    with tempfile.TemporaryDirectory(prefix="gallery-seed-cache-") as cache:
        if endpoint is not None:
            return render_catalog(build_seed_entries(endpoint, token=token, cache_dir=Path(cache)))
        try:
            from fixtures.hubserver import RecordedHub
        except ImportError:
            raise GalleryError("the recorded hub (fixtures/) is not importable: run from the repository root, "
                               "or pass --endpoint", exit_code=2) from None
        with RecordedHub() as hub:
            return render_catalog(build_seed_entries(hub.url, token=token or RECORDED_HUB_TOKEN,
                                                     cache_dir=Path(cache)))


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate (or --check) the starter catalog."""
    parser = argparse.ArgumentParser(prog="python -m gallery.catalog_seed", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="catalog folder (default: the bundled one)")
    parser.add_argument("--endpoint", help="hub to import from (default: serve fixtures/hub on loopback)")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="token for gated repos (default: HF_TOKEN)")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when the catalog differs")
    args = parser.parse_args(argv)
    try:
        files = generate(args.endpoint, args.token)
    except GalleryError as exc:
        print(f"catalog_seed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    diff = differences(args.out, files)
    if args.check:
        for rel in diff:
            print(f"differs: {args.out / rel}", file=sys.stderr)
        print("catalog is up to date" if not diff else f"{len(diff)} file(s) differ: run python -m gallery.catalog_seed")
        return 1 if diff else 0
    write_seed(args.out, files)
    print(f"wrote {len(files)} files to {args.out} ({len(diff)} changed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
