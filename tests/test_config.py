"""Config loading: YAML + overrides, and errors that name the field, the bad value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field

from pipelines.render import RenderJob
from segfactory.config import StrictModel, load_config, save_resolved
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


# ------------------------------------------------------------------------------------------- extends


class _Train(StrictModel):
    steps: int = 10
    lr: float = 0.1
    tags: list[str] = Field(default_factory=list)


class _Stage(StrictModel):
    name: str = "default"
    train: _Train = Field(default_factory=_Train)


class _Job(StrictModel):
    stage: _Stage = Field(default_factory=_Stage)
    other: _Stage = Field(default_factory=_Stage)
    workers: int = 1


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_extends_merges_defaults_bases_file_overrides_flags_in_order(tmp_path: Path):
    _write(tmp_path / "bases" / "a.yaml", {"workers": 2, "stage": {"name": "a", "train": {"steps": 20, "lr": 0.2,
                                                                                         "tags": ["a"]}}})
    _write(tmp_path / "bases" / "b.yaml", {"extends": "a.yaml", "stage": {"train": {"steps": 30}}})
    _write(tmp_path / "c.yaml", {"workers": 3, "stage": {"train": {"lr": 0.3}}})
    top = _write(tmp_path / "job.yaml", {"extends": ["bases/b.yaml", "c.yaml"], "stage": {"name": "job"}})
    cfg = load_config(_Job, top)
    # a < b (b extends a, relative to b's folder) < c (later in the list) < the file; the rest are defaults
    assert cfg.stage.name == "job" and cfg.stage.train.steps == 30 and cfg.stage.train.lr == 0.3
    assert cfg.workers == 3 and cfg.stage.train.tags == ["a"] and cfg.other == _Stage()
    cfg = load_config(_Job, top, ["stage.train.steps=40", "workers=4"], {"workers": 5, "stage.name": None})
    assert cfg.stage.train.steps == 40 and cfg.workers == 5 and cfg.stage.name == "job"
    save_resolved(cfg, tmp_path / "resolved.yaml")
    assert "extends" not in (tmp_path / "resolved.yaml").read_text()


def test_section_level_extends_and_lists_replace(tmp_path: Path):
    _write(tmp_path / "stage_base.yaml", {"name": "base", "train": {"steps": 7, "tags": ["x", "y"]}})
    top = _write(tmp_path / "job.yaml", {"stage": {"extends": "stage_base.yaml", "train": {"tags": ["z"]}},
                                         "other": {"extends": ["stage_base.yaml"]}})
    cfg = load_config(_Job, top)
    assert cfg.stage == _Stage(name="base", train=_Train(steps=7, tags=["z"]))
    assert cfg.other == _Stage(name="base", train=_Train(steps=7, tags=["x", "y"]))


def test_extends_finds_bases_in_configs(tmp_path: Path):
    top = _write(tmp_path / "mine.yaml", {"extends": "street.yaml", "render": {"samples": 4}})
    cfg = load_config(RenderJob, top)
    street = load_config(RenderJob, CONFIGS / "street.yaml")
    assert cfg.render.samples == 4 and cfg.model_copy(update={"render": street.render}) == street


def test_extends_cycles_missing_bases_and_bad_values_are_one_line(tmp_path: Path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path / "b.yaml", {"stage": {"extends": "a.yaml"}})
    with pytest.raises(UserError) as e:
        load_config(_Job, tmp_path / "a.yaml")
    assert f"config '{tmp_path / 'a.yaml'}' extends itself: a.yaml -> b.yaml -> a.yaml" == e.value.message
    assert "remove one of these `extends` entries" in e.value.fix
    _write(tmp_path / "c.yaml", {"stage": {"extends": ["nope.yaml"]}})
    with pytest.raises(UserError) as e:
        load_config(_Job, tmp_path / "c.yaml")
    assert f"config '{tmp_path / 'c.yaml'}', section 'stage': extends 'nope.yaml' does not exist" in e.value.message
    assert str(tmp_path) in e.value.fix and "configs" in e.value.fix
    _write(tmp_path / "d.yaml", {"extends": 3})
    with pytest.raises(UserError, match="extends=3 is not a file name or a list of them"):
        load_config(_Job, tmp_path / "d.yaml")
    assert load_config(_Job, _write(tmp_path / "e.yaml", {"extends": None, "workers": 2})).workers == 2
    with pytest.raises(UserError, match="`extends` is read from config files only"):
        load_config(_Job, None, ["stage.extends=c.yaml"])


def test_street_quickstart_finetunes_with_the_measured_street_recipe():
    """The street demo fine-tunes configs/finetune_street_adapt.yaml (a resnet18 U-Net from random init, 600 steps,
    real images at input.scale 0.33, self-training from step 200: the recipe that finds the walkers of the real
    street frames) with 96 px crops instead of 128 (time) and rare class sampling of the windows, on renders of that
    recipe's 192 px, with no SSL stage (init: random: the encoders pretraining can afford on CPU found none). An edit
    of the recipe changes the demo too, and this test notices."""
    from finetune.config import FinetuneConfig
    from pipelines.run import RunConfig

    assert "extends" in (CONFIGS / "quickstart_street.yaml").read_text()
    street = load_config(RunConfig, CONFIGS / "quickstart_street.yaml")
    recipe = load_config(FinetuneConfig, CONFIGS / "finetune_street_adapt.yaml")
    assert street.finetune.augment.crop_size == 96 and recipe.augment.crop_size == 128
    assert recipe.data.rcs is None and street.finetune.data.rcs is not None
    assert street.finetune.data.rcs.model_dump() == {"temperature": 0.01, "classes": None, "min_pixels": 16,
                                                     "frames": "shuffled"}
    recipe.augment.crop_size, recipe.data.rcs = 96, street.finetune.data.rcs
    assert street.finetune.model_dump(mode="json") == recipe.model_dump(mode="json")
    assert street.init == "random" and street.render.render.resolution == 192
    assert street.finetune.model.encoder == "resnet18" and street.finetune.model.encoder_dir is None
    assert street.finetune.input.scale == 0.33 and street.finetune.adapt.enabled
    assert 0 < street.finetune.adapt.warmup_steps < street.finetune.train.steps


def test_the_gpu_sized_street_run_is_the_demo_scaled():
    """configs/run_street_gpu.yaml is the street demo with more renders, steps, a wider decoder, 128 px crops and
    the instance head, and nothing else: the demo's scene parameters, real sets, scoring and recipe carry over."""
    from pipelines.run import RunConfig

    def flat(d: dict, prefix: str = "") -> dict:
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    demo = flat(load_config(RunConfig, CONFIGS / "quickstart_street.yaml").model_dump(mode="json"))
    gpu = flat(load_config(RunConfig, CONFIGS / "run_street_gpu.yaml").model_dump(mode="json"))
    changed = {k: gpu[k] for k in demo if gpu.get(k) != demo[k]}
    assert set(gpu) == set(demo)
    assert changed == {
        "render.dataset.scenes": 1000, "render.dataset.scenes_per_shard": 10,
        "finetune.model.decoder_channels": None, "finetune.augment.crop_size": 128,
        "finetune.data.num_workers": 4, "finetune.data.val_max_items": 32,
        "finetune.train.steps": 8000, "finetune.train.batch_size": 16, "finetune.train.warmup_steps": 200,
        "finetune.train.val_every": 1000, "finetune.train.checkpoint_every": 1000,
        "finetune.adapt.warmup_steps": 2000, "finetune.instances.enabled": True,
        "execution.timeout_s": 14400.0, "cluster.workers": None}
    assert gpu["finetune.train.device"] == "auto" and gpu["render.scene.params.vehicle_views"] == 0.3


