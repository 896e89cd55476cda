"""`vitlab` command line. Each module in this package adds one subcommand.

A command module defines `register(subparsers)`, which adds its parser and sets
`func=run` with `set_defaults`. Modules are discovered, so adding a command touches no other file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from vitlab.errors import VitlabError

# Errors that mean "the user's input is wrong": shown as one line, exit code 2.
USER_ERRORS = (VitlabError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    from vitlab import __version__

    parser = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers from scratch.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("VITLAB_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vitlab {args.command}: error: {msg}", file=sys.stderr)
        return 2
