"""One exception hierarchy for the whole package, and the CLI exit codes.

Every error carries the path it is about, so a batch run can write a one-line reason per slide
into ``predictions.csv`` and carry on with the others.
"""

from __future__ import annotations

import os

# Exit codes of the ``wsi-prune`` command (documented in the README).
EXIT_OK = 0
EXIT_SOME_FAILED = 3  # the command ran, but at least one slide failed
EXIT_USAGE = 2  # click's own code for a misused command
EXIT_ERROR = 1  # the command itself could not run (bad config, output conflict, ...)


class WsiPruneError(Exception):
    """Base of every error raised on purpose by wsi-prune."""

    #: short machine-readable name written in ``predictions.csv``
    kind = "error"

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def one_line(self) -> str:
        """The message on one line, for CSV cells and logs."""
        return " ".join(str(self).split())


class ConfigError(WsiPruneError, ValueError):
    """A configuration value is invalid."""

    kind = "config"


class SlideError(WsiPruneError):
    """A slide could not be used."""

    kind = "slide"


class UnsupportedSlide(SlideError):
    """The file is not a slide any reader here can open."""

    kind = "unsupported"


class CorruptSlide(SlideError):
    """The slide opened, but its data is broken (a tile failed to decode, a truncated file)."""

    kind = "corrupt"


class MissingMPP(SlideError):
    """The slide carries no physical resolution and none was given."""

    kind = "missing-mpp"


class NoTissue(SlideError):
    """The tissue mask found no tissue tile in the slide."""

    kind = "no-tissue"


class SlideChanged(SlideError):
    """The slide file was replaced or modified while it was being processed."""

    kind = "slide-changed"


class CheckpointRefused(WsiPruneError):
    """A weights file is missing, unsafe to load, or does not match the model."""

    kind = "weights"


class OutputConflict(WsiPruneError):
    """An output location is taken (another run holds its lock, or it is not ours)."""

    kind = "output-conflict"


class OutputNotWritable(WsiPruneError):
    """The output folder cannot be created or written (read-only, permissions)."""

    kind = "output"


class DiskFull(WsiPruneError):
    """The device of the output folder is full (ENOSPC) or over quota (EDQUOT)."""

    kind = "disk-full"


class StoreError(WsiPruneError):
    """A Zarr store is missing, incomplete or inconsistent."""

    kind = "store"


class AnnotationError(WsiPruneError, ValueError):
    """An annotation, label or candidate file cannot be read."""

    kind = "annotation"


class EvaluationError(WsiPruneError):
    """A run cannot be evaluated (no predictions, broken candidates, nothing to compare)."""

    kind = "evaluation"


class ShardsMissing(WsiPruneError):
    """Some shards of a sharded run have not written their results (yet)."""

    kind = "shards-missing"


class TrainingError(WsiPruneError, RuntimeError):
    """Training ran but produced no usable model (e.g. a validation loss that is never
    finite)."""

    kind = "training"
