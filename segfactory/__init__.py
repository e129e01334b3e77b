"""segfactory: semantic segmentation without manual labels."""

from __future__ import annotations

import functools
import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("segfactory")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def code_version(*packages: str) -> str:
    """The package version plus a hash of the Python sources of ``packages`` (default: all of segfactory).

    Cached outputs (shard ids, pipeline stage keys) are keyed by this, so editing the code that produced them
    invalidates them even when the release number did not change, while editing another stage's code does not.

    Args:
        packages: Top-level package names, e.g. ``"scenes", "synth"`` for what decides rendered pixels, or
            single modules of them (``"segfactory.seeds"``: shared core code a stage's output depends on).

    Returns:
        ``"<version>+<12 hex digits>"``.
    """
    names = packages or ("segfactory", "scenes", "synth", "pretrain", "finetune", "pipelines")
    h = hashlib.sha256()
    for name in sorted(names):
        pkg = _ROOT.joinpath(*name.split("."))
        if pkg.is_dir():
            files = sorted(pkg.rglob("*.py"))
        elif pkg.with_suffix(".py").is_file():
            files = [pkg.with_suffix(".py")]
        else:
            raise ValueError(f"code_version: no package or module '{name}' next to segfactory/")
        for path in files:
            h.update(path.relative_to(_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:12]}"
