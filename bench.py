"""Every speed measurement of the repo, apart from the tools that do the work (as nanoGPT's bench.py).

    python bench.py train --batch-size 32 --timed-steps 10   # the full REPA-E step: images/s, ms, MFU per phase
    python bench.py sample --batch-size 64               # network evaluations per image, images/s, MFU
    python bench.py fd                                   # our FD against the scipy.linalg.sqrtm formula
    python bench.py tiling [--slides SLIDES_DIR]         # tiles/s: tiler, whole run, a data worker (slides vs PNG)
    python bench.py weights                              # an export's size and load time
    python bench.py region --size 2048                   # decoding a region twin's latent: time, peak memory
    python bench.py nearest                              # the memorisation audit's exact nearest-neighbour search

Random weights throughout (the timings do not depend on them), so nothing needs the gated hub models.
One report format: a line `bench <name>: key=value ...` on stdout, and the same record appended as one
JSON line to OUT/bench.jsonl (--out, default results/bench), with the machine, torch version and date.
MFU = FLOPs counted by PyTorch's FlopCounterMode / seconds / the GPU's dense bf16 peak (support/perf.py);
only for bf16 runs on a GPU in its table. CPU numbers are never GPU numbers.

`tiling` times, on the slides of SLIDES_DIR (default tests/data: the CMU slide) and on a synthetic
8192 px JPEG pyramid at 0.25 µm/px (40x) written by tests/synthetic_slide.py: (1) reading only,
slides.read_tile_at against a plain per-tile read_region loop (same tiles and kernel, a freshly opened
slide each round); (2) a whole single-process tiling run (masks, reads, PNG writes, previews); (3) what
one data worker gets for training: SlideTileReader.read(row) from the slide against decoding the PNG
(page cache warm, rows shuffled). Left out: multi-process scaling (the figures are per worker),
cold-cache disk reads, remote storage.
"""
import argparse
import dataclasses
import inspect
import json
import os
import shutil
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import tiling
import train
from features import ENCODERS
from metrics import fd, feature_stats
from sample import Pipeline, SamplingSettings
from sit import SiT_models, build_sit
from support.cli import (
    BATCH_SIZE,
    IMAGE_SIZE,
    INF,
    SEED,
    ArgumentParser,
    Unavailable,
    add_device_args,
    add_sampling_args,
    autocast,
    number_in,
    resolve_precision,
    run,
)
from support.outputs import append_to, read_csv
from support.perf import PhaseFlops, PhaseTimer, device_name, peak_flops, peak_memory_gb
from support.slides import SlideError, SlideTileReader, open_slide, read_tile_at, sort_folder
from support.tiles import RESIZE_KERNELS, TILE_SIZE
from vae import build_vae, vae_models


