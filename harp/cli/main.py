"""`harp`: the command line that drives HARP (devices, demo, servers, leases, traces).

Each subcommand lives in its own module, imported only when that subcommand
runs: `harp --help` lists the commands from the table below without importing
any of them.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import HarpError

COMMANDS = {
    "devices": ("harp.cli.devices", "list the backends and devices on this machine"),
    "demo": ("harp.cli.demo", "run a small workload locally and on an embedded pool server"),
    "server": ("harp.cli.server", "run a pool server that serves this machine's devices"),
    "certs": ("harp.cli.certs", "create the pool CA and issue certificates"),
    "scheduler": ("harp.cli.scheduler", "run the scheduler that leases pool devices"),
    "up": ("harp.cli.up", "a one-machine pool: scheduler + local pool server, in the foreground"),
    "pool": ("harp.cli.pool", "list the pool's servers and devices"),
    "attach": ("harp.cli.attach", "lease devices from the pool"),
    "detach": ("harp.cli.detach", "end a lease"),
    "leases": ("harp.cli.leases", "list leases"),
    "trace": ("harp.cli.trace", "study recorded traces: report, replay, export, what-if"),
    "run": ("harp.cli.run", "run an unmodified program with its numba.cuda calls served by HARP"),
    "kubernetes": ("harp.cli.kubernetes", "the Kubernetes DRA driver: kubelet plugin and "
                   "ResourceSlice controller"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (to add its options)."""
    parser = argparse.ArgumentParser(prog="harp", description="HARP: pooled accelerators, "
                                     "used as if they were local.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other tools do.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141


def _main(argv: list[str]) -> int:
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except HarpError as exc:
        print(f"harp {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
