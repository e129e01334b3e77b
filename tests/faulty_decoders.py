"""A Pillow plugin for the ingest fault tests: a real image format whose decoder misbehaves on purpose.

Imported by ingest's decoder processes through ``decode.plugins=[faulty_decoders]``, the way a real plugin
(``pillow_heif.HeifImagePlugin``) would be. A file is 8 magic bytes and 64 x 64 8-bit gray pixels; the magic says
what decoding it does:

- ``SEGFINE\\n``: decodes normally (a plugin format ingests like any other);
- ``SEGHANG\\n``: never returns;
- ``SEGKILL\\n``: the decoder process SIGKILLs itself (as the kernel's OOM killer would);
- ``SEGHOG!\\n``: allocates and touches 4 GiB (past any small ``checks.decode_memory_mb``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
from PIL import Image, ImageFile

FORMAT = "SEGFAULTTEST"
SIZE = 64
FAULTS = {b"SEGFINE\n": "fine", b"SEGHANG\n": "hang", b"SEGKILL\n": "kill", b"SEGHOG!\n": "hog"}


def make(fault: str) -> bytes:
    """The bytes of a test file whose decoding does ``fault`` (fine, hang, kill, hog)."""
    magic = next(m for m, f in FAULTS.items() if f == fault)
    ramp = np.add.outer(np.arange(SIZE), np.arange(SIZE)).astype(np.uint8) * 2
    return magic + ramp.tobytes()


class FaultyImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "segfactory fault-test image"

    def _open(self) -> None:
        magic = self.fp.read(8)
        if magic not in FAULTS:
            raise SyntaxError("not a fault-test image")
        self.fault = FAULTS[magic]
        self._size = (SIZE, SIZE)
        self._mode = "L"
        self.tile = [ImageFile._Tile("raw", (0, 0, SIZE, SIZE), 8, ("L", 0, 1))]

    def load(self) -> Any:
        if self.fault == "hang":
            while True:
                time.sleep(1)
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "hog":
            hog = np.ones(4 << 30, np.uint8)  # touched, not just reserved
            del hog
        return super().load()


Image.register_open(FORMAT, FaultyImageFile, lambda prefix: prefix[:8] in FAULTS)
