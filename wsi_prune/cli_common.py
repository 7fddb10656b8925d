"""Pieces shared by the click modules (``cli``, ``cli_cluster``, ``cli_train``, ``cli_eval``),
kept apart so that those modules never import each other."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from wsi_prune.errors import EXIT_ERROR, WsiPruneError


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
