"""What a training run shows its user while it runs: log.txt, metrics.csv, loss.png and the sample grids
in samples/, written by rank 0 (DiT's rank-0 logger; pictures drawn with Pillow, no plotting library).

Left out: TensorBoard and Weights & Biases (a CSV reads into either).
"""
import csv
import os
import time

import torch
from PIL import Image, ImageDraw

from sampler import euler_sampler

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


@torch.no_grad()
def sample_grid(nets, real, cond, args, path):
    """Top row: the conditioning tiles; bottom row: EMA samples conditioned on their CLS features
    (Euler ODE, fixed noise, so the grids of a run are comparable)."""
    ema = nets.sit_ema
    g = torch.Generator(nets.device).manual_seed(args.seed)
    size = args.image_size // nets.vae.factor
    noise = torch.randn(real.shape[0], nets.vae.z_channels, size, size, generator=g, device=nets.device)
    x = euler_sampler(lambda x, t, c, drop=None: ema(x, t, c, drop)[0], noise, cond, num_steps=args.sample_steps,
                      cfg_scale=args.sample_cfg, guidance_low=0.0, guidance_high=args.guidance_high)
    fake = nets.vae_ema.decode(ema.denormalize(x.float()))                          # (N, 3, H, W) in about [-1, 1]
    fake = ((fake.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    rows = [torch.cat(list(images), dim=2) for images in (real.cpu(), fake)]         # (3, H, N*W) each
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(torch.cat(rows, dim=1).permute(1, 2, 0).numpy()).save(path)      # (2H, N*W, 3)
