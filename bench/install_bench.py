"""Install benchmark: `gallery install NAME` vs `hf download REPO FILES… --revision COMMIT` of the same files.

A repo of several weight shards plus the usual small files is served by the recorded hub on loopback with a
fixed delay added to every request (the issue's 1.5 s by default: what makes request count and parallelism
show). Each round installs into an empty Hugging Face cache with both tools, alternating which goes first;
the catalog entry is added beforehand (not timed). `gallery install` also verifies every sha256 after the
download, which `hf download` does not do. Goal: gallery ≤ 1.1× hf.

Run: `.venv/bin/python bench/install_bench.py [--latency 1.5] [--shards 8] [--shard-mb 16] [--rounds 3]`.
Speed is a property of the machine and its load: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REPO = "bench/sharded-model"


def make_repo(folder: Path, shards: int, shard_mb: int) -> list[str]:
    """A text-model repo: Qwen3 metadata from the recorded hub plus `shards` safetensors-named weight files."""
    from fixtures.hubserver import HUB_ROOT

    source = HUB_ROOT / "mlx-community" / "Qwen3-4B-4bit"
    folder.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copy2(source / name, folder / name)
    (folder / "README.md").write_text("---\nlibrary_name: mlx\nlicense: apache-2.0\n---\n# bench\n")
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    for name in names:
        (folder / name).write_bytes(os.urandom(shard_mb * 1024 * 1024))
    weight_map = {f"layer.{i}.weight": name for i, name in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    info = {"pipeline_tag": "text-generation", "library_name": "mlx", "tags": ["mlx"], "gated": False}
    (folder / "_info.json").write_text(json.dumps(info))
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("_"))


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall time of one command (it must succeed)."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])}… failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def main() -> int:
    """Run the benchmark and print one line per round and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.5, help="seconds added to every request")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from fixtures.hubserver import RecordedHub

    with tempfile.TemporaryDirectory(prefix="install-bench-") as tmp:
        work = Path(tmp)
        files = make_repo(work / "repo", args.shards, args.shard_mb)
        hf = str(Path(sys.executable).with_name("hf"))
        with RecordedHub(extra_repos={REPO: work / "repo"}) as hub:
            base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GALLERY_"))}
            base.update(
                HF_ENDPOINT=hub.url,
                HF_HUB_DISABLE_PROGRESS_BARS="1",
                HF_HUB_DISABLE_TELEMETRY="1",
                GALLERY_CATALOG=str(work / "catalog" / "index.yaml"),
                PYTHONPATH=str(ROOT),
            )
            added = subprocess.run(
                [sys.executable, "-m", "cli", "add", REPO],
                env={**base, "HF_HUB_CACHE": str(work / "add-cache")},
                capture_output=True,
                text=True,
            )
            if added.returncode != 0:
                raise SystemExit(f"gallery add failed: {added.stderr}")
            commit = hub.commit_of(REPO)
            name = "sharded-model"
            hub.latency = args.latency
            rows = []
            for round_number in range(args.rounds):
                results = {}
                order = ["gallery", "hf"] if round_number % 2 == 0 else ["hf", "gallery"]
                for tool in order:
                    cache = work / f"cache-{tool}-{round_number}"
                    env = {**base, "HF_HUB_CACHE": str(cache)}
                    if tool == "gallery":
                        command = [sys.executable, "-m", "cli", "install", name]
                    else:
                        command = [
                            hf,
                            "download",
                            REPO,
                            *files,
                            "--revision",
                            commit,
                            "--cache-dir",
                            str(cache),
                        ]
                    results[tool] = timed(command, env)
                    shutil.rmtree(cache, ignore_errors=True)
                rows.append(results)
                print(
                    f"round {round_number + 1}: gallery install {results['gallery']:.2f} s, "
                    f"hf download {results['hf']:.2f} s, ratio {results['gallery'] / results['hf']:.2f}"
                )
    gallery_s = statistics.median(r["gallery"] for r in rows)
    hf_s = statistics.median(r["hf"] for r in rows)
    total_mb = args.shards * args.shard_mb
    print(
        f"median over {args.rounds} rounds ({len(files)} files, {total_mb} MB, {args.latency} s per request): "
        f"gallery install {gallery_s:.2f} s vs hf download {hf_s:.2f} s: ratio {gallery_s / hf_s:.2f} (goal ≤ 1.10)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
