"""Registries are the one list of names: they feed ``--help`` (without importing torch), config validation and
"did you mean" errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segfactory.config import StrictModel, load_config
from segfactory.errors import UserError
from segfactory.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def _registry_names() -> dict[str, list[str]]:
    from finetune.archs import ARCHS
    from finetune.baselines import baseline_names
    from pretrain.backbones import BACKBONES
    from pretrain.methods import METHODS
    from scenes import families

    return {"method": METHODS.names(), "backbone": BACKBONES.names(), "arch": ARCHS.names(), "scene": families(),
            "baseline": baseline_names()}


def test_method_names_are_the_method_files():
    from pretrain.methods import METHODS

    files = {p.stem for p in (REPO / "pretrain" / "methods").glob("*.py")} - {"__init__", "base"}
    assert METHODS.names() == sorted(files) and {"simclr", "moco", "byol", "dino", "barlowtwins", "vicreg"} <= files


def test_every_method_module_registers_itself_with_its_config():
    from pretrain.methods import METHODS, options_model

    fields = options_model().model_fields
    for name, cls in METHODS.load_all().items():
        assert cls.name == name and cls.__module__ == f"pretrain.methods.{name}"
        assert fields[name].annotation is cls.config_class  # method.<name> is typed by the method's own config


@pytest.mark.parametrize(("argv", "kinds"), [
    (["pretrain"], ["method", "backbone"]),
    (["bench", "augment"], ["method", "backbone"]),
    (["finetune"], ["arch"]),
    (["bench", "train"], ["arch"]),
    (["render"], ["scene"]),
    (["bench", "render"], ["scene"]),
    (["evaluate"], ["baseline"]),
])
def test_help_lists_the_registered_names_without_importing_torch(argv: list[str], kinds: list[str]):
    code = ("import contextlib, io, json, sys\nfrom segfactory.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            f"    main({[*argv, '--help']!r})\n"
            "heavy = [m for m in ('torch', 'lightly', 'timm', 'kornia', 'segmentation_models_pytorch', 'bpy', 'dask')"
            " if m in sys.modules]\n"
            "print(json.dumps({'help': out.getvalue(), 'heavy': heavy}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(REPO)})
    out = json.loads(res.stdout)
    assert out["heavy"] == []
    help_text = " ".join(out["help"].split())
    names = _registry_names()
    for kind in kinds:
        assert ", ".join(names[kind]) in help_text, (kind, help_text)
    assert "{names}" not in help_text


@pytest.mark.parametrize(("model", "override", "field", "typo", "meant", "kind"), [
    ("pretrain", "method.name=simclrr", "method.name", "simclrr", "simclr", "method"),
    ("pretrain", "backbone.name=resnet19", "backbone.name", "resnet19", "resnet18", "backbone"),
    ("finetune", "model.arch=unte", "model.arch", "unte", "unet", "arch"),
])
def test_config_validation_names_the_field_the_closest_name_and_all_names(model, override, field, typo, meant, kind):
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig

    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}[model]
    with pytest.raises(UserError) as e:
        load_config(cls, None, [override])
    assert f"{field}='{typo}' is invalid" in e.value.message and f"did you mean '{meant}'?" in e.value.message
    assert e.value.fix == "use one of: " + ", ".join(_registry_names()[kind])


def test_scene_family_did_you_mean():
    from scenes import SceneConfig, families, resolve_scene

    with pytest.raises(UserError) as e:
        resolve_scene(SceneConfig(family="stret"))
    assert "did you mean 'street'?" in e.value.message and e.value.fix == "use one of: " + ", ".join(families())


def test_method_options_are_typed_by_the_method_files():
    from pretrain.config import PretrainConfig
    from pretrain.methods.dino import DINOConfig

    cfg = load_config(PretrainConfig, None, ["method.name=dino", "method.dino.n_local_crops=3"])
    assert isinstance(cfg.method.dino, DINOConfig) and cfg.method.dino.n_local_crops == 3
    assert cfg.method.moco.memory_bank_size == 4096  # every method's section is filled in and saved
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, ["method.dino.n_local_crop=3"])
    assert "unknown config key 'method.dino.n_local_crop'" in e.value.message
    assert "did you mean 'method.dino.n_local_crops'?" in e.value.fix
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, ["method.dinno.n_local_crops=3"])
    assert "did you mean 'method.dino'?" in e.value.fix and "simclr" in e.value.fix
    with pytest.raises(UserError, match=r"method.moco.momentum=1.5 is invalid"):
        load_config(PretrainConfig, None, ["method.moco.momentum=1.5"])


def test_package_registry_imports_an_entry_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pkg = tmp_path / "regpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from segfactory.registry import Registry\n"
                                     "THINGS = Registry('thing', package=__name__, exclude={'helpers'})\n")
    (pkg / "helpers.py").write_text("")
    (pkg / "_private.py").write_text("")
    (pkg / "alpha.py").write_text("from regpkg import THINGS\nTHINGS.register('alpha')(1)\n")
    (pkg / "beta.py").write_text("X = 2  # forgets to register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import regpkg

    things: Registry[int] = regpkg.THINGS
    assert things.names() == ["alpha", "beta"] and "alpha" in things and "gamma" not in things
    assert "regpkg.alpha" not in sys.modules  # listed, not imported
    assert things.get("alpha") == 1 and "regpkg.alpha" in sys.modules
    with pytest.raises(RuntimeError, match="does not register thing 'beta'"):
        things.get("beta")
    with pytest.raises(UserError) as e:
        things.get("alpah")
    assert "did you mean 'alpha'?" in e.value.message and e.value.fix == "use one of: alpha, beta"
    for name in ("regpkg", "regpkg.alpha", "regpkg.beta"):
        sys.modules.pop(name, None)


def test_registry_validator_in_a_config():
    from typing import Annotated

    from pydantic import AfterValidator

    colors: Registry[str] = Registry("color")
    for c in ("red", "green", "blue"):
        colors.register(c)(c)

    class Paint(StrictModel):
        color: Annotated[str, AfterValidator(colors.validate)] = "red"

    assert load_config(Paint, None, ["color=blue"]).color == "blue"
    with pytest.raises(UserError) as e:
        load_config(Paint, None, ["color=gren"])
    assert e.value.message == "override: color='gren' is invalid: unknown color 'gren'; did you mean 'green'?"
    assert e.value.fix == "use one of: blue, green, red"
