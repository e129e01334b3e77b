"""Run BlenderProc 2.8 in-process on the PyPI ``bpy`` module.

``import blenderproc`` normally runs ``SetupUtility.setup`` (pip-installs into Blender's own Python, rewrites
``sys.argv``, drops site-packages from ``sys.path``) and ``bproc.init()`` trips over the UI language
preference, which the headless module does not have. We build the package module without executing its
``__init__`` and replay the few steps of ``init()`` that matter. Only render subprocesses import this.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from types import ModuleType

_API = ["loader", "utility", "sampler", "math", "postprocessing", "writer", "material", "lighting", "camera",
        "renderer", "world", "constructor", "types", "object", "filter"]


def import_blenderproc(temp_dir: str) -> ModuleType:
    """Import BlenderProc's public API as ``bproc`` and initialise a clean scene.

    Args:
        temp_dir: Where Blender writes its intermediate render outputs.

    Returns:
        The ``blenderproc`` module with its API sub-modules attached, like ``import blenderproc as bproc``.
    """
    if "blenderproc" in sys.modules and getattr(sys.modules["blenderproc"], "_segfactory_booted", False):
        return sys.modules["blenderproc"]
    os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"  # must precede the first cv2 import; Blender writes EXR passes
    import bpy

    spec = importlib.util.find_spec("blenderproc")
    if spec is None:
        raise RuntimeError("blenderproc is not installed")
    bproc = importlib.util.module_from_spec(spec)  # a package module whose __init__ we never execute
    sys.modules["blenderproc"] = bproc
    from blenderproc.version import __version__

    bproc.__version__ = __version__
    for name in _API:
        setattr(bproc, name, importlib.import_module(f"blenderproc.api.{name}"))
    from blenderproc.python.renderer import RendererUtility
    from blenderproc.python.utility.GlobalStorage import GlobalStorage
    from blenderproc.python.utility.Initializer import _Initializer, clean_up
    from blenderproc.python.utility.Utility import Utility

    bproc.clean_up = clean_up
    Utility.temp_dir = temp_dir
    os.makedirs(temp_dir, exist_ok=True)
    # bproc.init() without the language preference step.
    clean_up(clean_up_camera=True)
    bpy.context.scene.render.engine = "CYCLES"
    RendererUtility.set_render_devices()
    _Initializer.set_default_parameters()
    GlobalStorage.add("bproc_init_complete", True)
    bproc._segfactory_booted = True
    return bproc


def purge_blender_tempdir() -> None:
    """Remove Blender's session temp dir (``bpy.app.tempdir``, a ``blender_XXXXXX`` directory Blender creates in
    ``$TMPDIR`` at import and removes only in its own teardown). Call it before ``os._exit``, which render processes
    use to skip that teardown (bpy 4.2 can segfault in it): otherwise every render process leaves one behind."""
    bpy = sys.modules.get("bpy")
    path = getattr(getattr(bpy, "app", None), "tempdir", "") if bpy is not None else ""
    if path and os.path.basename(os.path.normpath(path)).startswith("blender_"):
        shutil.rmtree(path, ignore_errors=True)
