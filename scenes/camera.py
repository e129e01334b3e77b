"""Camera maths in NumPy: look-at rotations, projection and visibility checks used by camera sampling."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from scenes.spec import Camera, FloatArray


def look_at(location: npt.ArrayLike, target: npt.ArrayLike, up: npt.ArrayLike | None = None) -> FloatArray:
    """Camera-to-world rotation (3, 3) for a camera at ``location`` looking at ``target``.

    Blender cameras look down local -Z with +Y up, so the columns are (right, up, -forward).
    """
    up = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - np.asarray(location, dtype=np.float64)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-6:  # looking straight up/down: any right vector works
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    return np.stack([right, cam_up, -forward], axis=1)


def project(camera: Camera, points: npt.ArrayLike) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Project world points to normalised image coordinates.

    Args:
        camera: Camera spec (square image).
        points: (N, 3) world coordinates.

    Returns:
        uv: (N, 2) coordinates in [-1, 1] inside the image (x right, y up).
        in_front: (N,) bool, point lies in front of the camera within the clip range.
    """
    p = (np.asarray(points, dtype=np.float64) - np.asarray(camera.location)) @ camera.rotation
    depth = -p[:, 2]
    in_front = (depth > camera.clip_start) & (depth < camera.clip_end)
    if camera.projection == "orthographic":
        uv = p[:, :2] / (camera.ortho_scale / 2)
    else:
        uv = p[:, :2] / (np.maximum(depth, 1e-9)[:, None] * np.tan(camera.fov / 2))
    return uv, in_front


def visible_mask(camera: Camera, points: npt.ArrayLike, margin: float = 0.0) -> npt.NDArray[np.bool_]:
    """(N,) bool: point projects inside the frame (shrunk by ``margin`` in normalised units)."""
    uv, in_front = project(camera, points)
    visible: npt.NDArray[np.bool_] = in_front & (np.abs(uv) <= 1.0 - margin).all(axis=1)
    return visible


def frame_share(camera: Camera, points: npt.ArrayLike, sizes: npt.ArrayLike, cap: float) -> FloatArray:
    """(N,) each object's rough share of the frame: its size over the frame's height at its distance (at least
    0.5 m), squared, capped at ``cap``.

    Args:
        camera: Camera spec (perspective).
        points: (N, 3) world coordinates of the objects' centres.
        sizes: (N,) the objects' sizes (metres).
        cap: the largest share one object counts for.
    """
    dist = np.maximum(np.linalg.norm(np.asarray(points) - np.asarray(camera.location), axis=1), 0.5)
    share: FloatArray = np.minimum((np.asarray(sizes) / (dist * np.tan(camera.fov / 2))) ** 2, cap)
    return share


class BestTry:
    """The best of a camera's tries: a try that sees at least ``min_visible`` objects beats one that does not;
    among those the higher score wins, among the others the try that saw more. :meth:`offer` says when
    ``good_tries`` tries have seen enough (time to stop trying)."""

    def __init__(self, min_visible: int, good_tries: int) -> None:
        self.min_visible, self.good_tries = min_visible, good_tries
        self.best: Camera | None = None
        self._key: tuple[int, float] = (-1, -1.0)
        self._good = 0

    def offer(self, camera: Camera, visible: int, score: float) -> bool:
        """Consider one try (``visible`` objects in frame, its ``score``); True once enough tries saw enough."""
        met = visible >= self.min_visible
        key = (int(met), score if met else float(visible))
        if key > self._key:
            self.best, self._key = camera, key
            camera.visible_objects = visible
        self._good += met
        return self._good >= self.good_tries

    def result(self) -> Camera | None:
        """The best try, marked with whether it saw enough (``min_visible_met``); None if nothing was offered."""
        best = self.best
        if best is not None:
            best.min_visible_met = bool(best.visible_objects is not None and best.visible_objects >= self.min_visible)
        return best
