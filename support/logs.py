"""What a run shows its user: log.txt, metrics.csv and loss.png of a training run (rank 0 writes them, as
DiT's logger), a WARNING when the run looks collapsed (CollapseWatch), and the picture grids of train.py and
sample.py (torchvision's make_grid). With a tracker (train.py --tracker), rank 0 also sends metrics.csv's rows and
the sample grids to TensorBoard or Weights & Biases (support/trackers.py).
"""
import csv
import math
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from support.checkpoints import latest_checkpoint
from support.cli import CytoSynError, DiskFull, Interrupted, NonFinite, error_line
from support.outputs import append_to, atomic, claimed, save_csv
from support.perf import peak_memory_gb
from support.trackers import open_tracker

# What train_step returns that is averaged over ranks, checked for finiteness every step and logged.
LOGGED_TERMS = ("diffusion", "proj_sit", "proj_vae", "l1", "lpips", "kl", "gan", "disc", "grad_sit", "grad_vae",
                "grad_disc", "logits_real", "logits_fake")
PLOTTED = ("diffusion", "proj_sit", "proj_vae", "l1", "lpips", "kl", "gan", "disc")  # loss.png's panels
FEW_POINTS = 5  # loss.png labels each point of a curve shorter than this
# The collapse watch: a symptom must last this many log intervals in a row (one bad interval is noise) ...
COLLAPSE_INTERVALS = 3
LOGIT_MARGIN = 0.01  # ... the discriminator's mean logits on real tiles and on reconstructions this close, or
GRAD_FLOOR = 1e-4    # ... a network's gradient norm (before clipping at 1.0) below this
WATCHED_GRADS = ("grad_sit", "grad_vae", "grad_disc")


class Logger:
    """Rank 0 writes a text log, a CSV (one row per --log-every steps) and the loss curves."""

    def __init__(self, run_dir, rank, resume_step=0, world=1, log_every=1, images_per_step=1, device=None,
                 tracker=None, settings=None):
        self.rank, self.dir, self.rows = rank, run_dir, []
        self.world, self.log_every, self.images_per_step, self.device = world, log_every, images_per_step, device
        self.window, self.sums, self.t0 = 0, None, time.perf_counter()
        self.watch = CollapseWatch()
        self.csv = os.path.join(run_dir, "metrics.csv")
        if rank == 0 and resume_step and os.path.exists(self.csv):  # keep the history up to the checkpoint
            with open(self.csv, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self.write_csv()
        self.tracker = open_tracker(tracker, run_dir, settings, resume_step) if rank == 0 else None

    def info(self, msg):
        if self.rank == 0:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
            tqdm.write(line)  # above train.py's progress bar when it shows one; a plain print otherwise
            sys.stdout.flush()
            append_line(self.dir, line)

    def write_csv(self):
        save_csv(self.rows, self.csv, list(self.rows[0]) if self.rows else [])  # atomic: never half a table

    def step(self, step, terms, last=False):
        """One training step's loss terms: averaged over ranks and checked every step (so no checkpoint is
        ever written after a non-finite loss, on any rank), written every log_every steps and at the last, each
        interval's averages watched for a collapse (a WARNING line; the run goes on)."""
        keys = [k for k in LOGGED_TERMS if k in terms]
        values = torch.stack([terms[k].detach().float() for k in keys])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        values = values.tolist()
        bad = [f"{k}={v}" for k, v in zip(keys, values) if not math.isfinite(v)]
        if bad:
            raise NonFinite(f"non-finite loss at step {step}: {', '.join(bad)} (all terms: {dict(zip(keys, values))}). "
                            f"Nothing was saved after it; the last checkpoint is "
                            f"{latest_checkpoint(self.dir) or 'none'}.")
        self.sums = values if self.sums is None else [a + b for a, b in zip(self.sums, values)]
        self.window += 1
        if step % self.log_every == 0 or last:
            elapsed = time.perf_counter() - self.t0
            row = {"step": step, **{k: s / self.window for k, s in zip(keys, self.sums)}}
            self.metrics({**row, "img_per_s": self.window * self.images_per_step / elapsed,
                          "sec_per_step": elapsed / self.window, "peak_mem_gb": peak_memory_gb(self.device)})
            for line in self.watch.update(row):
                self.info(line)
            self.window, self.sums, self.t0 = 0, None, time.perf_counter()

    def metrics(self, row):
        if self.rank != 0:
            return
        self.rows.append(row)
        self.write_csv()
        if self.tracker:
            self.tracker.scalars("train", row, row["step"])
        self.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        plot_losses(self.rows, os.path.join(self.dir, "loss.png"))

    def image(self, name, path, step):
        """A picture the run wrote (a sample grid), also to the tracker."""
        if self.tracker:
            self.tracker.images({f"train/{name}": path}, step)

    def close(self):
        if self.tracker:
            self.tracker.close()


class CollapseWatch:
    """A run can collapse without a NaN: REPA-E's users report its GAN loss and gradient norms falling to zero
    around 90k steps. Two symptoms, each of which must last COLLAPSE_INTERVALS log intervals in a row: the
    discriminator's mean logits on real tiles and on reconstructions within LOGIT_MARGIN of each other (it no
    longer tells them apart), or a network's gradient norm below GRAD_FLOOR (it no longer learns). A symptom
    is reported once per episode, which ends at the first interval without it."""

    def __init__(self):
        self.streak = Counter()  # symptom -> the intervals in a row it has lasted

    def symptoms(self, row):
        """One interval's averaged terms -> {symptom: what was seen}."""
        found = {}
        if "logits_real" in row and abs(row["logits_real"] - row["logits_fake"]) < LOGIT_MARGIN:
            found["logits"] = (f"the discriminator's mean logits on real tiles ({row['logits_real']:.4g}) and on "
                               f"reconstructions ({row['logits_fake']:.4g}) are within {LOGIT_MARGIN}")
        for key in WATCHED_GRADS:
            if key in row and row[key] < GRAD_FLOOR:
                found[key] = f"{key} = {row[key]:.3g} is below {GRAD_FLOOR}"
        return found

    def update(self, row):
        """One log interval's averaged terms (and its step) -> the lines to log: one WARNING, or none."""
        found = self.symptoms(row)
        self.streak = Counter({k: self.streak[k] + 1 for k in found})  # a symptom absent once starts over
        new = [text for k, text in found.items() if self.streak[k] == COLLAPSE_INTERVALS]
        if not new:
            return []
        return [f"WARNING: the run may have collapsed (step {row['step']}, {COLLAPSE_INTERVALS} log intervals in a "
                f"row): {'; '.join(new)}. Training goes on: look at loss.png and the sample grids"]


@contextmanager
def errors_to_log(run_dir):
    """A CytoSynError that stops a run (bad input, a non-finite loss, a full disk) or an interruption (Ctrl-C,
    SIGTERM) is also written at the end of run_dir/log.txt, beside the run's history (rank 0), as the user reads
    it, then goes on to the user; not when the run never claimed the folder (another run's, or not writable):
    that log is not this run's. On a disk too full for that line too, the user alone reads it."""
    try:
        yield
    except (CytoSynError, Interrupted) as err:
        if os.environ.get("RANK", "0") == "0" and claimed(run_dir):
            kind = "" if isinstance(err, Interrupted) else "error: "
            try:
                append_line(run_dir, f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {os.path.basename(sys.argv[0])}: "
                                     f"{kind}{error_line(err)}")
            except (DiskFull, OSError):
                pass
        raise


def append_line(run_dir, line):
    """One line at the end of run_dir/log.txt (also the error that stops a run)."""
    append_to(os.path.join(run_dir, "log.txt"), line)


def plot_losses(rows, path):
    """One panel per loss term the run computes (a term whose network is off is not logged, so not
    plotted), against the step from 0. A short run's few points are drawn as dots, each with its value
    (a curve of one or two points says little, and matplotlib would zoom its axis to a point)."""
    keys = [k for k in PLOTTED if rows and k in rows[0]]
    if not keys:
        return
    from matplotlib.figure import Figure  # imported when a plot is drawn, so that `import train` stays light
    fig = Figure(figsize=(3.2 * len(keys), 2.6), layout="constrained")
    steps = [int(r["step"]) for r in rows]
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        values = [float(r[key]) for r in rows]
        ax.plot(steps, values, color="tab:blue", marker="o" if len(rows) < FEW_POINTS else "." if len(rows) < 30
                else None, markersize=4)
        if len(rows) < FEW_POINTS:
            for step, value in zip(steps, values):
                ax.annotate(f"{value:.3g}", (step, value), textcoords="offset points", xytext=(0, 5), ha="center")
        ax.set_xlim(0, max(steps) * 1.05)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=80)


