"""Every speed measurement of the repo, apart from the tools that do the work (as nanoGPT's bench.py).

    python bench.py train --batch-size 32 --steps 10     # the full REPA-E step: images/s, ms and MFU per phase
    python bench.py sample --batch-size 64               # network evaluations per image, images/s, MFU
    python bench.py fd                                   # our FD against the scipy.linalg.sqrtm formula
    python bench.py tiling SLIDES_DIR                    # tiles/s of the tiler, and of reading tiles back

Random weights throughout (the timings do not depend on them), so nothing needs the gated hub models.
One report format: a line `bench <name>: key=value ...` on stdout, and the same record appended as one
JSON line to --out (results/bench.jsonl), with the machine, torch version and date.
MFU = FLOPs counted by PyTorch's FlopCounterMode / seconds / the GPU's dense bf16 peak (perf.py); only
for bf16 runs on a GPU in perf.py's table. CPU numbers are never GPU numbers.
"""
import argparse
import inspect
import json
import os
import time
import warnings
from datetime import date
from types import SimpleNamespace

import numpy as np
import scipy
import scipy.linalg
import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from metrics import fd, feature_stats
from perf import PhaseFlops, PhaseTimer, device_name, peak_flops, peak_memory_gb
from sample import decode, sample_latents, velocity_field
from sampler import standard_normal
from sit import SiT_models, build_sit
from vae import build_vae, vae_models


def report(name, result, out):
    """The one report format: a printed line and a JSON line (with machine, torch and date)."""
    record = {"bench": name, "date": str(date.today()), "torch": torch.__version__, **result}
    print(f"bench {name}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in record.items() if k != "bench"), flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    return record


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -------- train: the full REPA-E step (train.train_step), on synthetic tiles ---------------------------
def add_train_args(p):
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--encoder", choices=["h0-mini", "tiny"], default="h0-mini", help="architecture, random weights")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="tiles per step (one process)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling happens here)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--no-gan", action="store_true")