def record(name, result, out):
    """The one report format: a printed line and a JSON line in OUT/bench.jsonl (with torch and date)."""
    line = {"bench": name, "date": str(date.today()), "torch": torch.__version__, **result}
    print(f"bench {name}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in line.items() if k != "bench"), flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        append_to(os.path.join(out, "bench.jsonl"), json.dumps(line, default=str))
    return line


def pick_device(name):
    """--device auto: the GPU when there is one."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# -------- train: the full REPA-E step (train.train_step), on synthetic tiles ---------------------------
def add_train_args(p):
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--encoder", choices=list(ENCODERS), default="h0-mini", help="architecture, random weights")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=TILE_SIZE)
    p.add_argument("--batch-size", type=BATCH_SIZE, default=32, help="tiles per step (one process)")
    p.add_argument("--timed-steps", type=number_in(int, 1, 10 ** 5), default=10, help="steps timed")
    p.add_argument("--warmup", type=number_in(int, 0, 10 ** 5), default=3,
                   help="untimed steps first (compiling happens here)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--no-gan", action="store_true")
    add_device_args(p)


def timed_step(nets, opts, images, feats, args, phase):
    """train.train_step with each phase inside `phase(name)` (a timer or a FLOP counter): the same calls in
    the same order, so the same weights come out (tested)."""
    with phase("encoder"):
        batch = train.make_batch(nets, images, feats)
    with phase("vae"):
        loss, z, recon, _ = train.vae_loss(nets, batch, args)
        loss.backward()
    with phase("vae_opt"):
        train.optimizer_step(nets.vae, opts["vae"], args.max_grad_norm)
    if nets.disc is not None:
        with phase("disc"):
            train.disc_update(nets, opts["disc"], batch.x, recon.detach(), args)
    with phase("sit"):
        loss, _ = train.sit_loss(nets, z.detach(), batch, args)
        loss.backward()
    with phase("sit_opt"):
        train.optimizer_step(nets.sit, opts["sit"], args.max_grad_norm)
    with phase("ema"):
        train.update_ema(nets.sit_ema, nets.sit, args.ema_decay)
        train.update_ema(nets.vae_ema, nets.vae, args.ema_decay)


def bench_train(args):
    """Images/s, time per phase, FLOPs per phase, MFU and peak memory of train.train_step."""
    device = pick_device(args.device)
    targs = train.parse_args(["--tiles", "unused", "--model", args.model, "--vae", args.vae, "--encoder", args.encoder,
                              "--image-size", str(args.image_size), "--global-batch-size", str(args.batch_size),
                              "--random-weights", "--precision", args.precision,
                              *(["--compile"] if args.compile else []),
                              *(["--no-lpips"] if args.no_lpips else []), *(["--no-gan"] if args.no_gan else [])])
    nets = train.wrap_models(train.build_models(targs, device, 1), targs, distributed=False)
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
    for _ in range(args.timed_steps):
        timed_step(nets, opts, images, feats, targs, timer)
    per_step = (time.perf_counter() - start) / args.timed_steps
    peak_mem = peak_memory_gb(device)
    # FLOPs of one step, counted on the uncompiled modules (FlopCounterMode does not see inside compiled
    # graphs) and on a few tiles: every counted operation is per image, so the count scales with the batch.
    flops, compiled, n = PhaseFlops(), vars(nets.forward).copy(), min(args.batch_size, 4)
    vars(nets.forward).update(sit=nets.sit, vae=nets.vae, disc=nets.disc, sit_align=nets.sit)
    timed_step(nets, opts, images[:n], feats, targs, flops)
    vars(nets.forward).update(compiled)
    flops.totals = {k: v * args.batch_size / n for k, v in flops.totals.items()}
    bf16 = resolve_precision(args.precision, device) == "bf16" and device.type == "cuda"
    peak = peak_flops(device) if bf16 else None
    mfu = {}
    if peak:
        seconds = {k: v / args.timed_steps for k, v in timer.totals.items()}
        mfu = {f"mfu_{k}": flops.totals[k] / seconds[k] / peak for k in seconds if flops.totals.get(k)}
        mfu["mfu_step"] = sum(flops.totals.values()) / per_step / peak
    return dict(device=device_name(device), model=args.model, vae=args.vae, encoder=args.encoder,
                image_size=args.image_size, batch=args.batch_size, compile=args.compile, bf16=bf16,
                img_per_s=args.batch_size / per_step, sec_per_step=per_step,
                **{f"ms_{k}": 1000 * v / args.timed_steps for k, v in timer.totals.items()},
                **{f"tflop_{k}": v / 1e12 for k, v in flops.totals.items()}, **mfu, peak_mem_gb=peak_mem)


# -------- sample: the paper's sampler on the SiT, then decoding ---------------------------------------
def add_sample_args(p):
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=TILE_SIZE)
    p.add_argument("--batch-size", type=BATCH_SIZE, default=64)
    add_sampling_args(p)
    p.add_argument("--seed", type=SEED, default=0)
    add_device_args(p)
    p.add_argument("--compile", action="store_true")


def bench_sample(args):
    """Network evaluations per image, images/s and the sampling loop's MFU at the given sampler settings."""
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)
    vae = build_vae(args.vae).to(device).eval()
    sit = build_sit(args.model, input_size=args.image_size // vae.factor).to(device).eval()
    pipe, rows = Pipeline(sit, vae, device, precision, compile=args.compile), [0]
    velocity = pipe.velocity

    def counting(x, t, c, drop=None):
        rows[0] += x.shape[0]
        return velocity(x, t, c, drop)
    pipe.velocity = counting
    B, settings = args.batch_size, SamplingSettings.from_args(args)
    ids, cond = list(range(B)), torch.randn(B, sit.cond_dim, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # warm-up: 2 steps visit both batch shapes (t = 1 unguided, then guided), which compiles both graphs
    pipe.generate(cond, ids, dataclasses.replace(settings, num_sampling_steps=2))
    latents = torch.randn(B, sit.in_channels, sit.input_size, sit.input_size, dtype=torch.float64, device=device)
    rows[0] = 0
    sync()
    t0 = time.perf_counter()
    pipe.generate(cond, ids, settings)
    sync()
    t1 = time.perf_counter()
    with torch.no_grad():
        pipe.decode(latents, ids)
    sync()
    decoding_s = time.perf_counter() - t1
    # FLOPs per network evaluation (one row), counted on the eager SiT.
    with torch.no_grad(), autocast(device, precision), FlopCounterMode(display=False) as counter:
        sit(latents.float(), torch.rand(B, device=device), cond)
    row_flops = counter.get_total_flops() / B
    peak = peak_flops(device) if precision == "bf16" else None
    sampling_s = t1 - t0 - decoding_s
    return dict(device=device_name(device), model=args.model, vae=args.vae, image_size=args.image_size,
                precision=precision, compile=args.compile, batch=B, **dataclasses.asdict(settings),
                nfe_per_image=rows[0] / B, img_per_s=B / (t1 - t0), sampling_s=sampling_s, decoding_s=decoding_s,
                gflop_per_eval=row_flops / 1e9, **({"mfu_sampling": rows[0] * row_flops / sampling_s / peak} if peak
                                                   else {}))


# -------- fd: our FD against the scipy.linalg.sqrtm formula of pytorch-fid / clean-fid ----------------
def add_fd_args(p):
    p.add_argument("--num-vectors", type=number_in(int, 2, 10 ** 7), default=100_000, help="feature vectors per set")
    p.add_argument("--dims", type=number_in(int, 1, 10 ** 5), default=1536,
                   help="feature dimension (H-optimus-0, UNI2-h)")
    p.add_argument("--seed", type=SEED, default=0)


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
    n, d = args.num_vectors, args.dims
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


# -------- tiling: tiling.py and support/slides.py (CytoSyn §3.2) ------------------------------------------
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
           "settings": tiling.tiling_settings(tiling_args)}
    _, geo, tissue, _ = tiling.prepare(job)
    corners, resample, c = list(zip(tissue.x, tissue.y)), RESIZE_KERNELS[tiling_args.resize_kernel], tiling_args.context

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
    tiling_args = tiling.parse_args(["--slides", str(folder), "--out", str(out), "--resize-kernel", args.resize_kernel])
    start = time.perf_counter()
    tiling.tile_slides(tiling_args)
    rows = read_csv(out / "manifest.csv")
    speed = len(rows) / (time.perf_counter() - start)
    print(f"{folder}: whole run, 1 worker, png: {len(rows)} tiles, {speed:.0f} tiles/s")
    return rows, {f"{Path(folder).name}.run_tiles_per_s": speed}


def benchmark_training_reads(folder, out, rows, args):
    """Tiles/s one data worker gets from the slides (SlideTileReader) and from the PNGs."""
    rows = [rows[k] for k in np.random.default_rng(0).permutation(len(rows))]

    def from_slides():
        reader = SlideTileReader(folder, args.resize_kernel)
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
    parser.add_argument("--slides", default="tests/data", metavar="SLIDES_DIR",
                        help="folder of slides to time, besides the synthetic 40x pyramid")
    parser.add_argument("--work-dir", default=None,
                        help="scratch folder for the pyramid (~10 MB) and the tiles, kept afterwards; "
                             "unset: a temporary folder, removed")
    parser.add_argument("--resize-kernel", choices=list(RESIZE_KERNELS), default="lanczos")
    parser.add_argument("--pyramid-px", type=number_in(int, 1024, 65536), default=8192,
                        help="side of the synthetic pyramid's level 0, in pixels")
    parser.add_argument("--rounds", type=number_in(int, 1, 100), default=3,
                        help="each method's best of this many rounds is reported")


def bench_tiling(args):
    """Tiles/s of the tiler, of a whole tiling run, and of one data worker reading slides vs PNGs."""
    try:  # the synthetic pyramid's writer, a test fixture: tifffile and imagecodecs (requirements-dev.txt)
        from tests.synthetic_slide import synthetic_tissue, write_pyramid_tiff
    except ImportError as err:
        raise Unavailable(f"bench.py tiling writes a synthetic pyramid with tifffile and imagecodecs ({err}): "
                          f"pip install -r requirements-dev.txt") from None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_tiling_"))
    synthetic = work / "pyramid"
    synthetic.mkdir(parents=True, exist_ok=True)
    side = args.pyramid_px
    print(f"writing a {side} x {side} px pyramid at 0.25 µm/px (40x), levels 1 and 4, JPEG q80")
    write_pyramid_tiff(synthetic / "pyramid.tiff", synthetic_tissue(side), 0.25, (1, 4), jpeg_quality=80)
    tiling_args = tiling.parse_args(["--slides", args.slides, "--out", str(work),
                                     "--resize-kernel", args.resize_kernel])
    result = {}
    for k, folder in enumerate([Path(args.slides), synthetic]):
        for path in sort_folder(folder)[0]:
            try:
                result.update(benchmark_reading(path, tiling_args, args.rounds))
            except SlideError as e:
                print(f"{path.name}: skipped, {e}")
        out = work / f"tiles_{k}"
        rows, run_speed = benchmark_run(folder, out, args)
        result.update(run_speed, **benchmark_training_reads(folder, out, rows, args))
    if not args.work_dir:
        shutil.rmtree(work)
    return result


# -------- weights: what an export of the paper's model weighs and how long loading it takes -------------
def add_weights_args(p):
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=TILE_SIZE)
    p.add_argument("--work-dir", default=None, help="where the export is written (default: a temporary folder, "
                                                    "deleted afterwards)")


