"""``growth.window``: a rolling window over freshly seeded scenes. Each refresh adds ``scenes_per_run`` new scene
indices, the release's dataset holds only the newest ``window`` of them (whole shards), retired shards are named in
the release and deleted by the prune once no kept release references them. The real test renders with Blender at a
tiny size; the validation and bookkeeping tests need no Blender."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.refresh import (
    GrowthSettings,
    RefreshConfig,
    grown_scenes,
    growth_record,
    list_releases,
    window_start,
)
from pipelines.verify import run_verify
from segfactory.cli import main
from segfactory.config import load_config
from segfactory.errors import EXIT_USER, UserError
from segfactory.formats.dataset import committed_shards, open_dataset
from segfactory.io import read_json

BASE = {"render": {"scene": {"family": "cells"}, "dataset": {"scenes": 4, "scenes_per_shard": 2}},
        "growth": {"scenes_per_run": 2, "window": 4}}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("overrides", "field", "says"), [
    (["growth.max_scenes=16"], "growth.window=4", "growth.max_scenes=16 is set too"),
    (["growth.scenes_per_run=6"], "growth.window=4", "below growth.scenes_per_run=6"),
    (["render.dataset.scenes=8"], "growth.window=4 is below render.dataset.scenes=8", "no release could hold"),
])
def test_contradictory_growth_settings_are_one_line_user_errors(tmp_path: Path, overrides: list[str], field: str,
                                                                 says: str, capsys: pytest.CaptureFixture) -> None:
    cfg = write_config(tmp_path / "refresh.yaml", BASE)
    with pytest.raises(UserError) as e:
        load_config(RefreshConfig, cfg, overrides)
    message = str(e.value).split(" (fix: ")[0]
    assert "\n" not in message and field in message and says in message, message
    assert e.value.fix and "growth." in e.value.fix
    # From the CLI: exit code 2 before the root is touched.
    root = tmp_path / "root"
    assert main(["refresh", str(cfg), "--root", str(root), *overrides]) == EXIT_USER
    assert field in capsys.readouterr().err
    assert not (root / "releases").exists()


def test_window_settings_that_fit_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(RefreshConfig, write_config(tmp_path / "refresh.yaml", BASE), [])
    assert cfg.growth.window == 4 and cfg.growth.max_scenes is None
    assert load_config(RefreshConfig, tmp_path / "refresh.yaml", ["growth.scenes_per_run=0"]).growth.window == 4
    assert load_config(RefreshConfig, tmp_path / "refresh.yaml", ["growth.window=null", "growth.max_scenes=8"])
    with pytest.raises(UserError, match=r"growth\.window=0"):
        load_config(RefreshConfig, tmp_path / "refresh.yaml", ["growth.window=0"])


# ------------------------------------------------------------------------------------------ bookkeeping


def test_window_moves_over_fresh_scene_indices_and_records_ranges() -> None:
    from pipelines.render import resolve_render_config

    cfg = RefreshConfig.model_validate(BASE)
    render_cfg, h = resolve_render_config(cfg.render)

    def shards(*ranges: tuple[int, int]) -> list[dict]:
        return [{"id": f"s{a}-{b}", "scenes": [a, b]} for a, b in ranges]

    def release(held: tuple[int, int], shard_ranges: list[tuple[int, int]], seed: int = 0) -> dict:
        return {"render": {"config_hash": h, "seed": seed, "scenes": held[1]}, "growth": {"scene_range": list(held)},
                "shards": shards(*shard_ranges)}

    # Scene index stops grow by scenes_per_run without end (no cap with a window); the window starts 4 below.
    assert grown_scenes(cfg, render_cfg, h, None) == (0, 4) and window_start(cfg.growth, 4) == 0
    r1 = release((0, 4), [(0, 2), (2, 4)])
    assert grown_scenes(cfg, render_cfg, h, r1) == (4, 6) and window_start(cfg.growth, 6) == 2
    assert grown_scenes(cfg, render_cfg, h, release((996, 1000), [])) == (1000, 1002)
    assert window_start(GrowthSettings(scenes_per_run=2), 1000) == 0  # no window: every scene stays

    g = growth_record(cfg.growth, r1, h, 0, 4, shards((2, 4), (4, 6)))
    assert g["scene_range"] == [2, 6] and g["scenes"] == 6 and g["window"] == 4 and g["same_dataset"]
    assert g["scenes_added_ranges"] == [[4, 6]] and g["scenes_added"] == 2
    assert g["scenes_retired_ranges"] == [[0, 2]] and g["scenes_retired"] == 2
    assert g["shards_added"] == ["s4-6"] and g["shards_retired"] == ["s0-2"]
    # Nothing new: nothing added or retired.
    r2 = release((2, 6), [(2, 4), (4, 6)])
    g = growth_record(cfg.growth, r2, h, 0, 6, shards((2, 4), (4, 6)))
    assert (g["scenes_added"], g["scenes_retired"], g["shards_added"], g["shards_retired"]) == (0, 0, [], [])
    # Another seed is another dataset: every scene now is added, every previous one retired.
    g = growth_record(cfg.growth, release((2, 6), [(2, 4), (4, 6)], seed=1), h, 0, 0, shards((0, 2), (2, 4)))
    assert not g["same_dataset"] and g["scenes_added_ranges"] == [[0, 4]] and g["scenes_retired_ranges"] == [[2, 6]]
    # A release from before windows held every scene from 0.
    legacy = {"render": {"config_hash": h, "seed": 0, "scenes": 4}, "shards": shards((0, 2), (2, 4))}
    g = growth_record(cfg.growth, legacy, h, 0, 4, shards((2, 4), (4, 6)))
    assert g["scenes_retired_ranges"] == [[0, 2]] and g["scenes_added_ranges"] == [[4, 6]]


def test_window_plan_keeps_a_partly_covered_shard_whole() -> None:
    from pipelines.render import dataset_plan, resolve_render_config

    cfg = RefreshConfig.model_validate({**BASE, "growth": {"scenes_per_run": 2, "window": 5}})
    render_cfg, h = resolve_render_config(cfg.render)
    grown = render_cfg.model_copy(update={"dataset": render_cfg.dataset.model_copy(update={"scenes": 10})})
    full = dataset_plan(grown, h, "cells")
    windowed = dataset_plan(grown, h, "cells", window_start(cfg.growth, 10))
    # Window 5 over scenes 0..9 starts at 5, inside the shard 4-5: it stays whole (6 scenes held, not 5), and the
    # shard ids are those of the full plan (they do not change as the window moves).
    assert [(p.scene_start, p.scene_stop) for p in windowed] == [(4, 6), (6, 8), (8, 10)]
    assert [p.shard_id for p in windowed] == [p.shard_id for p in full[2:]]


# ------------------------------------------------------------------------------------------ real refreshes


def refresh(cfg: Path, root: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["refresh", str(cfg), "--root", str(root), *extra]) == 0
    captured = capsys.readouterr()  # the JSON line on stdout, the summary (console) on stderr
    out = json.loads(captured.out.strip().splitlines()[-1])
    # what this run did (for a published release the same values), also when it published nothing
    run = read_json(root / "last_refresh.json")["run"]
    return ({**read_json(root / "releases" / f"{out['release']}.json"), **run, "published": out["published"]},
            " ".join(captured.err.split()))


def scene_ranges(release: dict) -> list[list[int]]:
    return [s["scenes"] for s in release["shards"]]


@pytest.mark.render
@pytest.mark.slow  # four Blender shards (8 tiny scenes) over three refreshes, then two refreshes that render nothing
def test_three_windowed_refreshes_retire_and_prune_the_oldest_shards(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    cfg = write_config(tmp_path / "refresh.yaml", {
        "render": {"scene": {"family": "cells"}, "render": {"resolution": 32, "views": 1, "samples": 1,
                                                            "denoise": False},
                   "dataset": {"scenes": 4, "scenes_per_shard": 2, "seed": 0}},
        "growth": {"scenes_per_run": 2, "window": 4},
        "releases": {"keep": 2},
        "cluster": {"workers": 1, "dashboard": False},
    })
    r1, _ = refresh(cfg, root, capsys)
    ds = root / r1["render"]["dataset"]
    assert scene_ranges(r1) == [[0, 2], [2, 4]] and r1["render"]["shards_rendered"] == 2
    assert r1["growth"]["scene_range"] == [0, 4] and r1["growth"]["scenes_added_ranges"] == [[0, 4]]
    first_shard = r1["shards"][0]["id"]

    r2, out2 = refresh(cfg, root, capsys)
    assert scene_ranges(r2) == [[2, 4], [4, 6]] and r2["render"]["shards_rendered"] == 1  # only the new shard
    g2 = r2["growth"]
    assert (g2["scenes_before"], g2["scenes"], g2["window"], g2["scene_range"]) == (4, 6, 4, [2, 6])
    assert g2["scenes_added_ranges"] == [[4, 6]] and g2["scenes_retired_ranges"] == [[0, 2]]
    assert g2["shards_retired"] == [first_shard] and g2["shards_added"] == [r2["shards"][1]["id"]]
    assert r2["drift"]["shards_retired"] == 1 and r2["drift"]["scenes_added"] == 2 and r2["inputs_changed"]
    assert "retired (scenes 0-1)" in out2 and "added (scenes 4-5)" in out2
    # Readers see the window only; the retired shard stays on disk while release 1 (kept) references it.
    assert open_dataset(ds).shard_ids == [s["id"] for s in r2["shards"]]
    assert first_shard in committed_shards(ds)

    r3, _ = refresh(cfg, root, capsys)
    # Release 3 holds the newest 4 of the 8 scene indices drawn so far, each scene its own fresh seed.
    assert scene_ranges(r3) == [[4, 6], [6, 8]] and r3["growth"]["scene_range"] == [4, 8]
    assert r3["render"]["shards_rendered"] == 1 and r3["render"]["first_scene"] == 4
    assert r3["growth"]["shards_retired"] == [r2["shards"][0]["id"]]
    assert r3["growth"]["scenes_retired_ranges"] == [[2, 4]] and r3["growth"]["scenes_added_ranges"] == [[6, 8]]
    meta = open_dataset(ds).meta
    assert [s["id"] for s in meta["shards"]] == [s["id"] for s in r3["shards"]] and meta["num_frames"] == 4
    for s in meta["shards"]:  # the shards' own manifests say which scene indices (and seed) they hold
        manifest = read_json(ds / "shards" / s["id"] / "manifest.json")
        assert list(manifest["scenes"]) == next(r["scenes"] for r in r3["shards"] if r["id"] == s["id"])
        assert manifest["seed"] == 0
    # keep=2: release 1 is pruned and with it scenes 0-1, which only it referenced; scenes 2-3 stay on disk for
    # release 2 (kept), unlisted.
    assert [p.stem for p in list_releases(root)] == [r2["release"], r3["release"]]
    assert first_shard not in committed_shards(ds) and not list((ds / "shards").glob(".trash-*"))
    assert sorted(committed_shards(ds)) == sorted([r2["shards"][0]["id"], *(s["id"] for s in r3["shards"])])
    assert run_verify(root).problems == {}  # every shard a kept release lists is there and intact

    # Nothing new (no growth this run) and keep=1: nothing rendered, added or retired, no release published; the
    # prune (which runs all the same) removes release 2 and the retired shard only it referenced.
    r4, out4 = refresh(cfg, root, capsys, "growth.scenes_per_run=0", "--keep", "1")
    assert not r4["published"] and r4["release"] == r3["release"] and "nothing changed since release" in out4
    assert [p.stem for p in list_releases(root)] == [r3["release"]]
    assert [s["id"] for s in r4["shards"]] == [s["id"] for s in r3["shards"]]
    assert r4["render"]["shards_rendered"] == 0 and not r4["inputs_changed"]
    g4 = r4["growth"]
    assert (g4["shards_added"], g4["shards_retired"], g4["scenes_added"], g4["scenes_retired"]) == ([], [], 0, 0)
    assert sorted(committed_shards(ds)) == sorted(s["id"] for s in r4["shards"])
    assert sorted(p.name for p in (ds / "shards").iterdir()) == sorted(s["id"] for s in r4["shards"])

    # Again with nothing new: a no-op (no shard rendered, none pruned, the dataset unchanged).
    before = {p.name: p.stat().st_mtime_ns for p in (ds / "shards").iterdir()}
    listing = read_json(ds / "dataset.json")
    r5, out5 = refresh(cfg, root, capsys, "growth.scenes_per_run=0", "--keep", "1")
    assert r5["render"]["shards_rendered"] == 0 and not r5["inputs_changed"]
    assert r5["growth"]["scene_range"] == [4, 8] and r5["growth"]["shards_retired"] == []
    assert {p.name: p.stat().st_mtime_ns for p in (ds / "shards").iterdir()} == before
    assert read_json(ds / "dataset.json") == listing
    assert not r5["published"] and "pruned 0 release(s), 0 shard(s)" in out5
    assert run_verify(root).problems == {}


def test_the_first_release_says_so_instead_of_comparing_with_no_previous_one(capsys) -> None:
    from pipelines.refresh import release_summary

    release = {"release": "000001-x", "shards": [{"id": "a"}, {"id": "b"}], "num_frames": 4, "inputs_changed": True,
               "render": {"shards_rendered": 2}, "drift": {"previous": None},
               "growth": {"shards_added": ["a", "b"], "shards_retired": []}}
    pruned = {"releases": 0, "shards": 0, "datasets": 0}
    release_summary(release, pruned, 1.0)
    said = " ".join(capsys.readouterr().err.split())
    assert "the first release" in said and "previous release" not in said
    release_summary({**release, "drift": {"previous": "000000-w", "class_shares": [],
                                          "instance_hist_total_variation": None}}, pruned, 1.0)
    assert "vs the previous release 2 shard(s) added" in " ".join(capsys.readouterr().err.split())
