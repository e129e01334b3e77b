"""Placement without interpenetration: rejection sampling of 2D footprints in a rectangle.

A footprint is an object's outline seen from above, around its origin: a set of points (already turned by the
object's yaw) grown by a disc of radius ``pad``. A circle is one point with ``pad = r``; an irregular nucleus or
a car is its vertices with ``pad = 0``.

Two footprints at centres ``a`` and ``b`` count as overlapping by their extents along the line between the
centres, ``h_a(u) + h_b(-u)`` against the distance ``|b - a|`` (``h`` the support function, ``u`` the unit
direction from ``a`` to ``b``). When the extents fit in the distance, that line is a separating axis of the two
convex hulls, so the objects are disjoint; for circles this is the usual ``r_a + r_b <= d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from scenes.spec import FloatArray

Box = tuple[float, float, float, float]  # axis-aligned rectangle (x0, y0, x1, y1)


@dataclass(frozen=True)
class Footprint:
    """An object's outline from above, around its origin.

    Attributes:
        points: (V, 2) outline points relative to the object's origin, already rotated by its yaw.
        pad: Radius of the disc the points are grown by (a circle: one point at the origin, ``pad = r``).
    """

    points: FloatArray
    pad: float = 0.0

    @classmethod
    def circle(cls, radius: float) -> Footprint:
        return cls(np.zeros((1, 2)), float(radius))

    @classmethod
    def of_points(cls, xy: npt.ArrayLike, yaw: float = 0.0, pad: float = 0.0) -> Footprint:
        """Footprint of (V, 2) object-local points turned by ``yaw`` (radians about z)."""
        c, s = np.cos(yaw), np.sin(yaw)
        return cls(np.asarray(xy, dtype=np.float64) @ np.array([[c, s], [-s, c]]), float(pad))

    @property
    def radius(self) -> float:
        """Radius of the bounding circle around the origin."""
        return float(np.linalg.norm(self.points, axis=1).max()) + self.pad

    def support(self, u: FloatArray) -> FloatArray:
        """(K,) extent along each of the (K, 2) unit directions ``u``."""
        extent: FloatArray = (np.asarray(u) @ self.points.T).max(axis=1) + self.pad
        return extent


@dataclass(frozen=True)
class FootprintSet:
    """Footprints placed at centres, as arrays: centres (N, 2), outline points padded to a common count
    (N, V, 2), pads (N,) and bounding radii (N,)."""

    centers: FloatArray
    points: FloatArray
    pads: FloatArray
    radii: FloatArray

    @classmethod
    def of(cls, items: list[tuple[tuple[float, float], Footprint]]) -> FootprintSet:
        out = cls(np.zeros((0, 2)), np.zeros((0, 1, 2)), np.zeros(0), np.zeros(0))
        for center, fp in items:
            out = out.add(center, fp)
        return out

    def add(self, center: tuple[float, float], fp: Footprint) -> FootprintSet:
        """A new set with ``fp`` at ``center`` added."""
        pts = np.asarray(fp.points, dtype=np.float64)
        old = self.points
        # Outlines are padded to a common length by repeating their first point (the support is unchanged).
        if len(pts) < old.shape[1]:
            pts = np.concatenate([pts, np.repeat(pts[:1], old.shape[1] - len(pts), axis=0)])
        elif len(pts) > old.shape[1] and len(old):
            old = np.concatenate([old, np.repeat(old[:, :1], len(pts) - old.shape[1], axis=1)], axis=1)
        elif not len(old):
            old = np.zeros((0, len(pts), 2))
        return FootprintSet(np.vstack([self.centers, np.asarray(center, dtype=np.float64)[None]]),
                            np.concatenate([old, pts[None]]), np.append(self.pads, fp.pad),
                            np.append(self.radii, fp.radius))

    def clear(self, cand: FloatArray, fp: Footprint, max_overlap: float = 0.0) -> npt.NDArray[np.bool_]:
        """(T,) bool: ``fp`` centred at each of the (T, 2) candidates overlaps none of these by more than
        ``max_overlap`` (see the module docstring)."""
        ok = np.ones(len(cand), dtype=bool)
        if not len(self.centers):
            return ok
        d = cand[:, None, :] - self.centers[None]  # (T, N, 2), from each placed centre to the candidate
        dist = np.linalg.norm(d, axis=2)
        # Only pairs whose bounding circles meet need their outlines' extents along the centre line.
        t, n = np.nonzero(dist < (fp.radius + self.radii[None]) * (1 - max_overlap))
        if not len(t):
            return ok
        u = d[t, n] / np.maximum(dist[t, n], 1e-12)[:, None]
        extent_placed = np.einsum("kvc,kc->kv", self.points[n], u).max(axis=1) + self.pads[n]
        extent_new = fp.support(-u)
        bad = (dist[t, n] < (extent_placed + extent_new) * (1 - max_overlap)) | (dist[t, n] < 1e-12)
        ok[t[bad]] = False
        return ok


def place_footprints(rng: np.random.Generator, footprints: list[Footprint], x_range: tuple[float, float],
                     y_range: tuple[float, float], max_overlap: float = 0.0, tries: int = 200,
                     occupied: list[tuple[tuple[float, float], Footprint]] | None = None,
                     boxes: list[Box] | None = None, attract_to: tuple[float, float] | None = None
                     ) -> list[tuple[float, float] | None]:
    """Place footprints inside a rectangle so that they do not overlap each other, ``occupied`` or ``boxes``.

    Args:
        rng: Random generator.
        footprints: One per object, in placement order.
        x_range, y_range: Region the centres must lie in.
        max_overlap: Allowed overlap of two footprints as a fraction of their summed extents along the line
            between their centres (0 = disjoint, they may touch).
        tries: Candidate centres per footprint before giving up on it.
        occupied: (centre, footprint) of objects already placed, kept clear too (not modified).
        boxes: Axis-aligned rectangles (x0, y0, x1, y1), e.g. buildings, that every bounding circle stays out of.
        attract_to: Take the free candidate nearest this point instead of the first one: objects pack around
            it, touching their neighbours (a dense cluster of cells).

    Returns:
        A centre per footprint, or ``None`` where no free spot was found (callers drop those objects).
    """
    placed = FootprintSet.of(occupied or [])
    box_arr = np.asarray(boxes or [], dtype=np.float64).reshape(-1, 4)
    out: list[tuple[float, float] | None] = []
    for fp in footprints:
        cand = np.column_stack([rng.uniform(*x_range, size=tries), rng.uniform(*y_range, size=tries)])
        ok = placed.clear(cand, fp, max_overlap)
        if len(box_arr):
            ok &= (box_distance(cand, box_arr) >= fp.radius).all(axis=1)
        hit = np.flatnonzero(ok)
        if len(hit):
            if attract_to is not None:
                hit = hit[np.argsort(np.linalg.norm(cand[hit] - np.asarray(attract_to), axis=1), kind="stable")]
                cand[hit[0]] = _slide_towards(placed, fp, cand[hit[0]], np.asarray(attract_to, dtype=np.float64),
                                              max_overlap, box_arr)
            spot = (float(cand[hit[0], 0]), float(cand[hit[0], 1]))
            placed = placed.add(spot, fp)
            out.append(spot)
        else:
            out.append(None)
    return out


def _slide_towards(placed: FootprintSet, fp: Footprint, start: FloatArray, target: FloatArray, max_overlap: float,
                   boxes: FloatArray, steps: int = 14) -> FloatArray:
    """Move a free position along the straight line towards ``target`` as far as it stays free: bisection
    between the free ``start`` and the first blocked point, so the footprint ends up touching a neighbour
    (within 2**-steps of the distance) or at ``target``."""
    def free(p: FloatArray) -> bool:
        ok = bool(placed.clear(p[None], fp, max_overlap)[0])
        return ok and (not len(boxes) or bool((box_distance(p[None], boxes) >= fp.radius).all()))

    if free(target):
        return target.copy()
    lo, hi = 0.0, 1.0  # fraction of the way from start to target: lo is free, hi is blocked
    for _ in range(steps):
        mid = (lo + hi) / 2
        if free(start + mid * (target - start)):
            lo = mid
        else:
            hi = mid
    slid: FloatArray = start + lo * (target - start)
    return slid


def box_distance(points: FloatArray, boxes: FloatArray) -> FloatArray:
    """(P, B) distance from each of the (P, 2) points to each of the (B, 4) rectangles (0 inside)."""
    p, b = points[:, None, :], boxes[None]
    gap_x = np.maximum(np.maximum(b[..., 0] - p[..., 0], p[..., 0] - b[..., 2]), 0.0)
    gap_y = np.maximum(np.maximum(b[..., 1] - p[..., 1], p[..., 1] - b[..., 3]), 0.0)
    distance: FloatArray = np.hypot(gap_x, gap_y)
    return distance


def place_circles(rng: np.random.Generator, radii: FloatArray | list[float], x_range: tuple[float, float],
                  y_range: tuple[float, float], max_overlap: float = 0.0, tries: int = 200,
                  occupied: list[tuple[float, float, float]] | None = None) -> list[tuple[float, float] | None]:
    """:func:`place_footprints` for circles of the given radii; ``occupied`` holds circles (x, y, r)."""
    return place_footprints(rng, [Footprint.circle(r) for r in radii], x_range, y_range, max_overlap, tries,
                            [((x, y), Footprint.circle(r)) for x, y, r in occupied or []])
