"""The ``pagetable`` command line and the benchmark harness behind ``pagetable bench``.

Nothing in the library imports this package.  One module per subcommand, each with
``HELP`` (its one line in ``pagetable --help``), ``add_arguments(parser)``, optionally
``check(args)`` (what makes a combination of options unable to run, or None) and
``run(args) -> exit status``:

* :mod:`~pagetable.cli.demo`: build a realistic table and time the per-step lookups;
* :mod:`~pagetable.cli.simulate`: the continuous-batching serving simulation;
* :mod:`~pagetable.cli.bench`: pagetable side by side with its baselines, goal by goal.

Beside them, the benchmark harness: :mod:`~pagetable.cli.workloads` (every workload,
seeded), :mod:`~pagetable.cli._baselines` (what pagetable is timed against) and
:mod:`~pagetable.cli._memory` (the per-block memory reading).  Those three depend on
numpy only, and this file imports nothing at load, because asv loads the folder by path
from the checkout (``benchmarks/workloads.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

PROG = "pagetable"
COMMANDS = ("demo", "simulate", "bench")
DEFAULT_COMMAND = "demo"


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line: ``pagetable simulate: error: ...``.

    The usage block argparse prints before an error is left out; the line names the
    ``--help`` that shows it.
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per subcommand."""
    from pagetable import __version__

    parser = _Parser(
        prog=PROG,
        description="The page table of a paged KV cache: a demo, a serving simulation and "
                    f"benchmarks. Without a command, runs `{PROG} {DEFAULT_COMMAND}`.",
        epilog=f"`{PROG} COMMAND --help` describes a command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command",
                                     parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        doc = (module.__doc__ or "").strip()
        sub = commands.add_parser(name, help=module.HELP, description=doc.split("\n\n")[0].replace("``", "`"))
        module.add_arguments(sub)
        sub.set_defaults(_module=module, _parser=sub)
    return parser


def _run(argv: list[str]) -> int:
    parser = build_parser()
    if not argv:
        argv = [DEFAULT_COMMAND]
    elif not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    args = parser.parse_args(argv)
    if args.command is None:       # options but no command: `pagetable --foo`
        parser.error(f"a command is needed first (choose from {', '.join(COMMANDS)})")
    module, sub = args._module, args._parser
    del args._module, args._parser
    # Combinations of values are refused here, still before any work.
    if hasattr(module, "check") and (why := module.check(args)):
        sub.error(why)
    status: int = module.run(args)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run ``pagetable [COMMAND] [OPTIONS]``; returns the exit status.

    Bad options end the run before any work with a one-line ``error:`` on stderr and
    status 2.  When stdout's reader goes away (``pagetable demo | head -1``) the run ends
    quietly with status 141, as a process killed by SIGPIPE would.
    """
    try:
        status = _run(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail the same way and print a
        # traceback: point stdout at /dev/null first (the recipe of the signal docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13   # 128 + SIGPIPE
    return status
