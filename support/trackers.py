"""Live training curves where users already watch them (REPA-E, SiT and PixCell log to Weights & Biases, PixCell
also to TensorBoard): `train.py --tracker tensorboard|wandb` sends every number of metrics.csv at its step, the
sample grids and the run's settings; `evaluate.py --tracker ...` adds the benchmark's numbers and Figure 4 to the
training run's own record. Rank 0 only (support/logs.Logger holds the tracker).

    open_tracker(kind, run_dir, settings, resume_step)   a TensorBoard or a W&B tracker, or None
    tracker_run(ckpt, run_dir)                           evaluate.py's run folder: --tracker-run, or the checkpoint's
    log_benchmark(kind, run_dir, report_dir, ckpt)       evaluate.py: report.json's numbers at the checkpoint's step

TensorBoard: event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`); a resumed run hides
what its killed predecessor logged after the checkpoint (purge_step). W&B: offline (files in RUN_DIR/wandb, `wandb
sync` later) when api.wandb.ai does not answer, unless WANDB_MODE says otherwise; the run's id is kept in
RUN_DIR/wandb_run.json, so a resumed run, and evaluate.py, continue the same W&B run. Each package is imported only
when asked for; requirements-trackers.txt installs them.

Left out: other trackers (MLflow, Aim), and logging from ranks other than 0.
"""
import importlib
import json
import os
import re

import numpy as np
from PIL import Image

from support.cli import InputError, Unavailable
from support.hub import reachable
from support.outputs import save_json
from support.weights import read_weights

TRACKERS = ("tensorboard", "wandb")
REQUIREMENTS = "requirements-trackers.txt"
TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard: the event files
WANDB_RUN = "wandb_run.json"     # RUN_DIR/wandb_run.json: the W&B run's id and project
WANDB_API = "https://api.wandb.ai"
WANDB_PROJECT = "cytosyn"        # unless WANDB_PROJECT says otherwise
BENCHMARK_STEP = "benchmark/step"  # W&B: the benchmark's x axis, the checkpoint's training step


def require(kind):
    """The tracker's package, imported now; not installed -> one line saying what to install."""
    try:
        return importlib.import_module({"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[kind])
    except ImportError:
        raise Unavailable(f"--tracker {kind} needs the {kind} package, which is not installed: pip install -r "
                          f"{REQUIREMENTS}") from None


def numbers(row):
    """The finite numbers of a row (metrics.csv's, or a report's), by name."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and np.isfinite(v)}


class TensorBoard:
    def __init__(self, run_dir, settings, resume_step):
        # purge_step: the events a killed run wrote after the checkpoint this one resumes from are hidden
        self.writer = require("tensorboard").SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR),
                                                           purge_step=resume_step + 1 if resume_step else None)
        if settings:
            self.writer.add_text("settings", "```\n" + json.dumps(settings, indent=1, default=str) + "\n```",
                                 resume_step)

    def scalars(self, prefix, row, step):
        for name, value in numbers(row).items():
            if name != "step":
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()  # live: on disk at each log line, not when the writer's buffer fills

    def images(self, images, step):
        for tag, path in images.items():
            with Image.open(path) as image:
                self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def benchmark(self, values, images, step):
        self.scalars("benchmark", values, step)
        self.images(images, step)

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, run_dir, settings, resume_step):
        self.wandb = require("wandb")
        record = os.path.join(run_dir, WANDB_RUN)
        known = {}
        if os.path.isfile(record):
            with open(record) as f:
                known = json.load(f)
        mode = os.environ.get("WANDB_MODE") or ("online" if reachable(os.environ.get("WANDB_BASE_URL", WANDB_API))
                                                else "offline")
        self.run = self.wandb.init(project=known.get("project") or os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                                   name=os.path.basename(os.path.normpath(run_dir)), dir=run_dir, config=settings,
                                   id=known.get("id"), resume="allow" if known else None, mode=mode)
        save_json({"id": self.run.id, "project": self.run.project}, record)
        if mode == "offline":
            print(f"W&B offline ({WANDB_API} does not answer, or WANDB_MODE=offline): the run is in {run_dir}/wandb; "
                  f"`wandb sync {run_dir}/wandb/offline-run-*` uploads it later", flush=True)

    def scalars(self, prefix, row, step):
        self.run.log({f"{prefix}/{k}": v for k, v in numbers(row).items() if k != "step"}, step=step)

    def images(self, images, step):
        self.run.log({tag: self.wandb.Image(path) for tag, path in images.items()}, step=step)

    def benchmark(self, values, images, step):
        """On their own x axis, the checkpoint's step: W&B refuses steps below the training run's last."""
        self.run.define_metric("benchmark/*", step_metric=BENCHMARK_STEP)
        self.run.log({BENCHMARK_STEP: step, **{f"benchmark/{k}": v for k, v in values.items()},
                      **{tag: self.wandb.Image(path) for tag, path in images.items()}})

    def close(self):
        self.run.finish()


def open_tracker(kind, run_dir, settings=None, resume_step=0):
    """kind (None, "tensorboard" or "wandb") -> a tracker of the run in run_dir (None for None); call on rank 0."""
    return None if kind is None else {"tensorboard": TensorBoard, "wandb": WandB}[kind](run_dir, settings, resume_step)


def tag_of(result):
    """A report row -> its name: benchmark/EXTRACTOR/METRIC/VAL/RUN (a row label as CytoSyn_sde_250_steps)."""
    label = re.sub(r"[^\w.-]+", "_", result["row"]).strip("_")
    return f"{result['extractor']}/{result['metric']}/{result['val'] or 'tiles'}/{label}"


def tracker_run(ckpt, run_dir):
    """evaluate.py --tracker-run, or else the run folder its checkpoint lies in (RUN_DIR/checkpoints/NNNNNNN.pt)."""
    if run_dir is not None:
        return run_dir
    parent = os.path.dirname(os.path.abspath(str(ckpt)))
    if os.path.basename(parent) != "checkpoints":
        raise InputError(f"--tracker: {ckpt} is not in a training run's checkpoints/ folder; pass --tracker-run "
                         f"RUN_DIR, the train.py --out folder whose tracker run gets the numbers")
    return os.path.dirname(parent)


def log_benchmark(kind, run_dir, report_dir, ckpt):
    """evaluate.py's report.json numbers (each value, and its std where there is one) and Figure 4
    (fd_vs_steps.png, when written) into the training run's tracker, at the checkpoint's step."""
    step = read_weights(ckpt)[2] or 0  # an export or a REPA-E checkpoint may not say: 0
    with open(os.path.join(report_dir, "report.json")) as f:
        results = json.load(f)["results"]
    values = {}
    for result in results:
        values[tag_of(result)] = result["value"]
        if result.get("std") is not None:
            values[tag_of(result) + "_std"] = result["std"]
    figure = os.path.join(report_dir, "fd_vs_steps.png")
    tracker = open_tracker(kind, tracker_run(ckpt, run_dir))
    tracker.benchmark(values, {"benchmark/fd_vs_steps": figure} if os.path.isfile(figure) else {}, step)
    tracker.close()
    return values