@pytest.mark.parametrize("name", ["finetune", "finetune_tiny", "finetune_street", "finetune_street_adapt"])
def test_shipped_finetune_configs_validate(name):
    from finetune.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, CONFIGS / f"{name}.yaml")
    assert cfg.augment.crop_size % 32 == 0 and cfg.train.steps > 0


def test_a_data_source_may_be_a_bare_path_like_eval_real() -> None:
    """`data.real=[DIR]` failed with "Input should be a valid dictionary or instance of SourceSpec"; `eval.real`
    takes bare paths, so every data source list does: a bare path is `{path: DIR}`, the same config as spelled out."""
    from finetune.config import FinetuneConfig

    short = load_config(FinetuneConfig, CONFIGS / "finetune_tiny.yaml",
                        ["data.real=[/data/a, {path: /data/b, weight: 2}]", "data.val=[/data/c]"])
    long = load_config(FinetuneConfig, CONFIGS / "finetune_tiny.yaml",
                       ["data.real=[{path: /data/a}, {path: /data/b, weight: 2}]", "data.val=[{path: /data/c}]"])
    assert short.model_dump() == long.model_dump() and [s.weight for s in short.data.real] == [1.0, 2.0]


def test_an_error_names_the_override_or_the_file_that_set_the_value(tmp_path: Path) -> None:
    """A bad `key=value` override was reported as the YAML file's ("finetune_tiny.yaml: train.steps='abc'"), and a
    key set inside a value named only its last part as the fix ("set arch itself", not model.arch)."""
    from finetune.config import FinetuneConfig

    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, CONFIGS / "finetune_tiny.yaml", ["train.steps=abc"])
    assert e.value.message.startswith("override: train.steps='abc' is invalid")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: finetune_tiny.yaml\ntrain: {steps: abc}\n".replace("finetune_tiny.yaml",
                                                                           str(CONFIGS / "finetune_tiny.yaml")))
    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, bad, ["train.lr=0.1"])
    assert e.value.message.startswith(f"{bad}: train.steps='abc' is invalid")  # the file's value, not the override's
    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, CONFIGS / "finetune_tiny.yaml", ["model.arch.x=1"])
    assert "goes inside 'model.arch', which is a value" in e.value.message and e.value.fix.startswith("set model.arch ")


