"""The render stage's config: scene, render settings, output format, dataset size.

How the stage runs on a cluster (task timeouts and retries, the Dask cluster) is the pipeline's business:
``segfactory render CONFIG`` reads a :class:`pipelines.render.RenderJob`, which composes this config with them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from scenes import SceneConfig
from segfactory.config import StrictModel


class RenderSettings(StrictModel):
    """Cycles settings. Labels and depth always come from a separate 1-sample pass with a zero-width pixel
    filter, so these only change the look of the RGB."""

    resolution: int = Field(256, ge=16, le=8192, description="square image size in pixels")
    views: int = Field(4, ge=1, le=256, description="camera views rendered per scene")
    samples: int = Field(32, ge=1, le=65536, description="max Cycles samples per pixel for the RGB (denoised)")
    noise_threshold: float = Field(0.1, ge=0, le=1, description="adaptive sampling threshold (0 = off)")
    min_samples: int = Field(8, ge=0, le=65536, description="adaptive sampling: samples every pixel gets before "
                             "the threshold may stop it (0 = Cycles' automatic minimum, which is above small "
                             "budgets and turns adaptive sampling off)")
    denoise: bool = Field(True, description="OpenImageDenoise on the RGB")
    # Light paths as BlenderProc's defaults, so segfactory's speed-up over it is from sampling, not less light.
    max_bounces: int = Field(3, ge=0, le=128)
    diffuse_bounces: int = Field(3, ge=0, le=128)
    glossy_bounces: int = Field(0, ge=0, le=128)
    threads: int = Field(0, ge=0, description="CPU threads per render process (0 = cores / workers)")


class OutputSettings(StrictModel):
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    bit_depth: Literal[8, 16] = Field(8, description="RGB bit depth (16 needs png)")

    @model_validator(mode="after")
    def _png_for_16bit(self) -> OutputSettings:
        if self.bit_depth == 16 and self.image_format != "png":
            raise ValueError("bit_depth=16 needs image_format=png (JPEG is 8-bit only)")
        return self


class DatasetSettings(StrictModel):
    scenes: int = Field(8, ge=1, description="number of scenes (frames = scenes x views)")
    scenes_per_shard: int = Field(4, ge=1, description="scenes rendered by one Blender process (one Dask task)")
    seed: int = Field(0, ge=0, description="base seed; scene i uses SeedSequence([seed, i])")


class RenderConfig(StrictModel):
    scene: SceneConfig = Field(default_factory=SceneConfig)
    render: RenderSettings = Field(default_factory=RenderSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)

    def identity(self) -> dict:
        """What determines how every frame looks: the dataset's config hash is taken over this.

        Size (scene count, shard size) and seed are left out, so a dataset can grow or be re-rendered elsewhere;
        threads do not change pixels either.
        """
        render = self.render.model_dump(mode="json")
        render.pop("threads")
        return {"scene": self.scene.model_dump(mode="json"), "render": render,
                "output": self.output.model_dump(mode="json")}
