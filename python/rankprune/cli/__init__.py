"""The ``rankprune`` command line: one module per subcommand under ``rankprune.cli``.

Each subcommand module defines ``register(subparsers)`` which adds its parser and sets ``run=`` to a
function taking the parsed arguments. Errors a user can fix (bad file, unknown model, value out of range)
are raised as ``UsageError`` (or ValueError / FileNotFoundError) and printed as one line, exit code 2.
"""
import argparse
import importlib
import sys
from typing import List, Optional

# Subcommand modules, in the order `rankprune --help` lists them.
SUBCOMMANDS = ["info", "score", "prune", "trp"]


class UsageError(Exception):
    """A mistake in the command line or its inputs; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankprune",
        description="Compress PyTorch networks by energy and rank (energy-aware pruning, TRP, low-rank layers).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"rankprune.cli.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"rankprune {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
