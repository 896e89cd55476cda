"""`vitlab torchrun [TORCHRUN OPTIONS] COMMAND [ARGS]`: `torchrun [OPTIONS] -m vitlab COMMAND ARGS`, with its
failures in one line.

    vitlab torchrun --standalone --nproc-per-node 2 train --recipe sprint --out runs/ddp

torchrun's options (--nproc-per-node, --standalone, --nnodes, --max-restarts, --master-addr, --master-port,
--rdzv-*) come first, then the vitlab command and its flags. The job runs exactly as under torchrun; only
failures read differently:
- a --master-port already in use on this machine is one line naming it, before any process starts (plain
  torchrun fails in its own store with a traceback);
- when vitlab refuses the job (a run dir in use, a global batch that does not split over the processes, a bad
  flag: exit 2 on the ranks), rank 0's one line is all that is printed and the exit code is 2 (plain torchrun
  adds its ChildFailedError traceback and exits 1);
- any other failure (a rank killed, a crash) is one line per failed process, exit 1; a Ctrl-C exits 130.
torchrun's own log lines are off (LOGLEVEL=INFO, WARNING, ... brings them back).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from vitlab.errors import VitlabError

USAGE = "vitlab torchrun [TORCHRUN OPTIONS] COMMAND [ARGS], e.g. vitlab torchrun --nproc-per-node 2 train --out runs/a"


def register(subparsers: argparse._SubParsersAction) -> None:
    # "+" prefixes: every word after `torchrun` (its --options included) is handed on untouched
    p = subparsers.add_parser("torchrun", help="torchrun -m vitlab, with failures in one line", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter, prefix_chars="+", add_help=False,
                              usage=USAGE)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=run, commands=subparsers.choices)


def split_command(argv: list[str], commands) -> tuple[list[str], list[str]]:
    """(torchrun's options, the vitlab command and its flags): split at the first word naming a command."""
    at = next((i for i, word in enumerate(argv) if word in commands and word != "torchrun"), None)
    if at is None:
        raise VitlabError(f"no vitlab command after torchrun's options; usage: {USAGE}")
    return argv[:at], argv[at:]


def hosted_port(targs: argparse.Namespace) -> int | None:
    """The port torchrun's static rendezvous will listen on here (None: it picks a free one, or another machine
    hosts it). torchrun uses --master-port only without --standalone and with the static backend."""
    if targs.standalone or targs.rdzv_backend != "static" or targs.rdzv_endpoint or int(targs.node_rank or 0) != 0:
        return None
    single = str(targs.nnodes).split(":")[-1] == "1"
    if targs.master_port is None and single:
        return None  # torchrun switches to a free port on one machine
    return int(targs.master_port or 29500)


def check_port(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to torchrun too
        try:
            s.bind(("", port))
        except OSError as e:
            raise VitlabError(f"--master-port {port} is in use on this machine ({e.strerror}); pick a free port, or "
                              "on one machine leave --master-port out (torchrun then finds one)") from None


def describe(rank: int, failure) -> str:
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
    return f"vitlab torchrun: rank {rank} (pid {failure.pid}) {how}"


def run(args: argparse.Namespace) -> int:
    if args.argv in ([], ["-h"], ["--help"]):
        print(__doc__)
        return 0
    launcher, command = split_command(args.argv, args.commands)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    targs = torchrun.parse_args([*launcher, "--module", "vitlab", *command])
    port = hosted_port(targs)
    if port is not None:
        check_port(port)
    if not os.environ.get("LOGLEVEL"):
        logging.disable(logging.ERROR)  # torchrun's agent logs every failure at length; the lines below say it
    try:
        torchrun.run(targs)
    except ChildFailedError as e:
        failed = e.failures
        if any(f.exitcode == 2 for f in failed.values()):  # vitlab refused the job: rank 0 has printed why
            failed = {r: f for r, f in failed.items() if f.exitcode not in (2, 128 + signal.SIGTERM, -signal.SIGTERM)}
        if not failed:  # (ranks torchrun stopped with SIGTERM after the refusal are not failures of their own)
            return 2
        for rank, f in sorted(failed.items()):
            print(describe(rank, f), file=sys.stderr)
        return 1
    except SignalException as e:  # Ctrl-C or SIGTERM to the launcher: the ranks stop as they do alone
        return 128 + int(e.sigval)
    return 0