def test_overrides_index_into_lists_and_name_the_length_out_of_range(tmp_path: Path) -> None:
    """`data.real.0.path=DIR` was refused ("'data.real' ... is a value, not a section"), though the missing-path
    error's own fix said to set it: a whole-number key inside a list is now an index."""
    from finetune.config import FinetuneConfig

    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(f"extends: {CONFIGS / 'finetune_tiny.yaml'}\n"
                        "data:\n  real: [{remap: {nucleus: cell}}, /data/b]\n")
    cfg = load_config(FinetuneConfig, cfg_file, ["data.real.0.path=/data/a", "data.real.0.weight=2",
                                                 "data.real.1={path: /data/c, fraction: 0.5}"])
    assert [(str(s.path), s.weight, s.remap, s.fraction) for s in cfg.data.real] == \
        [("/data/a", 2.0, {"nucleus": "cell"}, 1.0), ("/data/c", 1.0, {}, 0.5)]
    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, cfg_file, ["data.real.0.path=/data/a", "data.real.2.path=/data/x"])
    assert e.value.message == "override 'data.real.2.path': index 2 is out of range: 'data.real' has 2 entries"
    assert e.value.fix == "use an index in 0..1, or set the whole list, e.g. data.real=[...]"
    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, cfg_file, ["data.real.path=/data/a"])
    assert "'data.real' is a list, and 'path' is not an index of it" in e.value.message
    assert e.value.fix == "address an entry by its index (0..1), e.g. data.real.0.path=..."
    with pytest.raises(UserError) as e:  # no list to index: the file sets no data.val
        load_config(FinetuneConfig, cfg_file, ["data.real.0.path=/data/a", "data.val.0.path=/data/v"])
    assert e.value.message == "override: data.val is not set, so data.val.0 indexes no entry"
    assert e.value.fix == "set the whole list, e.g. data.val=[...]"


def test_path_flags_fill_entries_that_have_settings_but_no_path(tmp_path: Path) -> None:
    """`data.real: [{remap: ...}]` with `--real DIR` failed validation ("data.real.0.path is missing") before the
    flag was applied: the flags now give the entries their paths before validation, keeping their settings."""
    from finetune.config import FinetuneConfig

    cfg_file = tmp_path / "remap_only.yaml"
    cfg_file.write_text(f"extends: {CONFIGS / 'finetune_tiny.yaml'}\n"
                        "data:\n  real: [{remap: {nucleus: cell}, weight: 3}]\n")
    cfg = load_config(FinetuneConfig, cfg_file, ["data.real.0.path=/data/override", "data.real.1.weight=2"],
                      paths={"data.real": ["/data/a", "/data/b"], "data.synthetic": None})
    assert [(str(s.path), s.weight, s.remap) for s in cfg.data.real] == \
        [("/data/a", 3.0, {"nucleus": "cell"}), ("/data/b", 2.0, {})]  # the flags' paths win over overrides
    with pytest.raises(UserError) as e:  # an entry the flags do not make
        load_config(FinetuneConfig, cfg_file, ["data.real.1.weight=2"], paths={"data.real": ["/data/a"]})
    assert e.value.message == "override 'data.real.1.weight': index 1 is out of range: 'data.real' has 1 entry"
