# pycocotools.mask for what segfactory does with it: one (H, W) mask at a time, RLE counts as bytes (as encode
# returns them). A (H, W, N) array would encode to a list of RLEs; nothing here passes one.
from typing import TypedDict

import numpy as np
import numpy.typing as npt

class RLE(TypedDict):
    size: list[int]
    counts: bytes

def encode(bimask: npt.NDArray[np.uint8]) -> RLE: ...
def decode(rleObjs: RLE) -> npt.NDArray[np.uint8]: ...
def area(rleObjs: RLE) -> np.uint32: ...
def toBbox(rleObjs: RLE) -> npt.NDArray[np.float64]: ...