def bench_weights(args):
    """Export size (from meta-device shapes) and load_models' time for that export on the CPU (random fp32
    weights written once; page cache warm), with the sha256 check's share of it."""
    from support.weights import load_models, sha256, write_export  # (imported here: the other benchmarks do without)
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



# -------- region: decoding a twin's latent (sample.py --region), in blended tiles or whole ------------
def add_region_args(p):
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--size", metavar="W[,H]", default="2048", help="the twin's size in pixels")
    p.add_argument("--whole", action="store_true", help="decode the latent in one piece instead of in tiles")
    add_device_args(p, precision=False)


def bench_region(args):
    """Decoding a size x size twin's latent as sample.py --region does (support/region.py: decode_tiled, tiles of
    DECODE_TILE latent cells), or whole: seconds and the process's peak memory (GPU: its peak allocation)."""
    from support.region import DECODE_OVERLAP, DECODE_TILE, decode_tiled, parse_pair
    device, (width, height) = pick_device(args.device), parse_pair(args.size, "--size")
    torch.manual_seed(0)
    vae = build_vae(args.vae).to(device).eval()
    pipe = Pipeline(build_sit("SiT-T/2").to(device).eval(), vae, device)  # its BatchNorm denormalises
    z = torch.randn(1, vae.z_channels, height // vae.factor, width // vae.factor, device=device)
    tile = max(z.shape[-2:]) if args.whole else DECODE_TILE
    t0 = time.perf_counter()
    with torch.no_grad():
        decode_tiled(lambda part: pipe.decode(part, [0]), z, vae.factor, tile, DECODE_OVERLAP)
    decoding = "whole" if args.whole else f"tiles of {tile * vae.factor} px, {DECODE_OVERLAP * vae.factor} px overlap"
    return dict(device=device_name(device), vae=args.vae, size=[width, height], decoding=decoding,
                decode_s=time.perf_counter() - t0, peak_mem_gb=peak_memory_gb(device))


# -------- nearest: evaluate.py --memorization's exact search (metrics.nearest_neighbours) ---------------
def add_nearest_args(p):
    p.add_argument("--num-tiles", type=number_in(int, 1, 10 ** 8), default=2000, help="generated feature vectors")
    p.add_argument("--num-train", type=number_in(int, 2, INF), default=100_000, help="training feature vectors")
    p.add_argument("--dims", type=number_in(int, 1, 10 ** 5), default=1536, help="feature dimension (H-optimus-0)")
    add_device_args(p, precision=False)


def bench_nearest(args):
    """Seconds of the exact search of --num-tiles feature vectors among --num-train (50 neighbours each)."""
    from metrics import COPY_NEIGHBOURS, nearest_neighbours
    device, gen = pick_device(args.device), torch.Generator().manual_seed(0)
    train, queries = (torch.randn(n, args.dims, generator=gen) for n in (args.num_train, args.num_tiles))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    nearest_neighbours(queries, train, COPY_NEIGHBOURS, device)
    sync()
    seconds = time.perf_counter() - t0
    return dict(device=device_name(device), num_tiles=args.num_tiles, num_train=args.num_train, dims=args.dims,
                search_s=seconds, pairs_per_s=args.num_tiles * args.num_train / seconds)


COMMANDS = {"train": (add_train_args, bench_train), "sample": (add_sample_args, bench_sample),
            "fd": (add_fd_args, bench_fd), "tiling": (add_tiling_args, bench_tiling),
            "weights": (add_weights_args, bench_weights), "region": (add_region_args, bench_region),
            "nearest": (add_nearest_args, bench_nearest)}


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench", help="folder of bench.jsonl, which every record is appended to")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add_args, fn) in COMMANDS.items():
        add_args(sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return p


def measure(argv=None):
    """One benchmark -> its record (printed, and appended to OUT/bench.jsonl)."""
    args = build_parser().parse_args(argv)
    return record(args.command, COMMANDS[args.command][1](args), args.out)


def main(argv=None):
    measure(argv)
    return 0


if __name__ == "__main__":
    run(main)

