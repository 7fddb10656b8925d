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
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger("wsi_prune")
    root.setLevel(min(level, logging.INFO) if logfile else level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logfile, encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --mpp, shared by every command that reads slides."""
    fn = click.option("--mpp", type=float, default=None,
                      help="µm/px for slides whose metadata has none (and for plain images).")(fn)
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
