"""What a training run tells its user while it runs: log.txt, metrics.csv and loss.png in the results
folder, written by rank 0 (DiT's rank-0 logger; the loss curve drawn with Pillow, no plotting library).

Left out: TensorBoard and Weights & Biases (a CSV reads into either).
"""
import csv
import os
import time

from PIL import Image, ImageDraw

PLOTTED = ("diffusion", "proj_sit", "proj_vae", "l1", "lpips", "disc")


class Logger:
    """Rank 0 writes a text log, a CSV (one row per --log-every steps) and a loss-curve PNG."""

    def __init__(self, results_dir, rank, resume_step=0):
        self.rank, self.dir, self.rows = rank, results_dir, []
        self.csv = os.path.join(results_dir, "metrics.csv")
        if rank == 0 and resume_step and os.path.exists(self.csv):  # keep the history up to the checkpoint
            with open(self.csv, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self.write_csv()

    def info(self, msg):
        if self.rank == 0:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
            print(line, flush=True)
            append_line(self.dir, line)

    def write_csv(self):
        fields = list(self.rows[0]) if self.rows else []
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)

    def metrics(self, row):
        if self.rank != 0:
            return
        self.rows.append(row)
        self.write_csv()
        self.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        plot_curves(self.rows, os.path.join(self.dir, "loss.png"))


def append_line(results_dir, line):
    """One line at the end of results_dir/log.txt (also the error that stops a run)."""
    with open(os.path.join(results_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


def plot_curves(rows, path, keys=PLOTTED, size=(300, 180)):
    """One small line plot per loss term."""
    keys = [k for k in keys if rows and k in rows[0]]
    W, H = size
    img = Image.new("RGB", (W * len(keys), H), "white")
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        steps = [int(r["step"]) for r in rows]
        vals = [float(r[key]) for r in rows]
        lo, hi = min(vals), max(vals)
        x0, y0, x1, y1 = i * W + 40, 20, i * W + W - 10, H - 20
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((i * W + 45, 4), key, fill="black")
        draw.text((i * W + 2, y0), f"{hi:.3g}", fill="gray")
        draw.text((i * W + 2, y1 - 10), f"{lo:.3g}", fill="gray")
        draw.text((x1 - 60, y1 + 4), f"step {steps[-1]}", fill="gray")
        span_s, span_v = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-12)
        pts = [(x0 + (s - steps[0]) / span_s * (x1 - x0), y1 - (v - lo) / span_v * (y1 - y0))
               for s, v in zip(steps, vals)]
        if len(pts) > 1:
            draw.line(pts, fill="steelblue", width=2)
    img.save(path)
