"""Benchmark `gallery validate` on a large, realistic catalog.

Builds a 2,000-entry catalog in a temporary folder from the starter entries (each a real import from the
recorded hub, with its real chat template from the fixtures): varied names and descriptions, one config file
per entry (starters whose recording lists no weights get a weights file, as their real repos have). Then
validates it and prints entries/second and peak memory, next to the obvious alternative (no template cache:
every entry compiles and renders its template) on a sample, as a ratio.

    python bench/validate_bench.py [--entries 2000] [--sample 200]

Target: under 3 seconds for 2,000 entries. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from catalog import probes, validate  # noqa: E402
from catalog.index import (  # noqa: E402
    CatalogFile,
    Entry,
    file_uri,
    human_size,
    load_catalog,
    render_config,
    render_index,
)
from catalog.validate import Report, validate_paths  # noqa: E402
from gallery import chat_template  # noqa: E402
from gallery.config import RepoFile  # noqa: E402


def build_catalog(folder: Path, count: int) -> tuple[Path, int]:
    """Write a `count`-entry catalog into folder; returns the index path and how many distinct templates it has.

    Each starter entry is rendered once by the project's own writer; the copies only change the name, the
    description and the config path (as text, which keeps building 2,000 entries fast).
    """
    starters = [_with_weights(entry) for entry in load_catalog(ROOT / "catalog" / "index.yaml").entries]
    (folder / "entries").mkdir(parents=True)
    config_texts = [render_config(entry.config) for entry in starters]
    index_texts = [render_index([entry]).split("\n- name: ", 1)[1] for entry in starters]
    parts = [render_index([starters[0]]).split("\n- name: ", 1)[0] + "\n"]
    for number in range(count):
        which = number % len(starters)
        base = starters[which]
        name = f"{base.name}-v{number:04d}"
        old_description = f"description: {base.config.description}\n"
        new_description = f"description: {base.config.description} (variant {number})\n"
        config_text = config_texts[which].replace(f"\nname: {base.name}\n", f"\nname: {name}\n", 1)
        config_text = config_text.replace(old_description, new_description, 1)
        (folder / "entries" / f"{name}.yaml").write_text(config_text, encoding="utf-8")
        entry_text = index_texts[which].replace(f"{base.name}\n", f"{name}\n", 1)
        entry_text = entry_text.replace(
            f"config: entries/{base.name}.yaml", f"config: entries/{name}.yaml", 1
        )
        parts.append("- name: " + entry_text)
    index = folder / "index.yaml"
    index.write_text("".join(parts), encoding="utf-8")
    templates = {entry.config.mlx.chat_template.sha256 for entry in starters}
    return index, len(templates)


def _with_weights(entry: Entry) -> Entry:
    """The entry, with a weights file added when the recorded hub lists none for its repo (metadata-only
    recordings), so the generated catalog is clean, like a real one, rather than 1,000 `no-weights` warnings."""
    config = entry.config
    if any(f.path.endswith(".safetensors") for f in config.mlx.files):
        return entry
    repo, revision = config.mlx.source.repo or "", config.mlx.source.revision or ""
    digest = hashlib.sha256(f"bench weights of {repo}".encode()).hexdigest()
    config = config.model_copy(deep=True)
    config.mlx.files = sorted(
        [*config.mlx.files, RepoFile(path="model.safetensors", size=6_000_000_000, sha256=digest)],
        key=lambda f: f.path,
    )
    files = sorted(
        [
            *entry.meta.files,
            CatalogFile(
                filename="model.safetensors", sha256=digest, uri=file_uri(repo, revision, "model.safetensors")
            ),
        ],
        key=lambda f: f.filename,
    )
    total = sum(f.size or 0 for f in config.mlx.files if f.path in {c.filename for c in files})
    meta = entry.meta.model_copy(update={"files": files, "size": human_size(total)})
    return Entry(meta=meta, config=config, config_ref=entry.config_ref)


def _reset_caches() -> None:
    probes._VERDICTS.clear()
    chat_template._CACHE.clear()
    gc.collect()


def timed(run: Callable[[], Report], repeat: int = 3) -> tuple[Report, float, float]:
    """Run `repeat` times, each from cold caches; return the report and the median and best wall times."""
    times = []
    report = Report()
    for _ in range(repeat):
        _reset_caches()
        start = time.perf_counter()
        report = run()
        times.append(time.perf_counter() - start)
    return report, statistics.median(times), min(times)


def traced_peak(run: Callable[[], Report]) -> float:
    """Peak Python heap (MiB) of one run from cold caches, measured with tracemalloc."""
    _reset_caches()
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def sample_catalog(index: Path, folder: Path, size: int) -> Path:
    """The first `size` entries of a catalog as a catalog of their own (sharing the entries folder)."""
    text = index.read_text(encoding="utf-8")
    marker = "\n- name: "
    cut = -1
    for _ in range(size + 1):
        cut = text.find(marker, cut + 1)
        if cut < 0:
            break
    sample = folder / "sample.yaml"
    sample.write_text(text if cut < 0 else text[: cut + 1], encoding="utf-8")
    return sample


def main(argv: list[str] | None = None) -> int:
    """Build the catalog, validate it, and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--sample", type=int, default=200, help="entries for the no-cache comparison")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gallery-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        index, unique = build_catalog(folder, args.entries)
        build_s = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in folder.rglob("*.yaml")) / 1e6

        report, cached_s, cached_best = timed(lambda: validate_paths([index]))
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            1024 if sys.platform != "darwin" else 2**20
        )
        peak_mib = traced_peak(lambda: validate_paths([index]))

        sample = sample_catalog(index, folder, args.sample)
        sample_cached, sample_cached_s, _ = timed(lambda: validate_paths([sample]))
        original = validate.template_verdict

        def uncached(text: str, sha256: str, *rest: object) -> object:
            chat_template._CACHE.clear()  # no compiled-template cache either: compile and render every time
            return probes.render_probes(text, *rest)  # type: ignore[arg-type]

        validate.template_verdict = uncached  # type: ignore[assignment]  # the name check_config calls
        try:
            sample_report, uncached_s, _ = timed(lambda: validate_paths([sample]))
        finally:
            validate.template_verdict = original

    rate = report.entries / cached_s
    uncached_rate = sample_report.entries / uncached_s
    cached_sample_rate = sample_cached.entries / sample_cached_s
    print(
        f"catalog: {report.entries} entries, {report.files} files, {size_mb:.1f} MB of YAML, "
        f"{unique} distinct templates (built in {build_s:.1f} s); problems found: {report.errors} errors, "
        f"{report.warnings} warnings"
    )
    print()
    print("median of 3 runs, each from cold template caches")
    print()
    print(
        "| run                                   | entries | seconds | entries/s | peak memory              |"
    )
    print(
        "|---------------------------------------|--------:|--------:|----------:|--------------------------|"
    )
    print(
        f"| validate, template cache (full)       | {report.entries:7d} | {cached_s:7.2f} | {rate:9.0f} | "
        f"{peak_mib:6.1f} MiB heap, {rss_mib:6.1f} MiB RSS |"
    )
    print(
        f"| validate, template cache (sample)     | {sample_cached.entries:7d} | {sample_cached_s:7.2f} | "
        f"{cached_sample_rate:9.0f} |                          |"
    )
    print(
        f"| validate, no template cache (sample)  | {sample_report.entries:7d} | {uncached_s:7.2f} | "
        f"{uncached_rate:9.0f} |                          |"
    )
    print()
    print(
        f"template cache speed-up on the sample: {cached_sample_rate / uncached_rate:.1f}x; "
        f"full catalog {'within' if cached_s < 3 else 'OVER'} the 3 s target ({cached_s:.2f} s median, "
        f"{cached_best:.2f} s best)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
