"""Handlers of `ocr-cluster sweep plan | launch | status` (wired by ocr_cluster/cli.py).

The sweep capability has not landed: every action parses its arguments, then raises NotAvailable (exit 3).
"""

from __future__ import annotations

import argparse

from ocr_cluster import __version__
from ocr_cluster.errors import NotAvailable, unknown_choice

HELP = {
    "plan": "list the cells of a grid and their run ids",
    "launch": "submit every missing cell of a grid",
    "status": "show the state of each cell",
}


def not_landed(args: argparse.Namespace) -> int:
    raise NotAvailable(f"not available in ocr_cluster {__version__}: the sweep capability has not landed yet")


def add_arguments(action: str, parser: argparse.ArgumentParser) -> None:
    """The arguments and handler of `ocr-cluster sweep ACTION`."""
    if action not in HELP:
        raise unknown_choice("sweep action", action, HELP)
    parser.add_argument("grid", help="sweeps/<grid>.yaml")
    parser.set_defaults(func=not_landed)
