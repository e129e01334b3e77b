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
