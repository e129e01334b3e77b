"""A pipeline's stage process, and the torchrun ranks it starts, outlive the pipe they print into.

A stage process writes its output (progress lines, the console) into a pipe its Dask worker reads, and its torchrun
ranks inherit that pipe. When the worker dies, the pipe breaks at once, but the ranks learn of it only later, on the
SIGTERM that travels stage process -> torchrun -> ranks. A rank that prints in between used to die of the broken
pipe (``BrokenPipeError``), the other rank's next collective failed, and no checkpoint was written: the retry
started from step 0 (seen once in ``tests/test_pipelines_ddp.py``'s SIGKILL test). Now every write that finds the
pipe broken points the process's stdout and stderr at the stage's log and goes on there.

Reproduced for real: a 2-rank gloo fine-tune in its own process, as a pipeline starts it (``PROGRESS_LINES_ENV``,
``STAGE_LOG_ENV``), whose stdout pipe is closed by its reader after the first progress line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segfactory.console import PROGRESS_LINES_ENV, PROGRESS_PREFIX
from segfactory.errors import STAGE_LOG_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("devices", [1, 2])
def test_a_stage_whose_pipe_breaks_trains_on_and_finishes_its_lines_in_its_log(tiny_dataset: Path, tmp_path: Path,
                                                                            devices: int) -> None:
    out, log = tmp_path / "ft", tmp_path / "ft.log"
    cmd = [sys.executable, "-m", "segfactory.cli", "finetune", str(ROOT / "configs" / "finetune_tiny.yaml"),
           "--synthetic", str(tiny_dataset), "--out", str(out), "--steps", "24", "train.val_every=1000",
           "train.log_every=1", f"train.devices={devices}", "train.backend=gloo"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), PROGRESS_LINES_ENV: "1", STAGE_LOG_ENV: str(log),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # training has started once a step's progress line arrives
        seen.append(line)
        if line.startswith(f"{PROGRESS_PREFIX} ") and not line.startswith(f"{PROGRESS_PREFIX} 0 "):
            break
    proc.stdout.close()  # the reader is gone, as when the Dask worker dies: the next write breaks the pipe
    assert proc.wait(timeout=300) == 0, log.read_text(errors="replace") if log.exists() else "".join(seen)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24
    text = log.read_text(errors="replace")
    # The rest of the output went to the log: the last progress line and the summary.
    assert f"{PROGRESS_PREFIX} 24 24" in text and '"finished": true' in text
