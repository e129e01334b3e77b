"""Nucleus appearance for fluorescence microscopy, computed in NumPy: a texture per nucleus that the renderer
projects top-down onto the nucleus' mesh (no Blender here).

A texture holds everything that makes a DNA-stained nucleus look like one, inside the outline of its mesh:
the falloff of a flattened ellipsoid towards its edge, a brighter nuclear-envelope rim, multi-scale chromatin
texture, nucleoli (dark holes in the DNA stain, with a brighter rim of perinucleolar chromatin; optionally
bright) and bright chromocentre speckles. Because it is the nucleus' own material, every part of it is labeled
``nucleus`` by the label pass, which decides labels from objects only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from scenes.spec import FloatArray, Mesh

EDGE_FLOOR = 0.3  # brightness at the very edge of a nucleus, relative to its interior before texture
MAX_TEXELS = 160  # per side: bounds a texture's size for nuclei that cover many pixels


@dataclass
class NucleusLook:
    """How one nucleus looks. Lengths in micrometres; contrasts relative to the nucleus' mean brightness.

    Attributes:
        chromatin_contrast: Spread of the chromatin texture (about its coefficient of variation).
        chromatin_scales: Feature sizes (Gaussian sigmas) of the texture's octaves, finest first; coarser octaves
            weigh less (real chromatin is mostly fine-grained, with gentle large-scale variation).
        rim: Extra brightness at the nuclear envelope (0.5: +50 % at the edge).
        rim_width: Decay length of the rim inwards.
        edge_width: Width over which the brightness rises from ``EDGE_FLOOR`` at the outline to the interior.
        nucleoli: Number of nucleoli.
        nucleolus_radius: (low, high) radius of each nucleolus.
        nucleolus_contrast: Relative change inside a nucleolus (-0.7: 70 % darker; > 0: brighter).
        speckle_density: Bright chromocentre speckles per square micrometre.
        speckle_brightness: Mean peak of a speckle, relative to the nucleus' mean.
        speckle_size: Gaussian sigma of a speckle.
    """

    chromatin_contrast: float = 0.2
    chromatin_scales: tuple[float, ...] = (0.4, 1.0, 2.5)
    rim: float = 0.0
    rim_width: float = 0.5
    edge_width: float = 1.0
    nucleoli: int = 0
    nucleolus_radius: tuple[float, float] = (0.8, 1.5)
    nucleolus_contrast: float = -0.6
    speckle_density: float = 0.0
    speckle_brightness: float = 1.0
    speckle_size: float = 0.3


def outline_radius(mesh: Mesh, azimuths: FloatArray) -> FloatArray:
    """Radius of a star-shaped mesh's top-down silhouette along each azimuth (radians), exact for its
    triangles: the farthest crossing of the ray from the origin with any projected triangle edge."""
    xy = mesh.vertices[:, :2].astype(np.float64)
    edges = np.stack([mesh.faces, np.roll(mesh.faces, -1, axis=1)], axis=-1).reshape(-1, 2)
    edges = np.unique(np.sort(edges, axis=1), axis=0)  # each inner edge is shared by two faces
    p0, p1 = xy[edges[:, 0]], xy[edges[:, 1]]
    e = p1 - p0
    u = np.stack([np.cos(azimuths), np.sin(azimuths)], axis=1)  # (A, 2)
    denom = u[:, None, 0] * e[None, :, 1] - u[:, None, 1] * e[None, :, 0]  # cross(u, e): (A, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (p0[None, :, 0] * e[None, :, 1] - p0[None, :, 1] * e[None, :, 0]) / denom
        s = (p0[None, :, 0] * u[:, None, 1] - p0[None, :, 1] * u[:, None, 0]) / denom
    hit = (np.abs(denom) > 1e-12) & (s >= -1e-9) & (s <= 1 + 1e-9) & (t > 0)
    radius: FloatArray = np.where(hit, t, 0.0).max(axis=1)
    return radius


def nucleus_texture(rng: np.random.Generator, mesh: Mesh, look: NucleusLook, texel: float
                    ) -> tuple[npt.NDArray[np.float32], tuple[float, float, float, float]]:
    """A nucleus' texture over its mesh's top-down bounding box.

    Args:
        rng: Generator for the texture's random parts.
        mesh: The nucleus mesh (object-local, star-shaped around its origin).
        look: What to draw.
        texel: Wanted texel size in micrometres (coarsened so that no side exceeds ``MAX_TEXELS``).

    Returns:
        (H, W) float32 texture with mean 1 inside the outline (row 0 at the lowest y), and its object-local
        bounds (x0, y0, x1, y1).
    """
    lo, hi = mesh.vertices[:, :2].min(axis=0).astype(np.float64), mesh.vertices[:, :2].max(axis=0).astype(np.float64)
    ext = hi - lo
    texel = max(texel, float(ext.max()) / MAX_TEXELS)
    nx, ny = (max(int(np.ceil(e / texel)), 8) for e in ext)
    dx, dy = ext[0] / nx, ext[1] / ny
    x = lo[0] + (np.arange(nx) + 0.5) * dx  # texel centres, where Blender samples them
    y = lo[1] + (np.arange(ny) + 0.5) * dy
    xx, yy = np.meshgrid(x, y)
    az = np.linspace(-np.pi, np.pi, 129)
    rho = np.interp(np.arctan2(yy, xx), az, outline_radius(mesh, az))
    inside = np.hypot(xx, yy) <= rho
    if not inside.any():
        inside[ny // 2, nx // 2] = True
    depth = ndimage.distance_transform_edt(inside, sampling=(dy, dx))  # micrometres inside the outline

    t = np.minimum(depth / max(look.edge_width, 1e-6), 1.0)
    tex = EDGE_FLOOR + (1 - EDGE_FLOOR) * np.sqrt(1 - (1 - t) ** 2)  # a flattened ellipsoid's edge
    tex *= 1 + look.rim * np.exp(-depth / max(look.rim_width, 1e-6))

    if look.chromatin_contrast > 0 and look.chromatin_scales:
        field = np.zeros((ny, nx))
        for k, scale in enumerate(look.chromatin_scales):
            octave = ndimage.gaussian_filter(rng.normal(size=(ny, nx)), (scale / dy, scale / dx), mode="wrap")
            field += octave / max(octave.std(), 1e-9) * rng.uniform(0.5, 1.5) * 0.6**k
        field /= max(field[inside].std(), 1e-9)
        tex *= np.exp(look.chromatin_contrast * field - look.chromatin_contrast**2 / 2)

    cand = np.argwhere(inside)
    for _ in range(look.nucleoli):
        r = float(rng.uniform(*look.nucleolus_radius))
        ok = cand[depth[cand[:, 0], cand[:, 1]] > r * 1.2]
        if not len(ok):
            break
        cy, cx = ok[rng.integers(len(ok))]
        dist = np.hypot(xx - x[cx], yy - y[cy])
        c = look.nucleolus_contrast * float(rng.uniform(0.7, 1.3))
        # A flat-topped disc, and around dark nucleoli a thin brighter shell of perinucleolar chromatin.
        ring = max(-c, 0.0) * 0.5 * float(rng.uniform(0.3, 1.0))
        tex *= 1 + max(c, -0.95) * np.exp(-((dist / r) ** 4)) + ring * np.exp(-(((dist - r) / (0.35 * r)) ** 2))

    mean = float(tex[inside].mean())
    n_speckles = rng.poisson(look.speckle_density * float(inside.sum()) * dx * dy)
    if n_speckles:
        spots = np.zeros((ny, nx))
        at = cand[rng.integers(len(cand), size=n_speckles)]
        np.add.at(spots, (at[:, 0], at[:, 1]), rng.lognormal(0.0, 0.4, size=n_speckles))
        sy, sx = max(look.speckle_size / dy, 0.5), max(look.speckle_size / dx, 0.5)
        # A filtered impulse peaks at 1 / (2 pi sx sy): scale so each speckle peaks at its amplitude.
        spots = ndimage.gaussian_filter(spots, (sy, sx), mode="constant") * (2 * np.pi * sx * sy)
        tex += mean * look.speckle_brightness * spots * np.minimum(depth / max(look.edge_width, 1e-6), 1.0)
    tex /= float(tex[inside].mean())
    return tex.astype(np.float32), (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
