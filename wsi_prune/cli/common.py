"""Pieces shared by the click modules of :mod:`wsi_prune.cli` (one module per command group),
kept apart so that those modules never import each other: the error handler, logging set-up,
shared options, the result table and exit codes."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from wsi_prune.errors import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, WsiPruneError

#: click settings of every command: ``-h`` as well as ``--help``
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Our exceptions become a one-line message on stderr and exit code 1
    (:data:`wsi_prune.errors.EXIT_ERROR`); anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WsiPruneError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


def setup_logging(verbose: int, quiet: bool, logfile: Path | None = None) -> None:
    """Handlers of the ``wsi_prune`` logger: stderr at WARNING (``quiet``), INFO (default,
    ``-v``) or DEBUG (``-vv``); ``logfile`` gets INFO and up, or DEBUG with ``-vv``, whatever
    the console shows.

    tifffile's own warnings (an odd tag or strip count, naming a page offset but not the
    file) go to ``logfile``, and to stderr only with ``-vv``: the slide's error, or its
    warning, already says what was wrong with which file."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    file_level = min(level, logging.INFO)
    root = logging.getLogger("wsi_prune")
    root.setLevel(file_level if logfile else level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    root.handlers[:] = [handler]
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logfile, encoding="utf-8")
        fh.setLevel(file_level)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    lib = logging.getLogger("tifffile")
    lib.propagate = False
    lib.handlers[:] = [h for h in root.handlers
                       if isinstance(h, logging.FileHandler) or verbose > 1] or [
        logging.NullHandler()]


def command_logging(ctx: click.Context, quiet: bool, logfile: Path | None) -> bool:
    """Logging of a command that writes a log file (``run``, ``demo``): the group's ``-v``
    and ``-q`` still apply (the command's own ``--quiet`` adds to ``-q``). Returns whether
    the command is quiet."""
    obj = ctx.find_root().obj or {}
    quiet = quiet or bool(obj.get("quiet", False))
    setup_logging(int(obj.get("verbose", 0)), quiet, logfile)
    return quiet


class DeviceType(click.ParamType):
    """A torch device name: :data:`wsi_prune._devices.DEVICE_FORMS` (spelling only; whether
    the device exists is checked when the run starts)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> str:
        from wsi_prune._devices import parse_device

        try:
            return parse_device(value)
        except WsiPruneError as exc:
            self.fail(exc.reason, param, ctx)


DEVICE = DeviceType()


def device_for_gpus(gpus: int) -> str:
    """``--device`` when not given, for SLURM jobs that ask for ``gpus`` GPUs each: ``cuda``
    when they have one, else ``cpu``. ``--gpus`` only asks SLURM for the GPU: without this the
    jobs got their GPUs and ran the models on their CPUs."""
    return "cuda" if gpus else "cpu"


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --mpp, shared by every command that reads slides."""
    fn = click.option("--mpp", type=float, default=None,
                      help="Level-0 µm/px of the slides. Wins over the slide's metadata and "
                           "over the objective-power estimate (source 'user'; a warning when "
                           "it differs from the metadata by more than 5 %). Needed for slides "
                           "without metadata MPP and for plain images. A slide list's mpp "
                           "column wins over it.")(fn)
    fn = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                      default=None, help="Pipeline YAML (see pipelines/).")(fn)
    return fn


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("id", "status", "probability", "kept_tiles", "tissue_tiles", "token_fraction",
            "gmacs", "gmacs_dense", "sec_total")
    fmt = {"probability": "{:.3f}", "token_fraction": "{:.1%}", "gmacs": "{:.2f}",
           "gmacs_dense": "{:.2f}", "sec_total": "{:.1f}"}
    table = [[("" if r.get(c) is None else fmt.get(c, "{}").format(r[c])) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c)
              for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))
    for r in rows:
        if r.get("status") == "failed":
            click.echo(f"failed: {r['id']}: {r['error']}", err=True)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread: Python's
    default dies on the spot and no ``finally`` runs, leaving the run and slide locks behind
    (the next run takes them over, but only on the same host)."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding application): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(rows: list[dict[str, Any]]) -> int:
    return EXIT_SOME_FAILED if any(r["status"] == "failed" for r in rows) else EXIT_OK
