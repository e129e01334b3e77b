"""``segfactory bench transfer``: every row is the same run but for the parts it names (the bench's numbers are
only comparable if nothing else differs)."""

from __future__ import annotations

import pytest
from conftest import CONFIGS

from pipelines.bench_transfer import ROW_ORDER, TransferBenchConfig, row_config
from segfactory.config import load_config
from segfactory.errors import UserError


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("config", ["bench_transfer.yaml", "bench_transfer_gpu.yaml"])
def test_rows_differ_from_synthetic_only_by_their_parts(config):
    cfg = load_config(TransferBenchConfig, CONFIGS / config)
    assert cfg.rows == ROW_ORDER and cfg.eval.real
    base = _flat(row_config(cfg, "synthetic").model_dump(mode="json"))
    assert base["init"] == "random" and base["finetune.adapt.enabled"] is False
    assert base["finetune.adapt.hist_match_p"] == 0 and base["finetune.input.scale"] == 1
    expected = {
        "ssl": {"init": "ssl"},
        "selftrain": {"finetune.adapt.enabled": True},
        "align": {"finetune.adapt.hist_match_p": 0.5},
        "scale": {"finetune.input.scale": "auto"},
        "all": {"init": "ssl", "finetune.adapt.enabled": True, "finetune.adapt.hist_match_p": 0.5,
                "finetune.input.scale": "auto"},
    }
    for row, parts in expected.items():
        now = _flat(row_config(cfg, row).model_dump(mode="json"))
        assert {k: v for k, v in now.items() if base[k] != v} == parts, row
    # Same steps and seeds everywhere: the fine-tuning budget is the config's, whatever the row.
    assert all(row_config(cfg, r).finetune.train == row_config(cfg, "synthetic").finetune.train for r in ROW_ORDER)


def test_unknown_row_is_one_line_with_the_closest_name():
    with pytest.raises(UserError, match="did you mean 'selftrain'"):
        load_config(TransferBenchConfig, CONFIGS / "bench_transfer.yaml", ["rows=[selftrian]"])
