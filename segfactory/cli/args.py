"""Argument types and helpers shared by the commands: output directories are checked before any work starts, and a
refused command leaves no empty one behind."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from segfactory.errors import EXIT_USER, UserError
from segfactory.formats import output_kind


class OutDir(str):
    """A directory argument (``--out``, ``--root``) that is created if missing; :func:`check_out_dirs` checks it."""

    flag: str
    run: bool


def out_dir(flag: str, *, run: bool = False) -> Callable[[str], OutDir]:
    """An argparse ``type`` for the directory flag ``flag`` (e.g. ``--root``).

    Args:
        flag: The flag, named in errors.
        run: The directory receives a stage's run or report files (finetune, pretrain, evaluate, predict,
            export): one already holding another kind of segfactory output (a rendered dataset, an ingest
            store) is refused, so its files (``config.yaml``, ...) are never replaced.
    """

    def parse(value: str) -> OutDir:
        v = OutDir(value)
        v.flag = flag
        v.run = run
        return v

    return parse


def check_out_dirs(args: argparse.Namespace) -> None:
    """Every :class:`OutDir` argument is a directory or can become one: neither it nor a parent is a file, and a
    run directory (``out_dir(..., run=True)``) holds no rendered dataset or ingest store. Each becomes a plain
    ``str`` in ``args``.

    Raises:
        UserError: naming the flag, the path and what is in the way.
    """
    for key, value in list(vars(args).items()):
        if not isinstance(value, OutDir):
            continue
        setattr(args, key, str(value))  # a plain str from here on (saved with the run's arguments)
        path = Path(value).expanduser()
        for p in (path, *path.parents):
            if p.exists() or p.is_symlink():
                if not p.is_dir():
                    what = "is a file" if p == path else f"is not writable: '{p}' is a file"
                    raise UserError(f"{value.flag} '{value}' {what}, not a directory",
                                    fix=f"point {value.flag} at a directory (it is created if missing)")
                break
        kind = output_kind(path) if value.run and path.is_dir() else None
        if kind:
            raise UserError(f"{value.flag} '{value}' holds {kind}: this command's files would replace or mix "
                            "with its files", fix=f"point {value.flag} at a new directory (or at this command's "
                            "own earlier output)")


@contextlib.contextmanager
def no_empty_out_on_user_error(out: str | os.PathLike[str]) -> Iterator[None]:
    """On a user error (exit 2, nothing done) remove ``out`` when this invocation created it and wrote nothing but
    hidden files (its run lock, a write probe) into it: a refused ``--images``/``--unlabeled`` leaves no empty
    run dir behind. A dir that held anything before, or got a real output (logs, checkpoints), is kept."""
    path = Path(out)
    existed = path.exists() or path.is_symlink()
    try:
        yield
    except UserError as e:
        if not existed and e.exit_code == EXIT_USER and path.is_dir() and not any(
                not f.startswith(".") for _root, _dirs, files in os.walk(path) for f in files):
            shutil.rmtree(path, ignore_errors=True)
        raise
