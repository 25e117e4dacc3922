"""The ``rankprune`` command line: one module per subcommand under ``rankprune.cli``.

Building the parser imports no torch (each subcommand imports what it needs when it runs), so ``rankprune
--help`` and a usage error answer at once.

Each subcommand module defines ``register(subparsers)`` which adds its parser and sets ``run=`` to a
function taking the parsed arguments. Errors a user can fix (bad file, unknown model, value out of range)
are raised as ``UsageError`` (or ValueError / FileNotFoundError) and printed as one line, exit code 2.
"""
import argparse
import importlib
import sys
from typing import List, Optional

# Subcommand modules, in the order `rankprune --help` lists them.
SUBCOMMANDS = ["info", "demo", "score", "prune", "decompose", "compress", "export", "trp", "bench"]


class UsageError(Exception):
    """A mistake in the command line or its inputs; printed without a traceback."""


class _Version(argparse.Action):
    """``--version``: imports torch (for its version) only when asked, not while the parser is built."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        from rankprune import __version__

        print(f"rankprune {__version__} (torch {torch.__version__})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``rankprune`` argument parser with every subcommand of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="rankprune",
        description="Compress PyTorch networks by energy and rank (energy-aware pruning, TRP, low-rank layers).",
    )
    parser.add_argument("--version", action=_Version, help="show rankprune's and torch's versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"rankprune.cli.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code (2: a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"rankprune {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
