"""``segfactory bench transfer``: what each part of the recipe buys on real images, with zero real labels.

One run of the ``segfactory run`` pipeline per row, all in one output directory, so the rows share what they have
in common (the rendered dataset, the ingested real images, the SSL encoder) and differ only in the fine-tuning
they name. Every row trains for the same steps from the same seeds on the same synthetic labels, and is scored on
the same real labeled frames next to the classic baselines (which do not depend on the row):

=============  ====================================================================================
row            fine-tuning
=============  ====================================================================================
synthetic      random encoder, synthetic labels only, no adaptation
ssl            + the encoder pretrained (SSL) on the real unlabeled images
selftrain      + self-training on the real unlabeled images (EMA teacher, pseudo-labels, ClassMix)
align          + appearance alignment (histogram matching of synthetic crops to real ones)
scale          + an input scale estimated from the real unlabeled images (``input.scale: auto``)
all            everything above together (the shipped recipe, plus the scale)
=============  ====================================================================================

Each row but ``all`` adds one part to ``synthetic``. Prints one JSON object on stdout and a table on stderr; the
runs stay in ``--out`` (re-running reuses every finished stage).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from pipelines.run import RunConfig
from segfactory.console import console
from segfactory.errors import UserError
from segfactory.io import atomic_write_json
from segfactory.registry import Registry

# Row name -> (init, fine-tune overrides) on top of the config's `finetune` section with every adaptation off.
ROWS: Registry[tuple[str, dict[str, Any]]] = Registry("transfer row")
_OFF = {"adapt": {"enabled": False, "hist_match_p": 0.0, "fda_beta": 0.0, "recalibrate_bn": 0},
        "input": {"scale": 1.0}}
ROWS.register("synthetic")(("random", {}))
ROWS.register("ssl")(("ssl", {}))
ROWS.register("selftrain")(("random", {"adapt": {"enabled": True}}))
ROWS.register("align")(("random", {"adapt": {"hist_match_p": 0.5}}))
ROWS.register("scale")(("random", {"input": {"scale": "auto"}}))
ROWS.register("all")(("ssl", {"adapt": {"enabled": True, "hist_match_p": 0.5}, "input": {"scale": "auto"}}))
ROW_ORDER = ["synthetic", "ssl", "selftrain", "align", "scale", "all"]


class TransferBenchConfig(RunConfig):
    """``segfactory bench transfer CONFIG``: a run config (``eval.real`` required) plus the rows to compare."""

    rows: list[str] = Field(default_factory=lambda: list(ROW_ORDER), description="rows to run, in order")

    @field_validator("rows")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in ROWS:
                raise ValueError(ROWS.unknown_message(name) + f" (rows: {', '.join(ROW_ORDER)})")
        if not v:
            raise ValueError("needs at least one row")
        return list(dict.fromkeys(v))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def row_config(cfg: TransferBenchConfig, row: str) -> RunConfig:
    """The run config of one row: the bench config's run, its fine-tuning with every adaptation off, plus the
    row's parts."""
    init, parts = ROWS.get(row)
    data = cfg.model_dump(mode="json", exclude={"rows"})
    data["finetune"] = _merge(_merge(data["finetune"], _OFF), parts)
    data["finetune"]["data"]["unlabeled"] = []  # the run passes its own real images
    data["init"] = init
    return RunConfig.model_validate(data)


def _hardware() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu}


def run_transfer_bench(cfg: TransferBenchConfig, out: str | os.PathLike) -> dict[str, Any]:
    """Run every row (see the module docstring) and collect their real-image scores.

    Returns:
        ``{"hardware", "config", "seeds", "steps", "baselines": {set: {name: scores}}, "rows": {row: {"seconds",
        "sets": {set: scores}}}, "total_s"}``; scores are ``fg_iou``, ``f1`` (instance F1 at IoU 0.5) and ``miou``.
    """
    from pipelines.run import run_all

    if not cfg.eval.real:
        raise UserError("bench transfer: eval.real is empty; the bench scores real labeled images",
                        fix="set eval.real=[sample:ctc-hela/eval, ...] or folders of images/ + masks/")
    out = Path(out).resolve()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"hardware": _hardware(), "out": str(out),
                              "seeds": {"render": cfg.render.dataset.seed, "train": cfg.finetune.train.seed,
                                        "pretrain": cfg.pretrain.train.seed},
                              "steps": cfg.finetune.train.steps, "eval": list(cfg.eval.real), "rows": {},
                              "baselines": {}}
    for row in cfg.rows:
        console.rule(f"[bold]bench transfer: row {row}[/]")
        t_row = time.perf_counter()
        summary = run_all(row_config(cfg, row), out)
        real = summary.get("real", {})
        sets = {}
        for name, rows in real.items():
            model = rows["model"]
            sets[name] = {"fg_iou": model["fg_iou"], "f1": model["f1"]}
            for b, scores in rows.items():
                if b != "model":
                    result["baselines"].setdefault(name, {})[b] = {"fg_iou": scores["fg_iou"], "f1": scores["f1"]}
        result["rows"][row] = {"seconds": round(time.perf_counter() - t_row, 1), "sets": sets,
                               "synthetic_miou": summary["miou"]}
        atomic_write_json(out / "bench_transfer.json", result)  # partial results survive an interruption
    result["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "bench_transfer.json", result)
    _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    from rich.table import Table

    sets = list(result["baselines"]) or sorted({s for r in result["rows"].values() for s in r["sets"]})
    t = Table(title="bench transfer: real images, zero real labels (fg IoU / instance F1 at IoU 0.5)")
    t.add_column("row")
    for s in sets:
        t.add_column(s, justify="right")
    t.add_column("seconds", justify="right")

    def cell(scores: dict[str, Any] | None) -> str:
        if not scores:
            return "-"
        f1 = scores.get("f1")
        return f"{scores['fg_iou']:.3f} / " + ("-" if f1 is None else f"{f1:.3f}")

    for b in sorted({b for s in result["baselines"].values() for b in s}):
        t.add_row(f"baseline {b}", *[cell(result["baselines"].get(s, {}).get(b)) for s in sets], "")
    for row, r in result["rows"].items():
        t.add_row(row, *[cell(r["sets"].get(s)) for s in sets], f"{r['seconds']:.0f}")
    console.print(t)
    console.print(f"hardware: {result['hardware']}; total {result.get('total_s', 0):.0f}s; results in "
                  f"{result['out']}/bench_transfer.json")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``segfactory bench transfer`` from its parsed arguments."""
    from segfactory.config import load_config

    extra: dict[str, Any] = {"cluster.workers": args.workers}
    if args.rows:
        extra["rows"] = [r.strip() for r in args.rows.split(",") if r.strip()]
    cfg = load_config(TransferBenchConfig, args.config, args.overrides, extra)
    return run_transfer_bench(cfg, args.out)
