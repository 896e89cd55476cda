"""`vitlab` command line. Each module in this package adds one subcommand.

A command module defines `register(subparsers)`, which adds its parser and sets
`func=run` with `set_defaults`. Modules are discovered, so adding a command touches no other file.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys

from vitlab.errors import VitlabError

# OS errors about the user's paths and disks: one line, exit 2. Any other OSError (and any other exception,
# KeyError and ValueError included) is a bug or an unexpected fault and keeps its traceback.
USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENOSPC,
               errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY, errno.EFBIG, errno.EIO,
               errno.EXDEV, errno.EBUSY, errno.ETXTBSY}


def is_user_error(e: BaseException) -> bool:
    """vitlab's own errors and OS errors about user paths (missing, not a file, no space, permission, ...)."""
    return isinstance(e, VitlabError) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)


def user_message(e: BaseException) -> str:
    """One line: VitlabError's text; an OSError as "PATH: No space left on device" (a bytes path as text)."""
    if isinstance(e, OSError) and not isinstance(e, VitlabError) and e.strerror:
        paths = " -> ".join(_path_text(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{paths}: {e.strerror}" if paths else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _path_text(f) -> str:
    return os.fsdecode(f) if isinstance(f, (bytes, os.PathLike)) else str(f)  # tensorboard names files in bytes


def prints_errors() -> bool:
    """Under torchrun only the first process of each machine prints vitlab's one-line errors (rank 0 on one
    machine): the others hit the same refusal, or stop because of it, and stay silent."""
    return os.environ.get("LOCAL_RANK", "0") in ("", "0") or os.environ.get("RANK", "0") in ("", "0")


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block), printed by one process under torchrun."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n" if prints_errors() else None)


def nonempty(value: str) -> str:
    """argparse `type=` for path options: an empty string is an error, never "no value" (--resume "")."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def build_parser() -> argparse.ArgumentParser:
    from vitlab import __version__

    parser = Parser(prog="vitlab", description="Vision Transformers from scratch.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{mod.name}").register(sub)
    parser.set_defaults(command_parsers=sub.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: "vitlab train: error: unrecognized arguments: ..."
        args.command_parsers.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C: 130; SIGTERM during a training (vitlab.train.guard.Terminated): 143
        if prints_errors():
            print(f"vitlab: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except (VitlabError, OSError) as e:
        if not is_user_error(e) or os.environ.get("VITLAB_DEBUG"):
            raise
        if prints_errors() or getattr(e, "every_rank", False):  # a lost peer is this process's own news
            print(f"vitlab {args.command}: error: {user_message(e)}", file=sys.stderr)
        return 2
