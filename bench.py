"""Every speed measurement of the repo, apart from the tools that do the work (as nanoGPT's bench.py).

    python bench.py train --batch-size 32 --steps 10     # the full REPA-E step: images/s, ms and MFU per phase
    python bench.py sample --batch-size 64               # network evaluations per image, images/s, MFU
    python bench.py fd                                   # our FD against the scipy.linalg.sqrtm formula
    python bench.py tiling [SLIDES_DIR]                  # tiles/s: tiler, whole run, a data worker (slides vs PNG)

Random weights throughout (the timings do not depend on them), so nothing needs the gated hub models.
One report format: a line `bench <name>: key=value ...` on stdout, and the same record appended as one
JSON line to --out (results/bench.jsonl), with the machine, torch version and date.
MFU = FLOPs counted by PyTorch's FlopCounterMode / seconds / the GPU's dense bf16 peak (perf.py); only
for bf16 runs on a GPU in perf.py's table. CPU numbers are never GPU numbers.

`tiling` times, on the slides of SLIDES_DIR (default tests/data: the CMU slide) and on a synthetic
8192 px JPEG pyramid at 0.25 µm/px (40x) written by synthetic_slide.py: (1) reading only,
slides.read_tile_at against a plain per-tile read_region loop (same tiles and kernel, a freshly opened
slide each round); (2) a whole single-process tiling run (masks, reads, PNG writes, previews); (3) what
one data worker gets for training: SlideTileReader.read(row) from the slide against decoding the PNG
(page cache warm, rows shuffled). Left out: multi-process scaling (the figures are per worker),
cold-cache disk reads, remote storage.
"""
import argparse
import inspect
import json
import os
import shutil
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy
import scipy.linalg
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import tiling
import train
from support.cli import number_in
from metrics import fd, feature_stats
from support.perf import PhaseFlops, PhaseTimer, device_name, peak_flops, peak_memory_gb
from sample import decode, sample_latents, velocity_field
from sampler import standard_normal
from sit import SiT_models, build_sit
from support.slides import RESAMPLE, SlideError, SlideTileReader, open_slide, read_tile_at
from tests.synthetic_slide import synthetic_tissue, write_pyramid_tiff
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
    p.add_argument("--image-size", type=number_in(int, 16, 4096), default=224)
    p.add_argument("--batch-size", type=number_in(int, 1, 10 ** 5), default=32, help="tiles per step (one process)")
    p.add_argument("--steps", type=number_in(int, 1, 10 ** 5), default=10, help="timed steps")
    p.add_argument("--warmup", type=number_in(int, 0, 10 ** 5), default=3, help="untimed steps first (compiling happens here)")
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
    p.add_argument("--image-size", type=number_in(int, 16, 4096), default=224)
    p.add_argument("--batch-size", type=number_in(int, 1, 10 ** 5), default=64)
    p.add_argument("--mode", choices=["sde", "ode", "heun"], default="sde")
    p.add_argument("--steps", type=number_in(int, 1, 10 ** 5), default=250)
    p.add_argument("--cfg-scale", type=number_in(float, 0, 100), default=2.5)
    p.add_argument("--guidance-low", type=number_in(float, 0, 1), default=0.0)
    p.add_argument("--guidance-high", type=number_in(float, 0, 1), default=0.75)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=number_in(int, 0, 2 ** 31 - 1), default=0)


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
    p.add_argument("--n", type=number_in(int, 2, 10 ** 7), default=100_000, help="samples per set")
    p.add_argument("--d", type=number_in(int, 1, 10 ** 5), default=1536, help="feature dimension (H-optimus-0, UNI2-h)")
    p.add_argument("--seed", type=number_in(int, 0, 2 ** 31 - 1), default=0)


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


# -------- tiling: tiling.py and slides.py (CytoSyn §3.2) ------------------------------------------
def time_methods(methods, rounds=3):
    """Best tiles/s of each method (name -> function returning the tiles it read); the methods
    take turns, so a busy machine slows them alike."""
    best, tiles = {name: 0.0 for name in methods}, {}
    for _ in range(rounds):
        for name, read_all in methods.items():
            start = time.perf_counter()
            tiles[name] = read_all()
            best[name] = max(best[name], len(tiles[name]) / (time.perf_counter() - start))
    return best, tiles


