"""Turn :class:`~scenes.spec.SceneSpec` data into a Blender scene through BlenderProc, and render it.

Each scene is rendered in two passes over all its camera views:

1. **Color**: Cycles with few adaptive samples and OpenImageDenoise; compositing off.
2. **Labels**: one sample per pixel through a 0.01 px wide pixel filter and no bounces, so every pixel's
   object index and depth come from one ray through the pixel centre, where the RGB's symmetric
   reconstruction filter is centred. Labels must not depend on how an index pass inside the color render
   happens to be sampled (sample 0's filter offset, depth of field, motion blur, adaptive sampling): this
   pass fixes all of that and costs one sample per pixel. (Measured on Blender 4.2: Cycles already puts
   sample 0 at the pixel centre, so there the color render's own index pass agreed with this one; the
   separate pass keeps the guarantee whatever the color settings or the Blender version.)

Only render subprocesses import this module (it imports ``bpy``).
"""

from __future__ import annotations

import os

# OpenCV decides at import whether it may read EXR (Blender's label passes); set it before anyone imports cv2.
os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"

import glob
import time
from dataclasses import dataclass

import numpy as np

from scenes.spec import Camera, Material, SceneSpec, World
from synth.bproc_boot import import_blenderproc
from synth.config import OutputSettings, RenderSettings

LABEL_FILTER_WIDTH = 0.01  # Blender's minimum; effectively a delta filter at the pixel centre
_FILM = {"standard": "Standard", "filmic": "Filmic", "agx": "AgX", "raw": "Raw"}
BUMP_DISTANCE = 0.01  # object units of relief at bump 1 (brick joints, asphalt grain)


@dataclass
class RenderedView:
    """Raw outputs of one view.

    Attributes:
        rgb: (H, W, 3) or (H, W) uint8/uint16 as written by Blender.
        index: (H, W) int32 object index (0 = background, i = spec.objects[i - 1]).
        depth: (H, W) float32 distance along the view axis in scene units (inf where nothing is hit).
    """

    rgb: np.ndarray
    index: np.ndarray
    depth: np.ndarray


