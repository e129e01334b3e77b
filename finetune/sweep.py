"""Label-efficiency sweep: how much real annotation does synthetic data (and SSL pretraining) save?

Grid: real-label fraction x synthetic volume x encoder init (random / self-supervised / supervised on synthetic)
x seed. Every run gets the same number of steps and the same batch size (matched compute), keeps its *final*
weights (no model selection, so a 0 %-real run never benefits from real validation labels) and is scored on
held-out real test folders. Output::

    OUT/sweep.yaml              resolved sweep config
    OUT/synthetic_init/run/     init ``synthetic`` only: the synthetic-only fine-tune whose encoder the
                                ``synthetic`` runs start from (trained once per sweep, resumable and reused)
    OUT/synthetic_init/encoder/ its encoder (:func:`finetune.export.export_encoder`; written under a temporary
                                name and moved into place last)
    OUT/runs/<run>/             each fine-tuning run (resumable; finished runs are reused on re-runs with the
                                same run config, a changed one is refused)
    OUT/runs/<run>/test/        its evaluation on the test folders (reused while model and test specs match)
    OUT/results.csv|.json       one row per run, plus "savings" (below)
    OUT/label_efficiency.png    real-test mIoU against real-label fraction, one line per (init, synthetic volume)

The ``synthetic`` init is to the supervised-on-synthetic baseline what ``--encoder`` is to ``ssl``: one encoder
for the whole sweep (trained once, with ``finetune.train.seed``, not once per seed, as the SSL encoder is given
once), so the seed axis measures the fine-tuning's spread from the same initialisation for both. Its training is
a normal fine-tune (:func:`finetune.train.run_finetune`) on the synthetic datasets only (all frames, no real or
unlabeled data), with the random-init runs' architecture and input standardisation, ``final`` weights, and
``sweep.synthetic_init_steps`` steps; like SSL pretraining, those steps come on top of the matched fine-tuning
compute (the ``pretrain_steps`` column).

Savings: for every run except the real-only random-init baseline, the real-label fraction such a baseline run
would need for the same test mIoU (linear interpolation on the baseline curve's running best; ``null`` when it
never gets there; ``upper_bound`` when the run is below the baseline's smallest fraction, where the curve is
unknown).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from finetune.config import FinetuneConfig, SweepConfig, apply_data_flags
from segfactory.console import console
from segfactory.errors import UserError
from segfactory.plotting import figure_png


def load_sweep_config(path: str | None, overrides: list[str] | None, *, synthetic: list[str] | None = None,
                      real: list[str] | None = None, test: list[str] | None = None, encoder: str | None = None,
                      steps: int | None = None) -> SweepConfig:
    """Load a sweep config and apply the CLI flags (paths replace the config's entries in order); real and test
    folders may be ``sample:NAME/SPLIT`` references to built-in labeled sets (materialized here)."""
    from finetune.evaluate import resolve_labeled_specs
    from segfactory.config import load_config

    cfg = load_config(SweepConfig, path, overrides, paths={"finetune.data.synthetic": synthetic,
                                                           "finetune.data.real": real, "test": test})
    ft = apply_data_flags(cfg.finetune, encoder, None, steps)
    ft = ft.model_copy(update={"data": ft.data.model_copy(update={
        "real": resolve_labeled_specs(ft.data.real, "--real" if real else "finetune.data.real"),
        "val": resolve_labeled_specs(ft.data.val, "finetune.data.val")})})
    tests = resolve_labeled_specs(cfg.test, "--test" if test else "test")
    return cfg.model_copy(update={"finetune": ft, "test": tests})


SYNTHETIC_INIT_DIR = "synthetic_init"


def _fmt(f: float) -> str:
    return f"{round(100 * f):d}"


def plan_runs(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The grid as a list of ``{"id", "seed", "init", "synthetic_fraction", "real_fraction"}``.

    Raises:
        UserError: a requested axis value has no data (e.g. real fractions > 0 without real folders).
    """
    ft, ax = cfg.finetune, cfg.sweep
    if not cfg.test:
        raise UserError("the sweep needs held-out real test data",
                        fix="pass --test DIR (images/ + masks/) or set test:")
    if "ssl" in ax.encoder_inits and ft.model.encoder_dir is None:
        raise UserError("sweep.encoder_inits includes 'ssl' but no pretrained encoder is given",
                        fix="pass --encoder DIR, or set sweep.encoder_inits=[random]")
    if "synthetic" in ax.encoder_inits and not ft.data.synthetic:
        raise UserError("sweep.encoder_inits includes 'synthetic' but there is no synthetic dataset to pretrain on",
                        fix="pass --synthetic DATASET, or drop 'synthetic' from sweep.encoder_inits")
    if any(f > 0 for f in ax.real_fractions) and not ft.data.real:
        raise UserError("sweep.real_fractions has values > 0 but there is no real training folder",
                        fix="pass --real DIR, or set sweep.real_fractions=[0]")
    if any(f > 0 for f in ax.synthetic_fractions) and not ft.data.synthetic:
        raise UserError("sweep.synthetic_fractions has values > 0 but there is no synthetic dataset",
                        fix="pass --synthetic DATASET, or set sweep.synthetic_fractions=[0]")
    runs = []
    for seed in ax.seeds:
        for init in ax.encoder_inits:
            for sf in ax.synthetic_fractions:
                for rf in ax.real_fractions:
                    if sf == 0 and rf == 0:
                        continue  # nothing to train on
                    runs.append({"id": f"{init}_syn{_fmt(sf)}_real{_fmt(rf)}_seed{seed}", "seed": seed, "init": init,
                                 "synthetic_fraction": sf, "real_fraction": rf})
    return runs


def run_config(cfg: SweepConfig, run: dict[str, Any], synthetic_encoder: Path | None = None) -> FinetuneConfig:
    """The fine-tuning config of one grid point.

    Args:
        cfg: The sweep config.
        run: A grid point of :func:`plan_runs`.
        synthetic_encoder: The encoder directory the ``synthetic`` init starts from (needed for those runs only).
    """
    ft = cfg.finetune
    synthetic = [] if run["synthetic_fraction"] == 0 else \
        [s.model_copy(update={"fraction": run["synthetic_fraction"]}) for s in ft.data.synthetic]
    # Real folders stay at fraction 0 so their held-out validation frames are still reported.
    real = [s.model_copy(update={"fraction": run["real_fraction"]}) for s in ft.data.real]
    model, inp = ft.model, ft.input
    if run["init"] in ("random", "synthetic") and model.encoder_dir is not None:
        from segfactory.formats.encoder import read_encoder_meta

        # Same architecture, input channels and input standardisation as the SSL runs, without the pretrained
        # weights: the comparison then differs in the encoder's initialisation only.
        meta = read_encoder_meta(model.encoder_dir)
        model = model.model_copy(update={"encoder_dir": None, "encoder": model.encoder or meta["timm_name"],
                                         "in_chans": model.in_chans or int(meta["in_chans"])})
        norm = meta.get("normalization") or {}
        inp = inp.model_copy(update={"mean": inp.mean or norm.get("mean"), "std": inp.std or norm.get("std")})
    if run["init"] == "synthetic":
        if synthetic_encoder is None:
            raise ValueError("a 'synthetic' init run needs the synthetic_encoder directory")
        # The encoder of the synthetic-only model, trained with the random runs' architecture and statistics.
        model = model.model_copy(update={"encoder_dir": synthetic_encoder})
    classes = ft.classes
    if classes is None:
        from finetune.config import ClassSpec
        from finetune.data.sources import resolve_targets

        # Fixed once from the full config: a real-only run must not take its classes from the real folder.
        classes = [ClassSpec(**c) for c in resolve_targets(ft).to_json()]
    raw = ft.model_copy(update={
        "classes": classes,
        "data": ft.data.model_copy(update={"synthetic": synthetic, "real": real}),
        "model": model,
        "input": inp,
        "train": ft.train.model_copy(update={"seed": run["seed"], "keep_best": False, "stop_at": None}),
    }).model_dump()
    return FinetuneConfig.model_validate(raw)


def synthetic_init_config(cfg: SweepConfig) -> FinetuneConfig:
    """The synthetic-only fine-tune whose encoder the ``synthetic`` init starts from (see the module docstring).

    A random-init run of the grid's architecture, classes and input standardisation on all synthetic frames, with
    no real, extra validation or unlabeled data, ``sweep.synthetic_init_steps`` steps and the base config's seed.
    """
    ft = cfg.finetune
    base = run_config(cfg, {"init": "random", "seed": ft.train.seed, "synthetic_fraction": 1.0, "real_fraction": 0.0})
    steps = cfg.sweep.synthetic_init_steps or ft.train.steps
    raw = base.model_copy(update={
        "data": base.data.model_copy(update={"real": [], "val": [], "unlabeled": []}),
        "train": base.train.model_copy(update={"steps": steps}),
    }).model_dump()
    return FinetuneConfig.model_validate(raw)


def prepare_synthetic_encoder(pcfg: FinetuneConfig, root: Path, show_progress: bool = True) -> dict[str, Any]:
    """Train (or resume, or reuse) the synthetic-only model under ``root/run`` and export its encoder.

    The encoder is exported to a temporary directory and moved to ``root/encoder`` last; an existing one is reused
    while it was exported from the run's current weights.

    Returns:
        ``{"encoder", "steps", "seed", "seconds", "weights_sha256"}`` (``seconds``: training time of this call).
    """
    import os
    import shutil

    from finetune.export import export_encoder
    from finetune.train import CHECKPOINT_FILE, run_finetune
    from segfactory.formats.encoder import META_FILE as ENCODER_META
    from segfactory.formats.model import read_model_meta
    from segfactory.io import read_json

    run_dir, enc_dir = root / "run", root / "encoder"
    console.print(f"[bold]synthetic init[/]: {pcfg.train.steps} steps on the synthetic data only")
    summary = run_finetune(pcfg, run_dir, resume=(run_dir / CHECKPOINT_FILE).exists(), show_progress=show_progress)
    model_sha = read_model_meta(run_dir / "model")["weights_sha256"]
    enc_meta = read_json(enc_dir / ENCODER_META) if (enc_dir / ENCODER_META).is_file() else None
    if enc_meta is None or enc_meta.get("source_weights_sha256") != model_sha:
        tmp = root / f".encoder.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        export_encoder(run_dir / "model", tmp)
        shutil.rmtree(enc_dir, ignore_errors=True)
        os.replace(tmp, enc_dir)
        enc_meta = read_json(enc_dir / ENCODER_META)
    return {"encoder": str(enc_dir), "steps": pcfg.train.steps, "seed": pcfg.train.seed,
            "seconds": round(float(summary.get("seconds_this_run", 0.0)), 2),
            "weights_sha256": enc_meta["weights_sha256"]}


def baseline_fraction(curve: list[tuple[float, float]], miou: float) -> float | None:
    """Smallest real fraction at which a (fraction, mIoU) curve reaches ``miou`` (interpolated), else None."""
    best = -1.0
    prev: tuple[float, float] | None = None
    for f, m in sorted(curve):
        m = max(m, best)  # the running best: more labels never need to be worse
        if m >= miou:
            # prev[1] < miou <= m here, so the slope is defined
            return f if prev is None else prev[0] + (miou - prev[1]) / (m - prev[1]) * (f - prev[0])
        best, prev = m, (f, m)
    return None


def compute_savings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Label-equivalents against the real-only random-init baseline (see module docstring)."""
    base: dict[float, list[float]] = {}
    for r in rows:
        if r["synthetic_fraction"] == 0 and r["encoder_init"] == "random" and r["test_miou"] is not None:
            base.setdefault(r["real_fraction"], []).append(r["test_miou"])
    if not base:
        return []
    curve = [(f, float(np.mean(v))) for f, v in base.items()]
    first_f, first_m = min(curve)
    out = []
    for r in rows:
        if (r["synthetic_fraction"] == 0 and r["encoder_init"] == "random") or r["test_miou"] is None:
            continue
        eq = baseline_fraction(curve, r["test_miou"])
        out.append({"run": r["run"], "test_miou": r["test_miou"], "real_fraction": r["real_fraction"],
                    "real_only_equivalent_fraction": None if eq is None else round(eq, 4),
                    # Below the baseline's smallest fraction the curve is unknown: only an upper bound.
                    "upper_bound": eq is not None and eq == first_f and r["test_miou"] < first_m,
                    "labels_saved_fraction": None if eq is None else round(eq - r["real_fraction"], 4)})
    return out


def plot_sweep(rows: list[dict[str, Any]]) -> bytes:
    """PNG bytes: test mIoU vs real-label fraction, one line per (encoder init, synthetic volume), seed mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    groups: dict[tuple[str, float], dict[float, list[float]]] = {}
    for r in rows:
        if r["test_miou"] is not None:
            groups.setdefault((r["encoder_init"], r["synthetic_fraction"]), {}).setdefault(
                r["real_fraction"], []).append(r["test_miou"])
    for (init, sf), pts in sorted(groups.items()):
        xs = sorted(pts)
        mean = [float(np.mean(pts[x])) for x in xs]
        lo = [mean[i] - min(pts[x]) for i, x in enumerate(xs)]
        hi = [max(pts[x]) - mean[i] for i, x in enumerate(xs)]
        name = "supervised-on-synthetic" if init == "synthetic" else init
        label = f"{name} init, " + ("no synthetic" if sf == 0 else f"synthetic {_fmt(sf)} %")
        ax.errorbar([100 * x for x in xs], mean, yerr=[lo, hi], marker="o", capsize=3, label=label,
                    linestyle="--" if sf == 0 else "-")
    ax.set_xlabel("real labels used (% of the real training split)")
    ax.set_ylabel("mIoU on held-out real test data")
    vals = [r["test_miou"] for r in rows if r["test_miou"] is not None]
    if vals:  # zoom on the data: the differences that matter are often a few points of mIoU
        pad = max(0.02, 0.1 * (max(vals) - min(vals)))
        ax.set_ylim(max(0.0, min(vals) - pad), min(1.0, max(vals) + pad))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("label efficiency (matched compute)")
    fig.tight_layout()
    return figure_png(fig)


def run_sweep(cfg: SweepConfig, out_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole grid; returns ``{"rows", "savings"}`` (also written to OUT/results.json)."""
    from finetune.evaluate import evaluation_key, run_evaluate
    from finetune.train import CHECKPOINT_FILE, config_change, run_finetune
    from segfactory.config import save_resolved
    from segfactory.io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir, read_json

    out = ensure_writable_dir(out_dir)
    runs = plan_runs(cfg)
    rows = []
    console.print(f"sweep: {len(runs)} run(s) of {cfg.finetune.train.steps} steps x batch "
                  f"{cfg.finetune.train.batch_size} each")
    syn_root = out / SYNTHETIC_INIT_DIR
    configs = [run_config(cfg, run, synthetic_encoder=syn_root / "encoder") for run in runs]
    pcfg = synthetic_init_config(cfg) if "synthetic" in cfg.sweep.encoder_inits else None
    # Refuse before training anything: a kept run (checkpointed) must have been made with today's config.
    checks = [(run["id"], out / "runs" / run["id"], rcfg) for run, rcfg in zip(runs, configs, strict=True)]
    if pcfg is not None:
        checks.append((SYNTHETIC_INIT_DIR, syn_root / "run", pcfg))
    for name, run_dir, rcfg in checks:
        change = config_change(run_dir, rcfg) if (run_dir / CHECKPOINT_FILE).exists() else None
        if change is not None:
            raise UserError(f"sweep run '{name}' in '{out}' was trained with another config: {change}",
                            fix=f"write the changed sweep to a new --out, or delete '{run_dir.parent}' to retrain")
    save_resolved(cfg, out / "sweep.yaml")
    syn_init = prepare_synthetic_encoder(pcfg, syn_root, show_progress) if pcfg is not None else None
    ssl_steps = None
    if cfg.finetune.model.encoder_dir is not None:
        from segfactory.formats.encoder import read_encoder_meta

        ssl_steps = int(read_encoder_meta(cfg.finetune.model.encoder_dir)["steps"])
    for i, (run, rcfg) in enumerate(zip(runs, configs, strict=True), 1):
        run_dir = out / "runs" / run["id"]
        console.print(f"[bold]run {i}/{len(runs)}[/] {run['id']}")
        t0 = time.perf_counter()
        # A finished run returns its summary; an interrupted one resumes from its checkpoint; a new one starts.
        summary = run_finetune(rcfg, run_dir, resume=(run_dir / CHECKPOINT_FILE).exists(),
                               show_progress=show_progress)
        test_metrics = run_dir / "test" / "metrics.json"
        cached = read_json(test_metrics) if test_metrics.exists() else None
        # Test scores are reused only for the same model and the same test specs (paths, remaps, classes).
        if cached is not None and cached.get("key") == evaluation_key(run_dir / "model", cfg.test):
            report = cached
        else:
            report = run_evaluate(run_dir / "model", cfg.test, run_dir / "test", device=rcfg.train.device,
                                  show_progress=show_progress, data_field="test", remap_flag=None)
        if run["init"] == "synthetic":
            assert syn_init is not None
            used = (read_json(run_dir / "model" / "model.json").get("lineage") or {}).get("encoder") or {}
            if used.get("weights_sha256") != syn_init["weights_sha256"]:
                raise UserError(f"sweep run '{run['id']}' in '{out}' started from another synthetic-init encoder "
                                f"than '{syn_init['encoder']}' (it was retrained)",
                                fix=f"delete '{out / 'runs'}' to retrain the grid, or write the sweep to a new --out")
        data = read_json(run_dir / "data.json")
        real_labels = sum(s["train_items"] for s in data["train"] if s["kind"] == "real")
        syn_frames = sum(s["train_items"] for s in data["train"] if s["kind"] == "synthetic")
        val = summary.get("final_val") or {}
        rows.append({"run": run["id"], "seed": run["seed"], "encoder_init": run["init"],
                     "synthetic_fraction": run["synthetic_fraction"], "synthetic_frames": syn_frames,
                     "real_fraction": run["real_fraction"], "real_labels": real_labels,
                     "steps": rcfg.train.steps, "batch_size": rcfg.train.batch_size,
                     # encoder training before this run (on top of the matched fine-tuning compute)
                     "pretrain_steps": {"random": 0, "ssl": ssl_steps,
                                        "synthetic": None if syn_init is None else syn_init["steps"]}[run["init"]],
                     "test_miou": report["overall"]["miou"],
                     "test_pixel_accuracy": report["overall"]["pixel_accuracy"],
                     "val_real_miou": ((val.get("by_kind") or {}).get("real") or {}).get("miou"),
                     "seconds": round(summary.get("seconds_this_run", time.perf_counter() - t0), 2)})
    savings = compute_savings(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    result = {"rows": rows, "savings": savings, "matched_compute": {"steps": cfg.finetune.train.steps,
                                                                    "batch_size": cfg.finetune.train.batch_size},
              "synthetic_init": syn_init}
    atomic_write_json(out / "results.json", result)
    atomic_write_bytes(out / "label_efficiency.png", plot_sweep(rows))
    print_table(rows, savings)
    return result


def print_table(rows: list[dict[str, Any]], savings: list[dict[str, Any]]) -> None:
    from rich.table import Table

    eq = {s["run"]: s for s in savings}
    table = Table(title="label efficiency (test mIoU on held-out real data, matched compute)")
    for col in ("init", "seed", "synthetic", "real labels", "test mIoU", "real-only needs"):
        table.add_column(col)
    for r in rows:
        s = eq.get(r["run"])
        need = "-" if s is None else ("> 100 %" if s["real_only_equivalent_fraction"] is None
                                      else ("<= " if s["upper_bound"] else "")
                                      + f"{100 * s['real_only_equivalent_fraction']:.0f} %")
        table.add_row(r["encoder_init"], str(r["seed"]), f"{_fmt(r['synthetic_fraction'])} % ({r['synthetic_frames']})",
                      f"{_fmt(r['real_fraction'])} % ({r['real_labels']})",
                      "-" if r["test_miou"] is None else f"{r['test_miou']:.4f}", need)
    console.print(table)