def save_training_grid(real, fake, path):
    """train.py's sample grid: the conditioning tiles (uint8 (N, 3, H, W)) on top, the EMA samples of their
    CLS features (uint8 (N, H, W, 3)) below."""
    fake = torch.as_tensor(fake).permute(0, 3, 1, 2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic(path) as tmp:
        save_image(torch.cat([real.cpu(), fake]).float() / 255, tmp, nrow=len(real), padding=0)


def save_rows(rows, path, padding=0):
    """A picture of rows of uint8 (3, H, W) tiles (Figures 2 and 3): rows shorter than the longest are
    padded with white."""
    width = max(len(r) for r in rows)
    blank = torch.full_like(rows[0][0], 255)
    cells = [tile for row in rows for tile in list(row) + [blank] * (width - len(row))]
    grid = make_grid(torch.stack(cells).float() / 255, nrow=width, padding=padding, pad_value=1.0)
    with atomic(path) as tmp:
        save_image(grid, tmp)


def plot_fd_vs_steps(curves, path, title):
    """Figure 4: FD against the number of sampling steps (log axis), one line per sampler -> what the figure
    shows, read back from its axes (title, axis labels, legend, each line's points), for the JSON beside it."""
    from matplotlib.figure import Figure  # imported when a plot is drawn
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for sampler, curve in sorted(curves.items()):
        steps, values = zip(*curve)
        ax.plot(steps, values, marker="o", label=sampler.upper())
    ax.set_xscale("log")
    ticks = sorted({n for c in curves.values() for n, _ in c})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(title.split(" (")[0])
    ax.set_title(f"{title} against sampling steps")
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return dict(title=ax.get_title(), xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(),
                legend=[t.get_text() for t in ax.get_legend().get_texts()],
                lines={line.get_label(): [[float(x), float(y)] for x, y in zip(line.get_xdata(), line.get_ydata())]
                       for line in ax.get_lines()})
