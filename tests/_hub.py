"""A Hugging Face cache laid out on disk, for tests of offline hub resolution (no network)."""

from __future__ import annotations

from pathlib import Path


def cache_repo(root: Path, repo: str, files: dict[str, bytes | str]) -> Path:
    """Files laid out as huggingface_hub caches a repo under ``root``; returns the snapshot
    folder."""
    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return snap
