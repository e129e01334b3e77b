"""What resuming a run needs from its directory: how the config changed, and its metrics log cut back to the
checkpoint (a JSONL file, one ``{"step": ...}`` record a line)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from segfactory.io import atomic_write_text


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The dotted keys whose values differ between two nested configs (sorted), leaving out ``ignore``."""
    a, b, skip = flatten(old), flatten(new), set(ignore)
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))


def describe_change(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> str | None:
    """``"KEY was A, now B (and N more)"`` for the first differing key, or None when nothing (else) changed."""
    diff = changed_keys(old, new, ignore)
    if not diff:
        return None
    a, b = flatten(old), flatten(new)

    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 60 else r[:57] + "..."

    k = diff[0]
    return (f"{k} was {short(a.get(k))}, now {short(b.get(k))}"
            + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSONL file ([] when it does not exist); a torn line (a run killed mid-write) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict)]


def truncate_jsonl(path: str | os.PathLike[str], step: int) -> None:
    """Drop the records logged after ``step`` (a resumed run logs them again), and torn lines; kept lines stay
    byte for byte. Nothing happens when the file does not exist."""
    p = Path(path)
    if not p.is_file():
        return
    keep = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line + "\n")
    atomic_write_text(p, "".join(keep))
