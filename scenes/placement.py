"""Placement without interpenetration: rejection sampling of bounding circles in a 2D region."""

from __future__ import annotations

import numpy as np


def place_circles(rng: np.random.Generator, radii: np.ndarray | list[float], x_range: tuple[float, float],
                  y_range: tuple[float, float], max_overlap: float = 0.0, tries: int = 200,
                  occupied: list[tuple[float, float, float]] | None = None) -> list[tuple[float, float] | None]:
    """Place circles of the given radii inside a rectangle so that they do not intersect.

    Args:
        rng: Random generator.
        radii: Radius of each circle's footprint.
        x_range, y_range: Region the centres must lie in.
        max_overlap: Allowed overlap as a fraction of the sum of radii (0 = disjoint; cells may touch).
        tries: Attempts per circle before giving up on it.
        occupied: Circles (x, y, r) already placed (kept clear too).

    Returns:
        A centre per circle, or ``None`` where no free spot was found (callers drop those objects).
    """
    placed = list(occupied or [])
    out: list[tuple[float, float] | None] = []
    for r in radii:
        spot = None
        for _ in range(tries):
            x = rng.uniform(*x_range)
            y = rng.uniform(*y_range)
            if all((x - px) ** 2 + (y - py) ** 2 >= ((r + pr) * (1 - max_overlap)) ** 2 for px, py, pr in placed):
                spot = (float(x), float(y))
                break
        if spot is not None:
            placed.append((spot[0], spot[1], float(r)))
        out.append(spot)
    return out