def read_tile_naive(slide, geo, x, y, context, resample):
    """The straightforward way: one read_region at the tile's corner and one resize per tile."""
    n = geo.size + 2 * context
    step0 = geo.scale * geo.downsample  # level-0 px per output px
    tile = slide.read_region((round(x - context * step0), round(y - context * step0)), geo.level,
                             (round(n * geo.scale),) * 2).convert("RGB")
    return np.asarray(tile if tile.size == (n, n) else tile.resize((n, n), resample))


def benchmark_reading(path, tiling_args, rounds):
    """Tiles/s of read_tile_at and of a plain per-tile read_region loop on one slide."""
    job = {"slide_id": path.stem, "path": str(path), "csv_mpp": None,
           "settings": tiling.run_settings(tiling_args)}
    _, geo, tissue, _ = tiling.prepare(job)
    corners, resample, c = list(zip(tissue.x, tissue.y)), RESAMPLE[tiling_args.resample], tiling_args.context

    def reader(read):
        def read_all():
            slide = open_slide(path)
            return [read(slide, geo, x, y, c, resample) for x, y in corners]
        return read_all

    speed, tiles = time_methods({"tiler": reader(read_tile_at), "loop": reader(read_tile_naive)}, rounds)
    diff = np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(tiles["tiler"], tiles["loop"])])
    print(f"{path.name}: {len(corners)} tiles from level {geo.level} (scale {geo.scale:g}), reading "
          f"only: tiler {speed['tiler']:.0f} tiles/s, read_region loop {speed['loop']:.0f} tiles/s "
          f"(mean |difference| {diff:.3f} grey levels)")
    return {f"{path.stem}.read_tiler_tiles_per_s": speed["tiler"], f"{path.stem}.read_loop_tiles_per_s": speed["loop"]}


def benchmark_run(folder, out, args):
    """Tiles/s of a whole single-process tiling run; returns its manifest rows."""
    tiling_args = tiling.parse_args([str(folder), str(out), "--format", "png", "--resample", args.resample])
    start = time.perf_counter()
    tiling.run(tiling_args)
    rows = tiling.read_csv(out / "manifest.csv")
    speed = len(rows) / (time.perf_counter() - start)
    print(f"{folder}: whole run, 1 worker, png: {len(rows)} tiles, {speed:.0f} tiles/s")
    return rows, {f"{Path(folder).name}.run_tiles_per_s": speed}


def benchmark_training_reads(folder, out, rows, args):
    """Tiles/s one data worker gets from the slides (SlideTileReader) and from the PNGs."""
    rows = [rows[k] for k in np.random.default_rng(0).permutation(len(rows))]

    def from_slides():
        reader = SlideTileReader(folder, args.resample)
        tiles = [reader.read(row) for row in rows]
        reader.close()
        return tiles

    def from_png():
        return [np.asarray(Image.open(out / row["file"]).convert("RGB")) for row in rows]

    speed, tiles = time_methods({"slides": from_slides, "png": from_png}, args.rounds)
    same = all(np.array_equal(a, b) for a, b in zip(tiles["slides"], tiles["png"]))
    print(f"{folder}: one data worker, {len(rows)} tiles in shuffled order: from the slide "
          f"{speed['slides']:.0f} tiles/s, decoding PNGs {speed['png']:.0f} tiles/s "
          f"({'identical pixels' if same else 'PIXELS DIFFER'})")
    name = Path(folder).name
    return {f"{name}.worker_slides_tiles_per_s": speed["slides"], f"{name}.worker_png_tiles_per_s": speed["png"],
            f"{name}.identical_pixels": same}


