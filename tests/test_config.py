"""Config loading: YAML + overrides, and errors that name the field, the bad value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.render import RenderJob
from segfactory.config import load_config, save_resolved
from segfactory.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["render_demo", "street", "tabletop", "cells"])
def test_shipped_configs_validate(name):
    from pipelines.render import resolve_render_config

    cfg, digest = resolve_render_config(load_config(RenderJob, CONFIGS / f"{name}.yaml"))
    assert len(digest) == 16
    assert cfg.scene.params and cfg.scene.randomization  # fully resolved


def test_overrides_and_flags_apply_in_order(tmp_path: Path):
    cfg = load_config(RenderJob, CONFIGS / "street.yaml", ["render.samples=64", "scene.params.lanes=[1, 2]"],
                      {"dataset.scenes": 3, "render.views": None})
    assert cfg.render.samples == 64 and cfg.dataset.scenes == 3 and cfg.render.views == 4
    assert cfg.scene.params["lanes"] == [1, 2]
    save_resolved(cfg, tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["render"]["samples"] == 64


@pytest.mark.parametrize(("overrides", "needles"), [
    (["dataset.scenes=-1"], ["dataset.scenes=-1", "greater than or equal to 1"]),
    (["render.resoltion=64"], ["render.resoltion", "did you mean 'render.resolution'"]),
    (["output.bit_depth=12"], ["output.bit_depth=12"]),
    (["output.image_format=jpg", "output.bit_depth=16"], ["needs image_format=png"]),
    (["render.samples"], ["not of the form key=value"]),
    (["render.samples.x=1"], ["is a value, not a section"]),
])
def test_bad_values_name_field_value_and_fix(overrides, needles):
    with pytest.raises(UserError) as e:
        load_config(RenderJob, CONFIGS / "street.yaml", overrides)
    text = str(e.value)
    assert e.value.fix
    for n in needles:
        assert n in text


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(RenderJob, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scene: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(RenderJob, bad)
