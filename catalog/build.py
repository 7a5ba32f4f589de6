"""Build a catalog entry from a Hub repo: import it, pin it, and give every file an install downloads a sha256.

LFS files (weights) carry their sha256 in the Hub's listing. Small git files do not, so they are downloaded
at the pinned commit (through huggingface_hub, into its cache, where the import already put most of them)
and hashed; a file whose git blob id is unchanged since the last pin reuses the known hash instead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from catalog.index import (
    CatalogFile,
    Entry,
    IndexEntry,
    config_ref_for,
    file_uri,
    human_size,
    install_files,
    repo_url,
)
from gallery.config import ModelConfig, RepoFile
from gallery.errors import NetworkFailure, OfflineNotCached, UsageError
from gallery.hub import download_file, is_offline, sha256_file

_HASH_WORKERS = 8


@dataclasses.dataclass
class BuiltEntry:
    """A freshly built entry and the importer's warnings about it."""

    entry: Entry
    warnings: list[str]


def default_tags(config: ModelConfig) -> list[str]:
    """Tags derived from the config: backend, use cases, model family, quantization, reasoning and tools."""
    tags: list[str] = [config.backend]
    tags += [usecase for usecase in config.known_usecases if usecase != "completion"]
    if config.mlx.model_type:
        tags.append(config.mlx.model_type)
    quant = config.mlx.quantization
    if quant is not None and quant.bits:
        tags.append(f"{quant.bits}bit")
    if config.mlx.reasoning.supported:
        tags.append("reasoning")
    if config.mlx.tool_calls.format:
        tags.append("tools")
    return list(dict.fromkeys(tags))


def hash_files(
    config: ModelConfig,
    files: list[RepoFile],
    *,
    token: str | bool | None = None,
    cache_dir: Path | None = None,
    known_sha256: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """path -> sha256 for every file: the Hub's LFS hash, a known hash for an unchanged blob, or a download."""
    repo, revision = config.mlx.source.repo, config.mlx.source.revision
    assert repo is not None and revision is not None
    hashes: dict[str, str] = {}
    to_download: list[str] = []
    for repo_file in files:
        known = (known_sha256 or {}).get(repo_file.blob_id or "")
        if repo_file.sha256:
            hashes[repo_file.path] = repo_file.sha256
        elif known:
            hashes[repo_file.path] = known
        else:
            to_download.append(repo_file.path)

    def fetch(path: str) -> tuple[str, str]:
        local = download_file(repo, path, revision, cache=cache_dir, token=token)
        return path, sha256_file(local)

    if to_download:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(_HASH_WORKERS, len(to_download))) as pool:
            for path, digest in pool.map(fetch, to_download):
                hashes[path] = digest
    return hashes


def entry_from_config(
    config: ModelConfig,
    hashes: Mapping[str, str],
    *,
    description: str | None = None,
    icon: str | None = None,
    tags: list[str] | None = None,
    urls: list[str] | None = None,
    inline: bool = False,
) -> Entry:
    """Assemble the index entry for a pinned config whose install files are all hashed."""
    repo, revision = config.mlx.source.repo, config.mlx.source.revision
    assert repo is not None and revision is not None
    files = install_files(config)
    sizes = [f.size for f in files]
    meta = IndexEntry(
        name=config.name,
        description=description if description is not None else config.description,
        license=config.license,
        icon=icon,
        tags=tags if tags is not None else default_tags(config),
        urls=urls if urls is not None else [repo_url(repo)],
        size=human_size(sum(s for s in sizes if s is not None))
        if all(s is not None for s in sizes)
        else None,
        config=config.to_data() if inline else config_ref_for(config.name),
        files=[
            CatalogFile(filename=f.path, sha256=hashes[f.path], uri=file_uri(repo, revision, f.path))
            for f in files
        ],
    )
    return Entry(meta=meta, config=config, config_ref=None if inline else config_ref_for(config.name))


def build_entry(
    source: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    backend: str | None = None,
    description: str | None = None,
    icon: str | None = None,
    tags: list[str] | None = None,
    urls: list[str] | None = None,
    options: list[str] | None = None,
    accept_missing_template: bool = False,
    token: str | bool | None = None,
    cache_dir: Path | None = None,
    known_sha256: Mapping[str, str] | None = None,
    inline: bool = False,
    drafter: bool = False,
) -> BuiltEntry:
    """Import SOURCE (a Hub repo) and build its pinned, fully hashed catalog entry.

    Curated fields (description, icon, tags, urls, options, accept_missing_template) override what the
    import derives. Raises GalleryError subclasses (UsageError for a local folder: entries must be portable).
    """
    from importers import import_model

    result = import_model(
        source,
        revision=revision,
        backend=backend,
        name=name,
        token=token,
        cache_dir=cache_dir,
        drafter=drafter,
    )
    if result.origin == "cache":
        # The importer falls back to the local cache when the Hub is unreachable; a catalog pin (or a drift check)
        # built from that would silently be stale, so it is an error here.
        error = OfflineNotCached if is_offline() else NetworkFailure
        raise error(
            f"{source}: the Hub could not be used, and catalog entries are only built from the Hub "
            f"({result.warnings[0] if result.warnings else 'the import read the local cache'})"
        )
    config = result.config.model_copy(deep=True)
    pinned = config.mlx.source
    if pinned.repo is None or pinned.revision is None or pinned.local_path is not None:
        raise UsageError(f"{source!r} is a local folder: catalog entries must pin a Hub repo at a commit")
    if description is not None:
        config.description = description
    if options is not None:
        config.options = list(options)
    if accept_missing_template:
        config.mlx.chat_template.accept_missing = True
    hashes = hash_files(
        config, install_files(config), token=token, cache_dir=cache_dir, known_sha256=known_sha256
    )
    entry = entry_from_config(
        config, hashes, description=description, icon=icon, tags=tags, urls=urls, inline=inline
    )
    return BuiltEntry(entry=entry, warnings=result.warnings)