def add_tiling_args(parser):
    parser.add_argument("slides_dir", nargs="?", default="tests/data",
                        help="folder of slides to time, besides the synthetic 40x pyramid")
    parser.add_argument("--work-dir", default=None,
                        help="scratch folder for the pyramid (~10 MB) and the tiles, kept afterwards; "
                             "unset: a temporary folder, removed")
    parser.add_argument("--resample", choices=list(RESAMPLE), default="lanczos")
    parser.add_argument("--pyramid-px", type=number_in(int, 1024, 65536), default=8192,
                        help="side of the synthetic pyramid's level 0, in pixels")
    parser.add_argument("--rounds", type=number_in(int, 1, 100), default=3,
                        help="each method's best of this many rounds is reported")


def bench_tiling(args):
    """Tiles/s of the tiler, of a whole tiling run, and of one data worker reading slides vs PNGs."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_tiling_"))
    synthetic = work / "pyramid"
    synthetic.mkdir(parents=True, exist_ok=True)
    side = args.pyramid_px
    print(f"writing a {side} x {side} px pyramid at 0.25 µm/px (40x), levels 1 and 4, JPEG q80")
    write_pyramid_tiff(synthetic / "pyramid.tiff", synthetic_tissue(side), 0.25, (1, 4), jpeg_quality=80)
    tiling_args = tiling.parse_args([args.slides_dir, str(work), "--resample", args.resample])
    record = {}
    for k, folder in enumerate([Path(args.slides_dir), synthetic]):
        for path in tiling.sort_folder(folder)[0]:
            try:
                record.update(benchmark_reading(path, tiling_args, args.rounds))
            except SlideError as e:
                print(f"{path.name}: skipped, {e}")
        out = work / f"tiles_{k}"
        rows, run_speed = benchmark_run(folder, out, args)
        record.update(run_speed, **benchmark_training_reads(folder, out, rows, args))
    if not args.work_dir:
        shutil.rmtree(work)
    return record


# -------- weights: what an export of the paper's model weighs and how long loading it takes -------------
def add_weights_args(p):
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--image-size", type=number_in(int, 16, 4096), default=224)
    p.add_argument("--work-dir", default=None, help="where the export is written (default: a temporary folder, "
                                                    "deleted afterwards)")


def bench_weights(args):
    """Export size (from meta-device shapes) and load_models' time for that export on the CPU (random fp32
    weights written once; page cache warm), with the sha256 check's share of it."""
    from support.checkpoints import load_models, sha256, write_export  # (imported here: the other benchmarks do without)
    with torch.device("meta"):
        vae = build_vae(args.vae)
        sit = build_sit(args.model, input_size=args.image_size // vae.factor)
    shapes = {"sit": sit.state_dict(), "vae": vae.state_dict()}
    mb = {net: sum(v.numel() * v.element_size() for v in sd.values()) / 1e6 for net, sd in shapes.items()}
    gen = torch.Generator().manual_seed(0)
    weights = {f"{net}_ema": {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else
                              torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()} for net, sd in shapes.items()}
    config = {**sit.config, "model": args.model, "vae": args.vae, "encoder": "h0-mini", "seed": 0,
              "image_size": args.image_size}
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_weights_")
    t0 = time.perf_counter()
    write_export(work, weights, config, 0, "bench.py weights (random)", "random")
    t1 = time.perf_counter()
    del weights
    load_models(work, "cpu")
    t2 = time.perf_counter()
    for name in ("sit_ema", "vae_ema"):
        sha256(os.path.join(work, f"{name}.safetensors"))
    t3 = time.perf_counter()
    on_disk = sum(os.path.getsize(os.path.join(work, f)) for f in os.listdir(work)) / 1e6
    if not args.work_dir:
        shutil.rmtree(work)
    return dict(device="cpu", threads=torch.get_num_threads(), model=args.model, vae=args.vae,
                sit_mb=mb["sit"], vae_mb=mb["vae"], export_ema_mb=mb["sit"] + mb["vae"],
                export_ema_raw_mb=2 * (mb["sit"] + mb["vae"]), written_mb=on_disk, write_s=t1 - t0,
                load_s=t2 - t1, sha256_s=t3 - t2)



COMMANDS = {"train": (add_train_args, bench_train), "sample": (add_sample_args, bench_sample),
            "fd": (add_fd_args, bench_fd), "tiling": (add_tiling_args, bench_tiling),
            "weights": (add_weights_args, bench_weights)}


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