class SceneBuilder:
    """Creates a spec's objects, materials, lights, world and camera poses through BlenderProc.

    Args:
        bproc: The booted BlenderProc module (see :func:`~synth.bproc_boot.import_blenderproc`).
        bit_depth: Bit depth of the RGB PNGs Blender writes.
    """

    def __init__(self, bproc, bit_depth: int = 8):
        import bpy

        self.bproc = bproc
        self.bpy = bpy
        self.bit_depth = bit_depth

    def build(self, spec: SceneSpec) -> None:
        """Create the spec's objects, lights, world and camera poses (after clearing the previous scene)."""
        bproc, bpy = self.bproc, self.bpy
        bproc.clean_up(clean_up_camera=False)
        # Persistent data keeps Cycles' session between renders: a scene's color pass, label pass and views share
        # its synced geometry. Between scenes it is dropped (switching persistence off frees the session):
        # - kept across scenes, it held on to something of every earlier scene: one street scene rendered 10 times
        #   grew the process's RSS by 5.2 MB each time; dropped, RSS was flat after the second (README, "memory");
        # - Cycles rendered a new image allocated where a previous scene's freed one was with the old pixels (it
        #   knows images by their datablock); dropped, each scene's images are read afresh (tests/test_render.py).
        bpy.context.scene.render.use_persistent_data = False
        bpy.context.scene.render.use_persistent_data = True
        materials: dict[int, object] = {}
        for index, obj in enumerate(spec.objects, start=1):
            for j, part in enumerate(obj.parts):
                key = id(part.material)
                if key not in materials:
                    materials[key] = self._material(f"{obj.name}_{j}", part.material)
                mo = bproc.object.create_with_empty_mesh(f"{obj.name}.{j}")
                mesh = mo.get_mesh()
                v, f = part.mesh.vertices, part.mesh.faces
                mesh.vertices.add(len(v))
                mesh.vertices.foreach_set("co", v.astype(np.float32).ravel())
                mesh.loops.add(f.size)
                mesh.loops.foreach_set("vertex_index", f.astype(np.int32).ravel())
                mesh.polygons.add(len(f))
                mesh.polygons.foreach_set("loop_start", np.arange(0, f.size, f.shape[1], dtype=np.int32))
                mesh.polygons.foreach_set("loop_total", np.full(len(f), f.shape[1], dtype=np.int32))
                mesh.polygons.foreach_set("use_smooth", np.full(len(f), part.mesh.smooth, dtype=bool))
                mesh.update(calc_edges=True)
                mesh.validate()
                mo.add_material(materials[key])
                mo.set_location(obj.location)
                mo.set_rotation_euler(obj.rotation)
                mo.set_scale(obj.scale)
                mo.blender_obj.pass_index = index  # the label pass's IndexOB: maps pixels back to objects
        for light in spec.lights:
            lo = bproc.types.Light(light_type=light.type)
            lo.set_location(light.location)
            lo.set_rotation_euler(light.rotation)
            if light.view is None:
                lo.set_energy(light.energy)
            else:  # one view's flash: keyframed on in its frame (the view's index), off in every other
                for frame in range(len(spec.cameras)):
                    lo.set_energy(light.energy if frame == light.view else 0.0, frame=frame)
            lo.set_color(light.color)
            data = lo.blender_obj.data
            if light.type == "AREA":
                data.size = light.size
            elif light.type == "SUN":
                data.angle = light.angle
            else:
                data.shadow_soft_size = light.size * 0.25
                if light.type == "SPOT":
                    data.spot_size, data.spot_blend = light.spot_size, light.spot_blend
        self._world(spec.world)
        bpy.context.scene.view_settings.view_transform = _FILM[spec.film]
        bpy.context.scene.view_settings.look = "None"
        for frame, cam in enumerate(spec.cameras):
            self._camera(cam, frame)
        settings = bpy.context.scene.render.image_settings
        settings.file_format = "PNG"
        settings.color_mode = "BW" if spec.grayscale else "RGB"
        # Linear light (film raw) needs 16 bits even for 8-bit datasets: post-processing models the camera on
        # it (gain, noise, ADC) and writes the dataset's bit depth itself.
        settings.color_depth = "16" if spec.film == "raw" else str(self.bit_depth)
        settings.compression = 15

    def _material(self, name: str, m: Material):
        mat = self.bproc.material.create(name)
        bm = mat.blender_obj
        nodes, links = bm.node_tree.nodes, bm.node_tree.links
        bsdf = nodes.get("Principled BSDF")
        output = nodes.get("Material Output")
        color_socket = None
        if m.shader == "emission":
            nodes.remove(bsdf)
            emission = nodes.new("ShaderNodeEmission")
            emission.inputs["Strength"].default_value = m.emission
            links.new(emission.outputs["Emission"], output.inputs["Surface"])
            color_socket = emission.inputs["Color"]
        else:
            bsdf.inputs["Roughness"].default_value = m.roughness
            bsdf.inputs["Metallic"].default_value = m.metallic
            color_socket = bsdf.inputs["Base Color"]
        color_socket.default_value = (*m.color, 1.0)
        if m.image is not None and m.image_bounds is not None:
            self._image_texture(name, m, nodes, links, color_socket)
        elif m.texture != "none" and m.color2 is not None:
            coords = nodes.new("ShaderNodeTexCoord")
            if m.texture == "brick":
                color, height = self._brick(m, nodes, links, coords)
                links.new(color, color_socket)
            else:
                if m.texture == "noise":
                    tex = nodes.new("ShaderNodeTexNoise")
                    tex.noise_dimensions = "4D"
                    tex.inputs["W"].default_value = m.texture_w
                    tex.inputs["Detail"].default_value = m.texture_detail
                    fac = tex.outputs["Fac"]
                elif m.texture == "voronoi":
                    tex = nodes.new("ShaderNodeTexVoronoi")
                    tex.voronoi_dimensions = "4D"
                    tex.inputs["W"].default_value = m.texture_w
                    fac = tex.outputs["Distance"]
                else:
                    tex = nodes.new("ShaderNodeTexWave")
                    tex.inputs["Phase Offset"].default_value = m.texture_w
                    tex.inputs["Distortion"].default_value = 2.0
                    fac = tex.outputs["Fac"]
                tex.inputs["Scale"].default_value = m.texture_scale
                links.new(coords.outputs["Object"], tex.inputs["Vector"])
                mix = nodes.new("ShaderNodeMixRGB")
                mix.inputs["Color1"].default_value = (*m.color, 1.0)
                mix.inputs["Color2"].default_value = (*m.color2, 1.0)
                links.new(fac, mix.inputs["Fac"])
                links.new(mix.outputs["Color"], color_socket)
                height = fac
            if m.bump > 0 and m.shader == "principled":
                self._bump(m, nodes, links, height, bsdf)
        elif m.bump > 0 and m.shader == "principled" and m.image is None:
            # No colour texture: a fine noise of its own gives the surface its grain (asphalt, plaster).
            coords = nodes.new("ShaderNodeTexCoord")
            grain = nodes.new("ShaderNodeTexNoise")
            grain.noise_dimensions = "4D"
            grain.inputs["W"].default_value = m.texture_w
            grain.inputs["Scale"].default_value = max(m.texture_scale, 1.0) * 8.0
            grain.inputs["Detail"].default_value = m.texture_detail
            links.new(coords.outputs["Object"], grain.inputs["Vector"])
            self._bump(m, nodes, links, grain.outputs["Fac"], bsdf)
        return mat

    @staticmethod
    def _brick(m: Material, nodes, links, coords):
        """Metric bricks of ``m.color`` (each brick a little lighter or darker) in mortar of ``m.color2``.

        A brick is ``1 / texture_scale`` object units long and a third of that high (a 215 x 65 mm brick with
        10 mm joints is 4.4 per metre). Blender's brick texture lays rows along its x and courses along its y; on
        walls (object normal mostly horizontal) x + y runs along the wall and z up the courses, on floors
        (normal mostly vertical) x and y pave it.

        Returns:
            The colour output and a height (1 on bricks, 0 in the joints) for bump mapping.
        """
        pos = nodes.new("ShaderNodeSeparateXYZ")
        nrm = nodes.new("ShaderNodeSeparateXYZ")
        links.new(coords.outputs["Object"], pos.inputs["Vector"])
        links.new(coords.outputs["Normal"], nrm.inputs["Vector"])
        flat = nodes.new("ShaderNodeMath")  # 1 on floors, 0 on walls
        flat.operation = "GREATER_THAN"
        absz = nodes.new("ShaderNodeMath")
        absz.operation = "ABSOLUTE"
        links.new(nrm.outputs["Z"], absz.inputs[0])
        links.new(absz.outputs[0], flat.inputs[0])
        flat.inputs[1].default_value = 0.7
        along = nodes.new("ShaderNodeMath")
        along.operation = "ADD"
        links.new(pos.outputs["X"], along.inputs[0])
        links.new(pos.outputs["Y"], along.inputs[1])
        u = nodes.new("ShaderNodeMix")  # data type float by default
        v = nodes.new("ShaderNodeMix")
        for mix, wall, floor in ((u, along.outputs[0], pos.outputs["X"]), (v, pos.outputs["Z"], pos.outputs["Y"])):
            links.new(flat.outputs[0], mix.inputs["Factor"])
            links.new(wall, mix.inputs["A"])
            links.new(floor, mix.inputs["B"])
        shift = nodes.new("ShaderNodeMath")  # texture_w moves the brick pattern: per-brick colours differ per sample
        shift.operation = "ADD"
        links.new(u.outputs["Result"], shift.inputs[0])
        shift.inputs[1].default_value = m.texture_w
        vec = nodes.new("ShaderNodeCombineXYZ")
        links.new(shift.outputs[0], vec.inputs["X"])
        links.new(v.outputs["Result"], vec.inputs["Y"])
        brick = nodes.new("ShaderNodeTexBrick")
        length = 1.0 / max(m.texture_scale, 1e-3)
        brick.inputs["Scale"].default_value = 1.0
        brick.inputs["Brick Width"].default_value = length
        brick.inputs["Row Height"].default_value = length / 3.0
        brick.inputs["Mortar Size"].default_value = length * 0.0225  # joints about 1 cm wide on a render
        brick.inputs["Mortar Smooth"].default_value = 0.1
        brick.inputs["Bias"].default_value = 0.0
        brick.inputs["Color1"].default_value = (*(c * 1.12 for c in m.color), 1.0)
        brick.inputs["Color2"].default_value = (*(c * 0.85 for c in m.color), 1.0)
        brick.inputs["Mortar"].default_value = (*m.color2, 1.0)  # type: ignore[misc]
        links.new(vec.outputs["Vector"], brick.inputs["Vector"])
        height = nodes.new("ShaderNodeMath")
        height.operation = "SUBTRACT"
        height.inputs[0].default_value = 1.0
        links.new(brick.outputs["Fac"], height.inputs[1])
        return brick.outputs["Color"], height.outputs[0]

    @staticmethod
    def _bump(m: Material, nodes, links, height, bsdf) -> None:
        """Perturb the BSDF's normal by ``height`` (0..1) with strength ``m.bump``, a relief of about 1 cm."""
        bump = nodes.new("ShaderNodeBump")
        bump.inputs["Strength"].default_value = float(np.clip(m.bump, 0.0, 1.0))
        bump.inputs["Distance"].default_value = BUMP_DISTANCE
        links.new(height, bump.inputs["Height"])
        links.new(bump.outputs["Normal"], bsdf.inputs["Normal"])

    def _image_texture(self, name: str, m: Material, nodes, links, color_socket) -> None:
        """Project ``m.image`` top-down onto the object: object-local x/y in ``m.image_bounds`` -> u/v in 0..1."""
        tex_data = np.asarray(m.image, dtype=np.float32)
        h, w = tex_data.shape
        img = self.bpy.data.images.new(f"{name}_tex", w, h, alpha=False, float_buffer=True, is_data=True)
        rgba = np.empty((h, w, 4), dtype=np.float32)
        rgba[..., :3] = tex_data[..., None]
        rgba[..., 3] = 1.0
        img.pixels.foreach_set(rgba.ravel())  # Blender's rows run bottom-up, as the texture's do
        x0, y0, x1, y1 = m.image_bounds  # type: ignore[misc]
        coords = nodes.new("ShaderNodeTexCoord")
        mapping = nodes.new("ShaderNodeMapping")
        mapping.vector_type = "POINT"
        mapping.inputs["Scale"].default_value = (1 / (x1 - x0), 1 / (y1 - y0), 1.0)
        mapping.inputs["Location"].default_value = (-x0 / (x1 - x0), -y0 / (y1 - y0), 0.0)
        node = nodes.new("ShaderNodeTexImage")
        node.image = img
        node.interpolation = "Linear"
        node.extension = "EXTEND"
        mix = nodes.new("ShaderNodeMixRGB")
        mix.blend_type = "MULTIPLY"
        mix.inputs["Fac"].default_value = 1.0
        mix.inputs["Color1"].default_value = (*m.color, 1.0)
        links.new(coords.outputs["Object"], mapping.inputs["Vector"])
        links.new(mapping.outputs["Vector"], node.inputs["Vector"])
        links.new(node.outputs["Color"], mix.inputs["Color2"])
        links.new(mix.outputs["Color"], color_socket)

    def _world(self, w: World) -> None:
        world = self.bpy.context.scene.world
        world.use_nodes = True
        nodes, links = world.node_tree.nodes, world.node_tree.links
        bg = nodes.get("Background")
        bg.inputs["Strength"].default_value = w.strength
        if w.horizon_color == w.zenith_color:
            bg.inputs["Color"].default_value = (*w.horizon_color, 1.0)
            return
        # Vertical gradient: mix horizon -> zenith by the view direction's z component.
        coords = nodes.new("ShaderNodeTexCoord")
        sep = nodes.new("ShaderNodeSeparateXYZ")
        mix = nodes.new("ShaderNodeMixRGB")
        mix.use_clamp = True
        mix.inputs["Color1"].default_value = (*w.horizon_color, 1.0)
        mix.inputs["Color2"].default_value = (*w.zenith_color, 1.0)
        links.new(coords.outputs["Generated"], sep.inputs["Vector"])
        links.new(sep.outputs["Z"], mix.inputs["Fac"])
        links.new(mix.outputs["Color"], bg.inputs["Color"])

    def _camera(self, cam: Camera, frame: int) -> None:
        bproc = self.bproc
        data = self.bpy.context.scene.camera.data
        data.clip_start, data.clip_end = cam.clip_start, cam.clip_end
        data.sensor_fit = "AUTO"
        if cam.projection == "orthographic":
            data.type = "ORTHO"
            data.ortho_scale = cam.ortho_scale
            data.keyframe_insert("ortho_scale", frame=frame)
        else:
            data.type = "PERSP"
            data.lens_unit = "FOV"
            data.angle = cam.fov
            data.keyframe_insert("lens", frame=frame)
        matrix = bproc.math.build_transformation_mat(np.asarray(cam.location), np.asarray(cam.rotation))
        bproc.camera.add_camera_pose(matrix, frame=frame)


