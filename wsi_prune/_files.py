"""File helpers every stage uses: one atomic text writer, one file hash, one file identity.

A leaf module (standard library and :mod:`wsi_prune.errors` only), so that
:mod:`wsi_prune.config` can hash weight files without importing torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from wsi_prune.errors import CheckpointRefused

PathLike = str | os.PathLike[str]


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a small text file (CSV, JSON, Markdown) under a temporary name in its folder,
    then rename it into place: readers see the old file or the new one, never half of one.
    The temporary name carries the pid, so two processes never write the same one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_state(st: os.stat_result) -> tuple[int, int, int]:
    """A file's identity for "was it replaced or modified?": (inode, size, mtime in ns) of
    its ``stat``."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def file_sha256(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (weight files: run hashes, manifests).

    Raises:
        CheckpointRefused: the file cannot be read (the files hashed are weight files).
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(chunk_bytes):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointRefused(f"cannot read file: {exc.strerror}", path) from exc
    return digest.hexdigest()
