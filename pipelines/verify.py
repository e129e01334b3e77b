"""``segfactory verify DIR [--repair]``: re-hash every committed unit against its commit mark.

``DIR`` is a rendered dataset, an ingest output, a ``segfactory run`` directory or a ``segfactory refresh`` root;
each unit found in it is checked against what its commit mark recorded:

- dataset shards: every frame file and ``coco.json`` against the shard's ``manifest.json``; shards that
  ``dataset.json`` lists but that are not committed are reported as missing;
- ingest shards: ``images.bin`` against the shard manifest's ``pack_sha256``;
- pipeline stages: every file against the sha256 list of their ``stage.json``;
- releases: every shard a release lists must be committed (a shard rendered again since, e.g. after a repair,
  is noted, not counted as a problem).

``--repair`` moves each corrupt unit aside (``.bad-<id>-<random>``, kept for inspection, never read) and drops
the marks that would let a re-run skip it (the ``stage.json`` of a run's render stage, the dataset's listing), so
re-running the command that made it (``render``, ``ingest``, ``run``, ``refresh``) rebuilds exactly those units.
Verification holds the writer lock of what it checks (a dataset's ``.render.lock``, an ingest output's, a run's
or a refresh root's): a render, ingest, run or refresh of the same directory that is running makes ``verify``
exit 4 before it reads anything, and one started while ``verify`` runs exits 4 (a nightly refresh then does its
work the next night). Without the lock a refresh's prune deleted stages and releases under it, reported as
corrupt or unreadable, and ``--repair`` moved units aside under a running writer. A directory this user cannot
write is verified without the lock (no writer of this user changes it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segfactory.console import console
from segfactory.errors import UserError
from segfactory.io import is_committed, move_aside, read_json


@dataclass
class VerifyReport:
    """What ``verify`` found: checked units, problems per unit (path relative to the root), repairs, notes."""

    root: Path
    kind: str
    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    repaired: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path != self.root else "."

    def bad(self, path: Path, problems: list[str]) -> None:
        self.problems.setdefault(self.rel(path), []).extend(problems)

    def as_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "kind": self.kind, "units_checked": self.checked,
                "bad_units": len(self.problems), "problems": self.problems, "repaired": self.repaired,
                "notes": self.notes}


def detect_kind(root: Path) -> str:
    """``dataset``, ``images`` (ingest output), ``refresh`` (refresh root) or ``run`` (run directory).

    Raises:
        UserError: ``root`` is none of them.
    """
    if not root.is_dir():
        raise UserError(f"'{root}' is not a directory", fix="pass a dataset, ingest output, run or refresh root")
    if (root / "dataset.json").is_file():
        return "dataset"
    if (root / "index.json").is_file() or any((root / "shards").glob("*/images.bin")):
        return "images"
    if (root / "releases").is_dir() or (root / "datasets").is_dir():
        return "refresh"
    if (root / "stages").is_dir():
        return "run"
    raise UserError(f"'{root}' holds no segfactory output (no dataset.json, index.json, stages/ or releases/)",
                    fix="pass the --out of render, ingest or run, or the --root of refresh")


def verify_dataset(ds: Path, rep: VerifyReport, repair: bool, lock: bool = True) -> None:
    """Check every committed shard of a dataset (listed or kept from another plan) and the listed ones exist;
    ``lock``: take the dataset's writer lock to repair it (False: the caller holds it)."""
    from pipelines.render import dataset_lock
    from pipelines.stages import STAGE_FILE
    from segfactory.formats.dataset import DATASET_FILE, committed_shards, shard_dir, verify_shard, write_dataset_meta

    try:
        meta = read_json(ds / DATASET_FILE)
        listed = [s["id"] for s in meta.get("shards", [])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.bad(ds / DATASET_FILE, [f"unreadable ({type(e).__name__}: {e})"])
        return
    on_disk = committed_shards(ds)
    for sid in listed:
        if sid not in on_disk:
            rep.bad(shard_dir(ds, sid), ["listed in dataset.json but not committed (missing)"])
    moved = []
    for sid in on_disk:
        rep.checked += 1
        problems = verify_shard(ds, sid)
        if problems:
            rep.bad(shard_dir(ds, sid), problems)
            if repair:
                moved.append(sid)
    if repair and (moved or any(sid not in on_disk for sid in listed)):
        with dataset_lock(ds, "repair of") if lock else contextlib.nullcontext():
            for sid in moved:
                rep.repaired[rep.rel(shard_dir(ds, sid))] = rep.rel(move_aside(shard_dir(ds, sid)))
            # dataset.json lists only intact shards now; a run's render stage is no longer marked done, so the
            # next run (or refresh, or render of the same config) renders what is missing.
            write_dataset_meta(ds, {k: v for k, v in meta.items() if k not in ("shards", "num_shards", "num_frames")},
                               listed)
            (ds / STAGE_FILE).unlink(missing_ok=True)


def verify_images(store: Path, rep: VerifyReport, repair: bool) -> None:
    """Check every committed shard of an ingest output; repair rebuilds ``index.json`` without the bad ones."""
    from segfactory.formats.images import committed_shards, shards_dir, verify_store

    rep.checked += len(committed_shards(store))
    # The images of moved shards are unknown to the store again (index rebuilt): the next ingest ingests them anew.
    problems, moved = verify_store(store, repair)
    for sid, found in problems.items():
        rep.bad(shards_dir(store) / sid, found)
        if sid in moved:
            rep.repaired[rep.rel(shards_dir(store) / sid)] = rep.rel(moved[sid])


def verify_stages(stages: Path, rep: VerifyReport, repair: bool) -> None:
    """Check every stage directory: datasets and image sets inside, then the files ``stage.json`` lists."""
    from pipelines.stages import STAGE_FILE, verify_stage

    for d in sorted(stages.iterdir()) if stages.is_dir() else []:
        if not d.is_dir() or d.name.startswith(".") or d.name == "configs":
            continue
        if (d / "dataset.json").is_file():
            verify_dataset(d, rep, repair)
        elif (d / "index.json").is_file() or (d / "shards").is_dir():
            verify_images(d, rep, repair)
        if not is_committed(d, STAGE_FILE) or (d / "dataset.json").is_file():
            continue
        rep.checked += 1
        problems = verify_stage(d)
        if problems:
            rep.bad(d, problems)
            if repair:
                rep.repaired[rep.rel(d)] = rep.rel(move_aside(d))


def verify_releases(root: Path, rep: VerifyReport) -> None:
    """Every shard a release lists must be committed where the release says."""
    from pipelines.refresh import list_releases
    from segfactory.formats.dataset import MANIFEST_FILE, shard_dir
    from segfactory.io import sha256_file

    for p in list_releases(root):
        rep.checked += 1
        try:
            r = read_json(p)
            ds = root / r["render"]["dataset"]
            shards = r["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            rep.bad(p, [f"unreadable ({type(e).__name__}: {e})"])
            continue
        missing, rerendered = [], []
        for s in shards:
            manifest = shard_dir(ds, s["id"]) / MANIFEST_FILE
            if not manifest.is_file():
                missing.append(s["id"])
            elif sha256_file(manifest) != s["manifest_sha256"]:
                rerendered.append(s["id"])
        if missing:
            rep.bad(p, [f"shard {sid} is not committed in {r['render']['dataset']}" for sid in missing])
        if rerendered:
            rep.notes.append(f"{rep.rel(p)}: {len(rerendered)} shard(s) rendered again since it was published "
                             f"(same scenes, new files): {', '.join(rerendered)}")


def run_verify(path: str | os.PathLike[str], repair: bool = False) -> VerifyReport:
    """Verify (and with ``repair`` move aside) every committed unit below ``path``; see the module docstring."""
    root = Path(path).resolve()
    kind = detect_kind(root)
    with _writer_lock(root, kind, repair):
        rep = _verify(root, kind, repair)
    for unit, problems in rep.problems.items():
        action = f"; moved aside to {rep.repaired[unit]}" if unit in rep.repaired else ""
        console.print(f"[red]{unit}[/]: {'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}{action}",
                      soft_wrap=True)
    for note in rep.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"verify {root} ({kind}): {rep.checked} unit(s) checked, {len(rep.problems)} with problems"
                  + (f", {len(rep.repaired)} moved aside: re-run the command that made them to rebuild them"
                     if rep.repaired else ""), soft_wrap=True)
    return rep


def _writer_lock(root: Path, kind: str, repair: bool) -> contextlib.AbstractContextManager[None]:
    """The lock the command that writes ``root`` holds (exit 4 while it runs); none for a read-only check of a
    directory this user cannot write."""
    from pipelines import ingest, refresh, render, run
    from pipelines.lock import exclusive_lock

    lock_file, writer = {"dataset": (render.LOCK_FILE, "render (or a refresh's prune)"),
                         "images": (ingest.LOCK_FILE, "ingest"), "run": (run.LOCK_FILE, "run"),
                         "refresh": (refresh.LOCK_FILE, "refresh")}[kind]
    if not repair and not os.access(root, os.W_OK):
        return contextlib.nullcontext()
    return exclusive_lock(root / lock_file, f"a {writer} of '{root}'",
                          fix="run verify when it has finished (verify must not read a directory being written)")


def _verify(root: Path, kind: str, repair: bool) -> VerifyReport:
    rep = VerifyReport(root, kind)
    if kind == "dataset":
        verify_dataset(root, rep, repair, lock=False)  # run_verify holds its lock
    elif kind == "images":
        verify_images(root, rep, repair)
    else:
        for ds in sorted((root / "datasets").glob("*")) if (root / "datasets").is_dir() else []:
            if ds.is_dir() and not ds.name.startswith("."):
                verify_dataset(ds, rep, repair)
        if (root / "real").is_dir():
            verify_images(root / "real", rep, repair)
        verify_stages(root / "stages", rep, repair)
        verify_releases(root, rep)
    return rep
