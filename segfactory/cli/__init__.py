"""The ``segfactory`` command line: the top layer, thin glue (parse -> config -> call) over the stages and pipelines.

Each module of this package declares the commands of one area (``synth``: render/show/stats, ``pretrain``:
ingest/pretrain/probe, ``finetune``: finetune/evaluate/predict/export/sweep, ``pipelines``: run/refresh) with
``register(commands, benches)``, and imports what a command runs inside its handler, so ``segfactory --help``
stays fast and never imports torch, Dask or Blender. Help texts listing a registry's names (methods, backbones,
architectures, scene families) are :class:`~segfactory.cli.lazyhelp.Names`, filled in only when printed.
Nothing below this layer imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import importlib
import os
import signal

from segfactory import __version__
from segfactory.cli.args import check_out_dirs
from segfactory.cli.lazyhelp import DefaultsFormatter, Parser
from segfactory.console import PROGRESS_LINES_ENV, console
from segfactory.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    EXIT_USER,
    Interrupted,
    PartialFailure,
    UserError,
    kill_group_when_orphaned,
    log_on_broken_pipe,
    orphan_grace_s,
    sigterm_interrupts,
)

COMMAND_MODULES = ["segfactory.cli.synth", "segfactory.cli.pretrain", "segfactory.cli.finetune",
                   "segfactory.cli.pipelines", "segfactory.cli.samples"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="segfactory",
        description="Semantic segmentation without manual labels.",
    )
    parser.add_argument("--version", action="version", version=f"segfactory {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = commands.add_parser("bench", help="speed benchmarks (one JSON object on stdout, table on stderr)")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands, benches)
    for sub in benches.choices.values():  # a benchmark's numbers depend on every default: --help shows them
        sub.formatter_class = DefaultsFormatter
    return parser


def _print_user_error(e: UserError) -> None:
    """``error: <message>`` and ``  fix: <fix>`` on stderr."""
    from rich.markup import escape  # messages and fixes are plain text: pip install 'segfactory[tracking]'

    console.print(f"[bold red]error:[/] {escape(e.message)}", markup=True, soft_wrap=True)
    if e.fix:
        console.print(f"  [bold]fix:[/] {escape(e.fix)}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (README "Exit codes"): 0 ok, 1 a bug (traceback), 2 a user
    error (one line + fix), 3 some units failed after retries (listed), 4 another run holds the lock, 130
    interrupted by Ctrl-C or SIGTERM (finished work is kept, a re-run resumes; a command whose plain re-run is
    refused says how to resume in its ``rerun`` default, e.g. pretrain's "a re-run with --resume resumes")."""
    parser = build_parser()
    # `key=value` overrides may come after the options too; argparse only takes trailing positionals at once.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if hasattr(args, "overrides") and not any(u.startswith("-") for u in unknown):
            args.overrides = [*args.overrides, *unknown]  # a bare token is refused below, as every override is
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if os.environ.get(PROGRESS_LINES_ENV):  # a pipeline's stage process, or a torchrun rank it started
        log_on_broken_pipe()
        terminate_with_parent()
    try:
        with sigterm_interrupts():
            if getattr(args, "overrides", None):  # one line for a malformed override, before any work
                from segfactory.config import parse_override

                for item in args.overrides:
                    parse_override(item)
            check_out_dirs(args)
            return int(args.func(args) or 0)
    except UserError as e:
        if args.debug:
            console.print_exception()
        _print_user_error(e)
        return e.exit_code
    except PartialFailure as e:
        console.print(f"[bold red]error:[/] {e.message}", soft_wrap=True)
        for unit, why in e.failures.items():
            console.print(f"  {unit}: {why}", soft_wrap=True, markup=False)
        return EXIT_PARTIAL
    except KeyboardInterrupt as e:
        why = f" by {e.signame}" if isinstance(e, Interrupted) else ""
        with contextlib.suppress(OSError):  # a stage process whose driver is gone has no reader left
            console.print(f"interrupted{why}; finished work is kept and {getattr(args, 'rerun', 'a re-run resumes')}",
                          soft_wrap=True)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            console.print_exception()  # a bug, not a user mistake: keep the traceback
            return EXIT_INTERNAL
        # A full disk (or quota) is the machine's state, not a bug: one line naming where, like running out of
        # memory. Every output is committed last, so what was written before is either whole or not trusted.
        where = f" writing '{e.filename}'" if e.filename else ""
        _print_user_error(UserError(os.strerror(e.errno) + where, fix="free space on that disk (or raise the "
                                    "quota), or write to another one; a re-run resumes from what was committed"))
        return EXIT_USER
    except Exception:  # a bug, not a user mistake: keep the traceback
        console.print_exception()
        return EXIT_INTERNAL


def terminate_with_parent() -> None:
    """A pipeline's stage process (its driver set ``PROGRESS_LINES_ENV``) gets SIGTERM, not the SIGKILL its
    launcher asked for, when the Dask worker that started it dies: it then stops at a step boundary with a clean
    checkpoint (:class:`segfactory.errors.DeferredInterrupt`) instead of losing the steps since the last one. If
    it is still alive ``SEGFACTORY_ORPHAN_GRACE_S`` seconds later, its whole process group is SIGKILLed
    (:func:`segfactory.errors.kill_group_when_orphaned`)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    kill_group_when_orphaned(orphan_grace_s())