class BlenderRenderer:
    """A BlenderProc session that renders many scenes in one process (Blender start-up paid once).

    Args:
        render: Render settings.
        output: Output format (bit depth).
        temp_dir: Scratch directory for Blender's intermediate files.
        threads: CPU threads for Cycles (0 = all).
    """

    def __init__(self, render: RenderSettings, output: OutputSettings, temp_dir: str, threads: int = 0):
        t0 = time.perf_counter()
        self.bproc = import_blenderproc(temp_dir)
        import bpy

        self.bpy = bpy
        self.cfg = render
        self.output = output
        self.temp_dir = temp_dir
        scene = bpy.context.scene
        self.bproc.camera.set_resolution(render.resolution, render.resolution)
        scene.render.threads_mode = "FIXED" if threads > 0 else "AUTO"
        if threads > 0:
            scene.render.threads = threads
        # Blender's compositor denoiser (BlenderProc's default) would run on the label pass too; Cycles' own
        # OIDN pass runs on the color pass only.
        self.bproc.renderer.set_denoiser(None)
        scene.render.use_persistent_data = True
        scene.render.film_transparent = False
        self._setup_label_outputs()
        self.builder = SceneBuilder(self.bproc, output.bit_depth)
        self.startup_s = time.perf_counter() - t0

    # ----------------------------------------------------------------- setup
    def _setup_label_outputs(self) -> None:
        bpy = self.bpy
        scene = bpy.context.scene
        view_layer = scene.view_layers[0]
        view_layer.use_pass_object_index = True
        view_layer.use_pass_z = True
        scene.use_nodes = True
        tree = scene.node_tree
        layers = next(n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers")
        out = tree.nodes.new("CompositorNodeOutputFile")
        out.base_path = os.path.join(self.temp_dir, "labels")
        out.format.file_format = "OPEN_EXR"
        out.format.color_depth = "32"
        out.format.color_mode = "RGB"
        out.format.exr_codec = "ZIP"
        out.file_slots.clear()
        out.file_slots.new("index_")
        out.file_slots.new("depth_")
        # Blender >= 4.1 writes a float socket as a one-channel EXR, which OpenCV cannot read: go through RGB.
        for socket, slot in (("IndexOB", "index_"), ("Depth", "depth_")):
            combine = tree.nodes.new("CompositorNodeCombineColor")
            tree.links.new(layers.outputs[socket], combine.inputs["Red"])
            tree.links.new(combine.outputs["Image"], out.inputs[slot])

    def _set_color_pass(self) -> None:
        scene = self.bpy.context.scene
        c = self.cfg
        scene.render.use_compositing = False
        scene.cycles.samples = c.samples
        scene.cycles.use_adaptive_sampling = c.noise_threshold > 0
        if c.noise_threshold > 0:
            scene.cycles.adaptive_threshold = c.noise_threshold
            # Cycles' automatic minimum (about 16 / sqrt(threshold)) exceeds a small sample budget, which would
            # switch adaptive sampling off; an explicit minimum lets smooth regions stop early.
            scene.cycles.adaptive_min_samples = c.min_samples
        scene.cycles.use_denoising = c.denoise
        if c.denoise:
            scene.cycles.denoiser = "OPENIMAGEDENOISE"
            scene.cycles.denoising_input_passes = "RGB_ALBEDO_NORMAL"
            scene.cycles.denoising_prefilter = "FAST"
        scene.cycles.filter_width = 1.5
        scene.cycles.max_bounces = c.max_bounces
        scene.cycles.diffuse_bounces = c.diffuse_bounces
        scene.cycles.glossy_bounces = c.glossy_bounces
        scene.cycles.transmission_bounces = 0
        scene.cycles.volume_bounces = 0
        scene.cycles.transparent_max_bounces = 8

    def _set_label_pass(self) -> None:
        scene = self.bpy.context.scene
        scene.render.use_compositing = True
        scene.cycles.samples = 1
        scene.cycles.use_adaptive_sampling = False
        scene.cycles.use_denoising = False
        scene.cycles.filter_width = LABEL_FILTER_WIDTH
        for attr in ("max_bounces", "diffuse_bounces", "glossy_bounces", "transmission_bounces", "volume_bounces"):
            setattr(scene.cycles, attr, 0)

    # ---------------------------------------------------------------- render
    def render(self, spec: SceneSpec) -> tuple[list[RenderedView], dict[str, float]]:
        """Build and render all views of a scene.

        Returns:
            One :class:`RenderedView` per camera, and timings in seconds (build, color, labels).
        """
        import cv2

        t0 = time.perf_counter()
        self.builder.build(spec)
        t1 = time.perf_counter()
        rgb_dir = os.path.join(self.temp_dir, "rgb")
        label_dir = os.path.join(self.temp_dir, "labels")
        for d in (rgb_dir, label_dir):
            os.makedirs(d, exist_ok=True)
            for f in glob.glob(os.path.join(d, "*")):
                os.remove(f)
        self._set_color_pass()
        self.bproc.renderer.render(output_dir=rgb_dir, file_prefix="rgb_", return_data=False)
        t2 = time.perf_counter()
        self._set_label_pass()
        self.bproc.renderer.render(output_dir=label_dir, file_prefix="ignored_", output_key=None, return_data=False)
        t3 = time.perf_counter()
        views = []
        for frame in range(len(spec.cameras)):
            rgb = cv2.imread(os.path.join(rgb_dir, f"rgb_{frame:04d}.png"), cv2.IMREAD_UNCHANGED)
            if rgb.ndim == 3:
                rgb = cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB)
            index = cv2.imread(os.path.join(label_dir, f"index_{frame:04d}.exr"), cv2.IMREAD_UNCHANGED)
            depth = cv2.imread(os.path.join(label_dir, f"depth_{frame:04d}.exr"), cv2.IMREAD_UNCHANGED)
            index, depth = index[..., 2], depth[..., 2]  # OpenCV's BGR order: red is last
            views.append(RenderedView(rgb, np.rint(index).astype(np.int32), depth.astype(np.float32)))
        return views, {"build_s": t1 - t0, "color_s": t2 - t1, "labels_s": t3 - t2,
                       "read_s": time.perf_counter() - t3}