def bench_train(args):
    """Images/s, time per phase, FLOPs per phase, MFU and peak memory of train.train_step."""
    device = default_device()
    targs = train.parse_args(["--data", "unused", "--model", args.model, "--vae", args.vae, "--encoder", args.encoder,
                              "--image-size", str(args.image_size), "--global-batch-size", str(args.batch_size),
                              "--lpips-random", *(["--compile"] if args.compile else []),
                              *(["--no-bf16"] if not args.bf16 else []), *(["--no-lpips"] if args.no_lpips else []),
                              *(["--no-gan"] if args.no_gan else [])])
    nets = train.wrap_models(train.build_models(targs, device, 1, pretrained=False), targs, distributed=False)
    opts = train.build_optimizers(targs, nets)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=g)
    feats, timer = torch.empty(0), PhaseTimer(device)
    for _ in range(args.warmup):
        train.train_step(nets, opts, images, feats, targs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train.train_step(nets, opts, images, feats, targs, timer)
    per_step = (time.perf_counter() - start) / args.steps
    peak_mem = peak_memory_gb(device)
    # FLOPs of one step, counted on the uncompiled modules (FlopCounterMode does not see inside compiled
    # graphs) and on a few tiles: every counted operation is per image, so the count scales with the batch.
    flops, compiled, n = PhaseFlops(), dict(nets.wrapped), min(args.batch_size, 4)
    nets.wrapped.update(sit=nets.sit, vae=nets.vae, disc=nets.disc, sit_align=nets.sit)
    train.train_step(nets, opts, images[:n], feats, targs, flops)
    nets.wrapped.update(compiled)
    flops.totals = {k: v * args.batch_size / n for k, v in flops.totals.items()}
    peak = peak_flops(device) if args.bf16 else None
    mfu = {}
    if peak:
        seconds = {k: v / args.steps for k, v in timer.totals.items()}
        mfu = {f"mfu_{k}": flops.totals[k] / seconds[k] / peak for k in seconds if flops.totals.get(k)}
        mfu["mfu_step"] = sum(flops.totals.values()) / per_step / peak
    return dict(device=device_name(device), model=args.model, vae=args.vae, encoder=args.encoder,
                image_size=args.image_size, batch=args.batch_size, compile=args.compile,
                bf16=device.type == "cuda" and args.bf16, img_per_s=args.batch_size / per_step, sec_per_step=per_step,
                **{f"ms_{k}": 1000 * v / args.steps for k, v in timer.totals.items()},
                **{f"tflop_{k}": v / 1e12 for k, v in flops.totals.items()}, **mfu, peak_mem_gb=peak_mem)


# -------- sample: the paper's sampler on the SiT, then decoding ---------------------------------------
def add_sample_args(p):
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mode", choices=["sde", "ode", "heun"], default="sde")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=2.5)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=0.75)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def bench_sample(args):
    """Network evaluations per image, images/s and the sampling loop's MFU at the given sampler settings."""
    device = default_device()
    args.precision = ("bf16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    torch.manual_seed(args.seed)
    vae = build_vae(args.vae).to(device).eval()
    sit = build_sit(args.model, input_size=args.image_size // vae.factor).to(device).eval()
    nets = SimpleNamespace(sit=sit, vae=vae)
    velocity, rows = velocity_field(sit, args.compile), [0]

    def counting(x, t, c, drop=None):
        rows[0] += x.shape[0]
        return velocity(x, t, c, drop)

    B = args.batch_size
    shape = (B, sit.in_channels, sit.input_size, sit.input_size)
    cond = torch.randn(B, sit.cond_dim, device=device)
    gen = torch.Generator(device).manual_seed(args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # warm-up: 2 steps visit both batch shapes (t = 1 unguided, then guided), which compiles both graphs
    warm = SimpleNamespace(**{**vars(args), "steps": 2})
    decode(nets, sample_latents(counting, standard_normal(shape, gen, device), cond, warm, gen, device))
    rows[0] = 0
    sync()
    t0 = time.perf_counter()
    x = sample_latents(counting, standard_normal(shape, gen, device), cond, args, gen, device)
    sync()
    t1 = time.perf_counter()
    decode(nets, x)
    sync()
    t2 = time.perf_counter()
    # FLOPs per network evaluation (one row), counted on the eager SiT.
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"), \
            FlopCounterMode(display=False) as counter:
        sit(torch.randn(shape, device=device), torch.rand(B, device=device), cond)
    row_flops = counter.get_total_flops() / B
    peak = peak_flops(device) if args.precision == "bf16" else None
    return dict(device=device_name(device), model=args.model, vae=args.vae, image_size=args.image_size,
                precision=args.precision, compile=args.compile, batch=B, mode=args.mode, steps=args.steps,
                cfg_scale=args.cfg_scale, guidance=f"[{args.guidance_low}, {args.guidance_high}]",
                nfe_per_image=rows[0] / B, img_per_s=B / (t2 - t0), sampling_s=t1 - t0, decoding_s=t2 - t1,
                gflop_per_eval=row_flops / 1e9,
                **({"mfu_sampling": rows[0] * row_flops / (t1 - t0) / peak} if peak else {}))


# -------- fd: our FD against the scipy.linalg.sqrtm formula of pytorch-fid / clean-fid ----------------
def add_fd_args(p):
    p.add_argument("--n", type=int, default=100_000, help="samples per set")
    p.add_argument("--d", type=int, default=1536, help="feature dimension (H-optimus-0, UNI2-h)")
    p.add_argument("--seed", type=int, default=0)


def scipy_sqrtm(a):
    """scipy.linalg.sqrtm as pytorch-fid / clean-fid call it (disp=False), where SciPy still has `disp`."""
    if "disp" in inspect.signature(scipy.linalg.sqrtm).parameters:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return scipy.linalg.sqrtm(a, disp=False)[0]
    return scipy.linalg.sqrtm(a)  # SciPy >= 1.18: no `disp`, one return value


def fd_sqrtm_reference(mu1, s1, mu2, s2, eps=1e-6):
    """FD the pytorch-fid way from (np.mean, np.cov) statistics: sqrtm of the non-symmetric S1 S2, then
    drop the imaginary part."""
    covmean = scipy_sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy_sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def bench_fd(args):
    """Both FD implementations on the same random features (two correlated Gaussians)."""
    n, d = args.n, args.d
    rng = np.random.default_rng(args.seed)
    mix = rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)
    x = rng.standard_normal((n, d), dtype=np.float32) @ mix + 0.5
    y = rng.standard_normal((n, d), dtype=np.float32) @ (mix + 0.1 * np.eye(d, dtype=np.float32)) + 0.45
    t = [time.perf_counter()]
    s1, s2 = feature_stats(x), feature_stats(y)  # ours: streaming float64 sums
    t.append(time.perf_counter())
    ours = fd(s1, s2)
    t.append(time.perf_counter())
    ref_stats = (np.mean(x, axis=0), np.cov(x, rowvar=False), np.mean(y, axis=0), np.cov(y, rowvar=False))
    t.append(time.perf_counter())
    ref = fd_sqrtm_reference(*ref_stats)
    t.append(time.perf_counter())
    ours_s, ref_s = t[2] - t[0], t[4] - t[2]
    return dict(n=n, d=d, fd_ours=ours, fd_sqrtm=ref, abs_diff=abs(ours - ref), rel_diff=abs(ours - ref) / ref,
                ours_s=ours_s, ours_stats_s=t[1] - t[0], ours_fd_s=t[2] - t[1], sqrtm_s=ref_s,
                sqrtm_stats_s=t[3] - t[2], sqrtm_fd_s=t[4] - t[3], speedup=ref_s / ours_s,
                fd_only_speedup=(t[4] - t[3]) / (t[2] - t[1]), scipy=scipy.__version__, numpy=np.__version__,
                threads=torch.get_num_threads(), cpus=os.cpu_count())


COMMANDS = {"train": (add_train_args, bench_train), "sample": (add_sample_args, bench_sample),
            "fd": (add_fd_args, bench_fd)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench.jsonl", help="JSON lines file the records are appended to")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add_args, fn) in COMMANDS.items():
        add_args(sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = p.parse_args(argv)
    return report(args.command, COMMANDS[args.command][1](args), args.out)


if __name__ == "__main__":
    main()
