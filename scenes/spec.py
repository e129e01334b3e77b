"""Plain-data scene specs: everything ``synth`` needs to build a scene in Blender, and nothing Blender-specific.

A spec is sampled from an explicit ``numpy.random.Generator`` by a registered scene family and can be
inspected, tested and serialised without Blender. Units are metres (cells: micrometres), angles radians.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Vec3 = tuple[float, float, float]
TextureKind = Literal["noise", "voronoi", "wave", "brick"]
LightType = Literal["POINT", "SUN", "AREA", "SPOT"]
FloatArray = npt.NDArray[np.float64]


def vec3(values: Iterable[float] | FloatArray) -> Vec3:
    """Exactly three numbers (a list, a tuple, a NumPy row) as a ``Vec3`` of Python floats."""
    x, y, z = (float(v) for v in values)
    return (x, y, z)


@dataclass(frozen=True)
class ClassDef:
    """One semantic class. ``thing`` classes get instance ids and COCO annotations; stuff classes do not."""

    id: int
    name: str
    color: tuple[int, int, int]
    thing: bool = False


@dataclass
class Mesh:
    """Polygon mesh in object-local coordinates.

    Attributes:
        vertices: (V, 3) float32 positions.
        faces: (F, K) int32 vertex indices; all faces of one mesh have K corners (3 or 4).
        smooth: Shade smooth (curved objects) or flat (boxes).
    """

    vertices: npt.NDArray[np.float32]
    faces: npt.NDArray[np.int32]
    smooth: bool = False

    def bounds(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        return self.vertices.min(axis=0), self.vertices.max(axis=0)


@dataclass
class Material:
    """A procedural material.

    ``shader="principled"`` is a lit surface; ``shader="emission"`` glows with ``emission`` strength and
    ignores lights (used for fluorescence). A ``texture`` blends ``color`` and ``color2`` through a
    shader-node noise/voronoi/wave texture whose 4D ``texture_w`` coordinate makes every sample unique.

    An ``image`` (a texture computed in NumPy, e.g. a nucleus with its nucleoli and chromatin) multiplies
    ``color``: it is projected top-down onto the object, its (H, W) texels covering the object-local
    rectangle ``image_bounds`` = (x0, y0, x1, y1), row 0 at y0; texel values are linear and may exceed 1.

    ``texture="brick"`` lays bricks of ``color`` in mortar of ``color2``, ``texture_scale`` bricks per unit
    (rows run along the object's x/y, courses along z). ``bump`` > 0 perturbs the normals by the texture's
    height (asphalt grain, brick joints, plaster): 0 is flat, 1 is strong.
    """

    color: Vec3
    shader: Literal["principled", "emission"] = "principled"
    roughness: float = 0.5
    metallic: float = 0.0
    emission: float = 0.0
    texture: Literal["none"] | TextureKind = "none"
    color2: Vec3 | None = None
    texture_scale: float = 5.0
    texture_w: float = 0.0
    texture_detail: float = 2.0
    image: npt.NDArray[np.float32] | None = None
    image_bounds: tuple[float, float, float, float] | None = None
    bump: float = 0.0


@dataclass
class Part:
    """One mesh of an object with its own material (a car's body and its wheels are parts of one object)."""

    mesh: Mesh
    material: Material


@dataclass
class SceneObject:
    """A labeled object: all its parts share one class and (for things) one instance id.

    ``defocus`` blurs the light of this object alone (a Gaussian of that sigma in scene units, e.g. a nucleus
    outside the focal plane). It is applied after rendering, from the label pass's object index, so the
    object's labels stay those of its geometry. ``emits`` says whether the object has light of its own that
    defocus spreads (``None``: every object that is not of the background class; a black slide has none, an
    out-of-plane nucleus labeled background does).
    """

    name: str
    class_id: int
    parts: list[Part]
    location: Vec3 = (0.0, 0.0, 0.0)
    rotation: Vec3 = (0.0, 0.0, 0.0)  # XYZ Euler
    scale: Vec3 = (1.0, 1.0, 1.0)
    defocus: float = 0.0
    emits: bool | None = None


@dataclass
class Light:
    """A light. ``energy`` is W (point, area, spot) or W/m2 (sun); it shines along its local -Z (``rotation``).

    ``size`` is an area light's edge (point and spot: a quarter of it is the radius that softens shadows);
    ``angle`` is a sun's angular diameter (2 degrees: crisp shadows; 20 and more: a hazy, overcast sun);
    ``spot_size`` is a spot's cone angle and ``spot_blend`` the softness of its rim (Blender's defaults);
    ``view`` makes the light shine in that view only (an index into the scene's cameras: a flash fired by that
    view's camera); ``None``, the default, in every view.
    """

    type: LightType
    location: Vec3
    rotation: Vec3 = (0.0, 0.0, 0.0)
    energy: float = 100.0
    color: Vec3 = (1.0, 1.0, 1.0)
    size: float = 0.5
    angle: float = float(np.radians(2.0))
    spot_size: float = float(np.radians(45.0))
    spot_blend: float = 0.15
    view: int | None = None


@dataclass
class World:
    """Background: a vertical gradient from ``horizon_color`` to ``zenith_color`` (equal colors: uniform)."""

    horizon_color: Vec3 = (0.05, 0.05, 0.05)
    zenith_color: Vec3 = (0.05, 0.05, 0.05)
    strength: float = 1.0


@dataclass
class Camera:
    """A camera pose.

    Attributes:
        location: (3,) position.
        rotation: (3, 3) camera-to-world rotation; the camera looks down its local -Z with +Y up.
        projection: "perspective" (``fov`` radians, square image) or "orthographic" (``ortho_scale`` units).
        visible_objects: Labeled objects whose centre the sampler found in frame (``None``: not checked).
        min_visible_met: False when no try reached ``camera.min_visible_objects`` and the try that saw the
            most objects was kept.
        kind: What sort of camera the family placed (``street``: "dashcam", "pedestrian" or "surveillance");
            ``None`` where a family has one sort only. Recorded in each frame's manifest entry.
    """

    location: Vec3
    rotation: FloatArray
    projection: Literal["perspective", "orthographic"] = "perspective"
    fov: float = 0.9
    ortho_scale: float = 10.0
    clip_start: float = 0.05
    clip_end: float = 500.0
    visible_objects: int | None = None
    min_visible_met: bool = True
    kind: str | None = None


@dataclass
class PostFX:
    """Per-frame image-space post-processing, applied to the 8/16-bit RGB after rendering.

    The fields after ``gamma`` default to "off", which leaves the older effects' results unchanged. A
    ``linear`` frame (film ``raw``: the render holds linear light) is modelled as a camera: ``gain`` first,
    per-object and frame defocus, then uneven illumination, vignetting and background glow, exposure as a
    plain factor, shot and read noise, and with ``camera_bits`` an ADC of that many bits whose counts
    (clipped at 2**bits - 1: saturation) are stored plus ``camera_offset`` in the output integers.
    """

    exposure: float = 0.0  # stops
    blur_sigma: float = 0.0  # px, Gaussian (defocus)
    noise_std: float = 0.0  # additive Gaussian sensor noise, fraction of full scale
    poisson_peak: float = 0.0  # >0: Poisson shot noise with this photon count at full scale
    gamma: float = 1.0
    linear: bool = False  # the render is linear light (film "raw"): exposure is a plain factor
    gain: float = 1.0  # linear factor applied to the render first (undoes a scene's render headroom)
    illumination: float = 0.0  # amplitude of a smooth random multiplicative illumination field (0.2: +-20 %)
    vignetting: float = 0.0  # share of light lost in the image corners (radial falloff)
    background: float = 0.0  # additive background glow, fraction of full scale (also unevenly lit)
    camera_bits: int = 0  # >0: ADC bits; counts 0..2**bits-1, stored plus camera_offset (0: full output range)
    camera_offset: int = 0  # added to the counts (sCMOS frames: e.g. 100, or 32768 for a signed-offset 12-bit)
    # Street cameras. Only lens_k1 moves pixels, and it moves the labels (object index, depth) with them.
    fog_density: float = 0.0  # per scene unit: light from d away keeps exp(-d * density) (visibility 3/density)
    fog_color: Vec3 = (0.7, 0.7, 0.7)  # display-referred 0..1: what fully fogged pixels (and the sky) look like
    white_balance: Vec3 = (1.0, 1.0, 1.0)  # per-channel gains on linear light (a camera's white-balance error)
    motion_blur: float = 0.0  # px: length of a straight camera shake / pan streak
    motion_angle: float = 0.0  # radians: its direction in the image, 0 = along +x (rows), pi/2 = along +y (down)
    chromatic_aberration: float = 0.0  # px of lateral CA at the image corners: red scaled outwards, blue inwards
    lens_k1: float = 0.0  # radial distortion, -0.3..0.3: < 0 barrel, > 0 pincushion (see synth.postfx.lens_maps)


@dataclass
class SceneSpec:
    """A complete scene: objects, lights, world, camera views and per-view post-processing.

    Attributes:
        family: Registered scene family that sampled it.
        background_class: Class id of pixels where no object is hit (sky, slide background).
        cameras: One entry per rendered view.
        post: One entry per view, same length as ``cameras``.
        grayscale: Render as a single-channel image.
    """

    family: str
    classes: list[ClassDef]
    background_class: int
    objects: list[SceneObject] = field(default_factory=list)
    lights: list[Light] = field(default_factory=list)
    world: World = field(default_factory=World)
    cameras: list[Camera] = field(default_factory=list)
    post: list[PostFX] = field(default_factory=list)
    grayscale: bool = False
    film: Literal["standard", "filmic", "agx", "raw"] = "agx"  # raw: linear light, e.g. fluorescence

    def dark_objects(self) -> npt.NDArray[np.bool_]:
        """(N+1,) whether each object index emits no light of its own (index 0, nothing hit: True)."""
        return np.array([True] + [not (o.emits if o.emits is not None else o.class_id != self.background_class)
                                  for o in self.objects], dtype=bool)

    def class_of_object(self) -> npt.NDArray[np.int32]:
        """(N+1,) class id per object index; index 0 is the background."""
        return np.array([self.background_class] + [o.class_id for o in self.objects], dtype=np.int32)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        names = {c.id: c.name for c in self.classes}
        for o in self.objects:
            counts[names[o.class_id]] = counts.get(names[o.class_id], 0) + 1
        return {"family": self.family, "objects": counts, "lights": len(self.lights), "views": len(self.cameras)}


def footprint_radius(parts: list[Part]) -> float:
    """Radius of an object's footprint around its origin: any yaw stays inside it, so disjoint circles of
    this radius mean no interpenetration."""
    return float(max(np.linalg.norm(p.mesh.vertices[:, :2], axis=1).max() for p in parts))


def to_jsonable(obj: Any) -> Any:
    """Dataclass/NumPy tree -> JSON-friendly tree (for debugging dumps and hashing)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
