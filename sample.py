"""Generate H&E tiles with a trained CytoSyn model (CytoSyn §3.1, §4.1; Figures 2 and 3).

    python sample.py --ckpt CKPT --cond tile.png --n 5               # 5 variations of a tile + DIR_grid.png
    python sample.py --ckpt CKPT --cond tiles/ other.png             # several tiles, or folders of tiles
    python sample.py --ckpt CKPT --features feats.npy --n 1          # precomputed (N, 768) CLS features
    python sample.py --ckpt CKPT --interpolate a.png b.png           # Figure 3: factors 0.2 ... 0.8
    python sample.py --ckpt CKPT --num-samples 64                    # unconditional (null embedding)
    python sample.py --ckpt EXPORT_DIR ...                           # an export (checkpoints.py export)
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --features feats.npy --n 1 --out DIR   # 100k tiles

Conditioning: the H0-mini CLS token of a 224 x 224 tile. Tiles must already be at 0.5 µm/px (20x), the
resolution CytoSyn was trained at; a larger tile is centre-cropped to 224 px, never resized, unless
`--resize MPP` says the tiles are at another resolution (then they are rescaled to 0.5 µm/px first).
Sampling: 250 Euler-Maruyama steps, guidance 2.5 on t in [0, 0.75] (sampler.py); decoding with the EMA
SiT's BatchNorm statistics and the EMA VAE (--sit-weights / --vae-weights pick raw ones). Speed:
`python bench.py sample`.

Every image has a stable name and its own noise seed (from --seed and the image's index), so a run
split over any number of processes, or killed and started again, writes the same files: existing files
are skipped. OUT/settings.json records the run, and a rerun with other settings is refused rather than
mixed in. Images do not depend on --batch-size, up to floating-point differences of batched kernels.

From Python, with the released pipeline's keywords (the same jobs, seeds and functions as the CLI):
    pipe = load_pipeline("EXPORT_DIR")
    images = pipe(h0_mini_embeds=feats, num_inference_steps=250, guidance_scale=2.5, seed=0)["images"]
No non-finite image is ever written: every batch is checked before any of it is saved.

Left out: other samplers than those of sampler.py, PixCell-style multi-tile conditioning, metrics
(metrics.py), and loading weights from the Hugging Face hub.
"""
import argparse
import json
import os
from collections import namedtuple
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from support.checkpoints import load_models
from support.cli import check_output_folder, number_in, processes
from support.data import TileError, list_images, open_tile
from features import encoder_features, load_encoder
from sampler import euler_maruyama_sampler, euler_sampler, standard_normal

TILE_MPP = 0.5                                    # µm/px of CytoSyn's training tiles (20x)
INTERPOLATION_FACTORS = (0.2, 0.4, 0.6, 0.8)      # paper Fig. 3: f = (1 - a) f_left + a f_right
GRID_ROWS, GRID_COLS = 8, 8                       # the grid shows at most this many rows / samples per row
# Numeric settings, checked at the boundary (CLI and Python API alike): type, allowed range.
SETTINGS = {"n": (int, 1, 10_000), "num_samples": (int, 1, 10**9), "steps": (int, 1, 10_000),
            "cfg_scale": (float, 0.0, 100.0), "guidance_low": (float, 0.0, 1.0), "guidance_high": (float, 0.0, 1.0),
            "seed": (int, 0, 2**63 - 1), "batch_size": (int, 1, 65_536)}
API_NAMES = {"n": "num_images_per_prompt", "steps": "num_inference_steps", "cfg_scale": "guidance_scale"}

# One image to generate: its file name, its conditioning as a mix of sources ((index, weight), ...;
# empty = unconditional), and the id its noise seed comes from.
Job = namedtuple("Job", "name mix noise_id")


def fail(message):
    """A user error: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"sample.py: error: {' '.join(str(message).split())}")


#################################################################################
#                                 Conditioning                                  #
#################################################################################

def list_tiles(paths):
    """--cond arguments (files and folders) -> image paths; folders are read in sorted order, not recursively."""
    tiles = []
    for p in paths:
        if os.path.isdir(p):
            found = list_images(p, recursive=False)
            if not found:
                fail(f"--cond {p}: the folder holds no tiles (PNG, JPEG or TIFF)")
            tiles += found
        elif os.path.isfile(p):
            tiles.append(p)
        else:
            fail(f"--cond {p}: no such file or folder")
    stems = [os.path.splitext(os.path.basename(t))[0] for t in tiles]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        fail(f"two conditioning tiles are both named {dup!r}: outputs are named after the tiles; rename one")
    return tiles


def check_tile_size(im, path, size, mpp):
    scale = mpp / TILE_MPP
    w, h = round(im.size[0] * scale), round(im.size[1] * scale)
    if min(w, h) < size:
        at = "" if mpp == TILE_MPP else f" once rescaled from {mpp} to {TILE_MPP} µm/px"
        fail(f"{path} is {im.size[0]}x{im.size[1]} px{at}; CytoSyn needs at least {size}x{size} px at "
             f"{TILE_MPP} µm/px (112 µm): tile the slide larger, or give the tiles' resolution with --resize MPP")
    return w, h


def load_tile(path, size, mpp):
    """A conditioning tile -> uint8 (3, size, size): rescaled to TILE_MPP only when mpp says so, then
    centre-cropped (a 256 px tile loses 16 px on each side, as the paper's 224 px crops of 256 px tiles)."""
    try:
        im = open_tile(path)
    except TileError as err:
        fail(err)
    w, h = check_tile_size(im, path, size, mpp)
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BICUBIC)  # PIL's bicubic is antialiased when shrinking
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)))  # (size, size, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, size, size)


class TileSource:
    """Conditioning tiles, encoded with H0-mini on demand (a batch at a time)."""

    def __init__(self, paths, encoder, size, mpp):
        for p in paths:  # fail early on a bad tile, before hours of sampling (the header is enough)
            try:
                im = open_tile(p, decode=False)
            except TileError as err:
                fail(err)
            check_tile_size(im, p, size, mpp)
        self.paths, self.encoder, self.size, self.mpp = paths, encoder, size, mpp
        self.names = [os.path.splitext(os.path.basename(p))[0] for p in paths]

    def __len__(self):
        return len(self.paths)

    def tile(self, i):
        return load_tile(self.paths[i], self.size, self.mpp)

    def features(self, indices, device):
        tiles = torch.stack([self.tile(i) for i in indices]).to(device)  # (B, 3, 224, 224) uint8
        return encoder_features(self.encoder, tiles)[0]                   # CLS (B, D)


class ArraySource:
    """Precomputed CLS features (N, D). An (N, 2 D) array is LazySlide's / TRIDENT's CLS followed by the
    mean patch token: its first D values are the CLS."""

    def __init__(self, arr, dim, what):
        arr = arr[None] if arr.ndim == 1 else arr
        if arr.ndim == 2 and arr.shape[1] == 2 * dim:
            print(f"{what} has shape {arr.shape}: using its first {dim} values, the CLS token (the rest is taken to "
                  f"be the mean patch token)", flush=True)
            arr = arr[:, :dim]
        if arr.ndim != 2 or arr.shape[1] != dim or not len(arr):
            raise ValueError(f"{what} has shape {arr.shape}; this model needs (N, {dim}) H0-mini CLS features, N >= 1")
        self.arr = arr
        self.names = [f"{i:06d}" for i in range(len(arr))]

    def __len__(self):
        return len(self.arr)

    def tile(self, i):
        return None

    def features(self, indices, device):
        return torch.from_numpy(np.asarray(self.arr[indices], dtype=np.float32)).to(device)


def batch_conditioning(source, jobs, device):
    """(B, D) features of a batch: each job's weighted mix of source features; None if unconditional."""
    if not jobs[0].mix:
        return None
    needed = sorted({i for job in jobs for i, _ in job.mix})
    feats = dict(zip(needed, source.features(needed, device)))
    return torch.stack([sum(w * feats[i] for i, w in job.mix) for job in jobs])


#################################################################################
#                               Jobs and grids                                  #
#################################################################################

def make_jobs(args, source):
    """All images of the run, in a fixed order, and the grid layout: rows of (tile or file name) cells."""
    n = args.n
    if args.interpolate:
        a, b = source.names
        jobs, rows = [], []
        for k in range(n):  # NOTE: one noise per row, shared by its factors, so the row changes only in f
            row = [Job(f"{a}_{b}_{k:02d}_a{alpha:.1f}", ((0, 1 - alpha), (1, alpha)), k)
                   for alpha in INTERPOLATION_FACTORS]
            jobs += row
            rows.append([("tile", 0)] + [("file", j.name) for j in row] + [("tile", 1)])
        return jobs, rows[:GRID_ROWS]
    if source is None:
        jobs = [Job(f"{j:06d}", (), j) for j in range(args.num_samples or n)]
        names = [("file", j.name) for j in jobs[:GRID_ROWS * GRID_COLS]]
        return jobs, [names[r:r + GRID_COLS] for r in range(0, len(names), GRID_COLS)]
    jobs = [Job(f"{name}_{k:02d}", ((i, 1.0),), i * n + k) for i, name in enumerate(source.names) for k in range(n)]
    rows = []
    for i in range(min(len(source), GRID_ROWS)):  # the reference tile on the left, as in Figure 2
        reference = [("tile", i)] if isinstance(source, TileSource) else []
        rows.append(reference + [("file", f"{source.names[i]}_{k:02d}") for k in range(min(n, GRID_COLS))])
    return jobs, rows


def noise_seed(seed, noise_id):
    """Independent streams for every (seed, image) pair (no overlap between seed s, image i+1 and s+1, i)."""
    return int(np.random.SeedSequence([seed, noise_id]).generate_state(1, np.uint64)[0] >> 1)


def save_png(array, path):
    """Lossless PNG, written to a temporary name then renamed: a killed run never leaves half a file."""
    tmp = path + ".tmp"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_grid(rows, source, out, path):
    """Figure 2 / 3 style: each row a reference tile (when there is one) and its samples, side by side."""
    cells = []
    for row in rows:
        images = []
        for kind, ref in row:
            if kind == "tile":
                images.append(source.tile(ref).permute(1, 2, 0).numpy())
            else:
                with Image.open(os.path.join(out, ref + ".png")) as im:
                    images.append(np.asarray(im.convert("RGB")))
        cells.append(images)
    if not cells:
        return
    size, width = cells[0][0].shape[0], max(len(r) for r in cells)
    grid = np.full((len(cells) * size, width * size, 3), 255, np.uint8)
    for r, images in enumerate(cells):
        for c, im in enumerate(images):
            grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = im
    save_png(grid, path)


#################################################################################
#                                  Sampling                                     #
#################################################################################

def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def velocity_field(sit, compile=False):
    """The SiT as the sampler's velocity v(x, t, c, drop). With `compile`, torch.compile fuses the
    elementwise work between the matrix products (adaLN modulation, gates, GELU, LayerNorm: half of an
    eager forward's time); dynamic=False compiles one graph per batch shape (B unguided, 2B guided)."""
    def velocity(x, t, c, drop=None):
        return sit(x, t, c, drop)[0]

    return torch.compile(velocity, dynamic=False) if compile else velocity


@torch.no_grad()
def sample_latents(velocity, noise, cond, args, generator, device):
    """The paper's sampler on the SiT's velocity; float64 state, the network under bf16 autocast if asked."""
    common = dict(cond=cond, num_steps=args.steps, cfg_scale=args.cfg_scale,
                  guidance_low=args.guidance_low, guidance_high=args.guidance_high)
    with autocast(device, args.precision):
        if args.mode == "sde":
            return euler_maruyama_sampler(velocity, noise, generator=generator, **common)
        return euler_sampler(velocity, noise, heun=args.mode == "heun", **common)


def check_finite(x, jobs, what):
    """Stop before a non-finite image is written: a NaN or inf would be saved as a black or garbage tile."""
    bad = [job.name for job, ok in zip(jobs, torch.isfinite(x).flatten(1).all(1).tolist()) if not ok]
    if bad:
        raise FloatingPointError(
            f"{len(bad)} image(s) have non-finite {what} ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
            f"nothing of this batch was written. Likely causes: non-finite weights or conditioning features, or a "
            f"guidance scale that blows up (try a smaller one)")


@torch.no_grad()
def decode(models, x, jobs=None):
    """Normalised latents -> uint8 images (B, H, W, 3). NOTE: decoded in float32 even with --precision
    bf16 (once per image, against hundreds of SiT passes), so bf16 cannot band the 8-bit output."""
    images = models.vae.decode(models.sit.denormalize(x.float()))  # (B, 3, H, W), about [-1, 1]
    if jobs is not None:
        check_finite(images, jobs, "decoded pixels")
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(models, source, jobs, args, device):
    """One batch of jobs -> uint8 images; each image's noise comes from its own seeded generator."""
    gens = [torch.Generator(device).manual_seed(noise_seed(args.seed, j.noise_id)) for j in jobs]
    shape = (len(jobs), models.sit.in_channels, models.sit.input_size, models.sit.input_size)
    noise = standard_normal(shape, gens, device)  # the first draw of every image's stream
    cond = batch_conditioning(source, jobs, device)
    latents = sample_latents(models.velocity, noise, cond, args, gens, device)
    check_finite(latents, jobs, "latents")
    return decode(models, latents, jobs)


def build_source(args, models, device):
    if args.features:
        try:
            arr = np.load(args.features, mmap_mode="r")
        except (ValueError, OSError) as err:  # a missing file, or not a .npy array
            fail(f"--features {args.features}: cannot read it as a .npy array ({type(err).__name__}: {err})")
        try:
            return ArraySource(arr, models.sit.cond_dim, f"--features {args.features}")
        except ValueError as err:
            fail(err)
    paths = list_tiles(args.cond or args.interpolate)
    # NOTE: the "tiny" encoder is random, drawn from the run's seed: the very encoder a smoke run trained with.
    try:
        encoder = load_encoder(models.encoder, seed=models.seed).to(device)
    except RuntimeError as err:
        fail(f"{err} Or condition on precomputed CLS features with --features FILE.npy.")
    if encoder.embed_dim != models.sit.cond_dim:
        fail(f"the checkpoint's SiT takes {models.sit.cond_dim}-d features but encoder {models.encoder!r} gives "
             f"{encoder.embed_dim}-d ones")
    return TileSource(paths, encoder, models.vae.factor * models.sit.input_size, args.resize or TILE_MPP)


def check_settings(args, models, rank):
    """Resuming skips the images that exist, so they must come from the same run: OUT/settings.json
    records everything that decides an image, and a run with other settings is refused, not mixed in."""
    files = lambda paths: None if paths is None else [os.path.abspath(p) for p in paths]  # noqa: E731
    settings = dict(ckpt=os.path.abspath(args.ckpt), ckpt_step=models.step, sit_weights=args.sit_weights,
                    vae_weights=args.vae_weights, mode=args.mode,
                    steps=args.steps, cfg_scale=args.cfg_scale, guidance=[args.guidance_low, args.guidance_high],
                    seed=args.seed, precision=args.precision, resize=args.resize, cond=files(args.cond),
                    features=files(args.features and [args.features]), interpolate=files(args.interpolate),
                    n=args.n, num_samples=args.num_samples)
    path = os.path.join(args.out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = [f"{k}: {before.get(k)} -> {v}" for k, v in json.loads(json.dumps(settings)).items()
                   if before.get(k) != v]
        if changed:
            fail(f"{args.out} holds images of another run ({'; '.join(changed)}); resuming would mix them: "
                 f"choose another --out, or delete {args.out}")
    elif rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def run(args, rank, world, device):
    try:  # generated tiles must never land among real ones (nor be read back as conditioning by a rerun)
        check_output_folder(args.out, {"--cond": args.cond, "--features": args.features and [args.features],
                                       "--interpolate": args.interpolate})
        models = load_models(args.ckpt, device, args.sit_weights == "ema", args.vae_weights == "ema")
    except (FileNotFoundError, ValueError) as err:
        fail(err)
    models.velocity = velocity_field(models.sit, args.compile)
    source = None if not (args.cond or args.features or args.interpolate) else build_source(args, models, device)
    jobs, grid_rows = make_jobs(args, source)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        fail(f"cannot create the output folder --out {args.out} ({type(err).__name__}: {err})")
    check_settings(args, models, rank)
    path = lambda job: os.path.join(args.out, job.name + ".png")  # noqa: E731
    todo = [j for j in jobs[rank::world] if not os.path.exists(path(j))]  # resume: skip finished files
    if rank == 0:
        done = sum(os.path.exists(path(j)) for j in jobs)
        guidance = (f"cfg {args.cfg_scale} on [{args.guidance_low}, {args.guidance_high}]" if source is not None
                    else "unconditional")
        print(f"{len(jobs)} images in {args.out}, {done} already there; {args.mode} {args.steps} steps, "
              f"{guidance}, {args.precision}, {world} process(es)", flush=True)
    with tqdm(total=len(todo), unit="img", disable=rank != 0) as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            try:
                images = generate(models, source, batch, args, device)
            except FloatingPointError as err:
                fail(f"{err}; --cfg-scale is {args.cfg_scale}, --ckpt {args.ckpt}")
            for job, image in zip(batch, images):
                save_png(image, path(job))
            bar.update(len(batch))
    if world > 1:
        dist.barrier()
    if rank == 0:
        # next to the folder, not in it: the folder holds the tiles (and settings.json), ready for metrics.py --fake
        grid = os.path.normpath(args.out) + "_grid.png"
        save_grid(grid_rows, source, args.out, grid)
        print(f"done: {args.out}/ and {grid}", flush=True)


#################################################################################
#                     Python API (the released pipeline's keywords)             #
#################################################################################

class Pipeline(namedtuple("Pipeline", "models device precision")):
    """CytoSyn called as the released pipeline is (LazySlide): pipe(h0_mini_embeds=(N, 768) or None,
    ...)["images"] -> PIL images, N x num_images_per_prompt of them, embed by embed. The jobs, seeds and
    functions are sample.py's, so `sample.py --features` gives the same images for the same seed."""

    def __call__(self, h0_mini_embeds=None, num_images_per_prompt=1, num_inference_steps=250, guidance_scale=2.5,
                 guidance_low=0.0, guidance_high=0.75, seed=0, batch_size=32, mode="sde"):
        args = SimpleNamespace(n=num_images_per_prompt, num_samples=None, interpolate=None, mode=mode,
                               steps=num_inference_steps, cfg_scale=guidance_scale, guidance_low=guidance_low,
                               guidance_high=guidance_high, seed=seed, batch_size=batch_size, precision=self.precision)
        for name, value in vars(args).items():  # the CLI's ranges, told with the API's keywords
            try:
                value is None or name not in SETTINGS or number_in(*SETTINGS[name])(str(value))
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"{API_NAMES.get(name, name)}={value!r}: {err}") from None
        if guidance_low > guidance_high or mode not in ("sde", "ode", "heun"):
            raise ValueError("need guidance_low <= guidance_high and mode in sde, ode, heun")
        source = None  # h0_mini_embeds=None: unconditional (the null embedding; guidance off)
        if h0_mini_embeds is not None:
            embeds = (h0_mini_embeds.detach().float().cpu().numpy() if torch.is_tensor(h0_mini_embeds)
                      else np.asarray(h0_mini_embeds, dtype=np.float32))
            source = ArraySource(embeds, self.models.sit.cond_dim, "h0_mini_embeds")
        jobs, _ = make_jobs(args, source)
        images = []
        for start in range(0, len(jobs), batch_size):
            batch = generate(self.models, source, jobs[start:start + batch_size], args, self.device)
            images += [Image.fromarray(image) for image in batch]
        return {"images": images}


def load_pipeline(path, device=None, sit_weights="ema", vae_weights="ema"):
    """Any weights sample.py --ckpt takes (an export folder, a train.py or REPA-E checkpoint) -> a Pipeline;
    on the GPU when there is one (bf16 network passes), else the CPU (float32)."""
    if sit_weights not in ("ema", "raw") or vae_weights not in ("ema", "raw"):
        raise ValueError(f"sit_weights / vae_weights are 'ema' or 'raw', not {sit_weights!r} / {vae_weights!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = load_models(path, device, sit_weights == "ema", vae_weights == "ema")
    models.velocity = velocity_field(models.sit)
    return Pipeline(models, device, "bf16" if device.type == "cuda" else "fp32")


#################################################################################
#                                  main                                         #
#################################################################################

def main(args):
    with processes(torch.cuda.is_available() and args.device != "cpu") as (rank, world, device):
        if args.precision == "auto":
            args.precision = "bf16" if device.type == "cuda" else "fp32"
        return run(args, rank, world, device)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_samples is not None and (args.cond or args.features or args.interpolate):
        p.error("--num-samples is for unconditional runs; with --cond/--features each conditioning gets --n images")
    if args.guidance_low > args.guidance_high:
        p.error("need --guidance-low <= --guidance-high")
    if args.interpolate and not all(os.path.isfile(f) for f in args.interpolate):
        p.error("--interpolate takes two tile files (not folders, and they must exist)")
    return args


def build_parser():
    num = lambda name: number_in(*SETTINGS[name])  # noqa: E731  (kind, range: shared with the Python API)
    p = argparse.ArgumentParser(description="Generate H&E tiles with CytoSyn. Conditioning tiles must be at "
                                            f"{TILE_MPP} µm/px (20x); they are centre-cropped to 224 px, not resized "
                                            "(see --resize).")
    p.add_argument("--ckpt", required=True, help="train.py checkpoint, export folder (checkpoints.py export) or "
                                                 "REPA-E checkpoint; carries its model config")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--cond", nargs="+", metavar="TILE", help="conditioning tiles (files or folders)")
    what.add_argument("--features", metavar="FILE.npy", help="precomputed (N, 768) H0-mini CLS features")
    what.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                      help="Figure 3: condition on (1 - a) f_A + a f_B, a = 0.2, 0.4, 0.6, 0.8")
    p.add_argument("--resize", type=number_in(float, 0, 100, open_low=True), metavar="MPP", default=None,
                   help=f"the tiles' resolution in µm/px if not {TILE_MPP}: rescale them to {TILE_MPP} "
                        f"before cropping")
    p.add_argument("--n", type=num("n"), default=5, help="samples per conditioning (rows of the interpolation)")
    p.add_argument("--num-samples", type=num("num_samples"), help="unconditional: number of images (default --n)")
    p.add_argument("--out", default="samples", help="output folder; a rerun with the same settings keeps its images (resume)")
    p.add_argument("--mode", choices=["sde", "ode", "heun"], default="sde",
                   help="sde: Euler-Maruyama (paper); ode: Euler; heun: ODE with Heun's correction")
    p.add_argument("--steps", type=num("steps"), default=250, help="sampling steps (paper: 250)")
    p.add_argument("--cfg-scale", type=num("cfg_scale"), default=2.5, help="guidance scale (paper: 2.5)")
    p.add_argument("--guidance-low", type=num("guidance_low"), default=0.0, help="guide for t >= this (t = 1: noise)")
    p.add_argument("--guidance-high", type=num("guidance_high"), default=0.75, help="guide for t <= this (paper: 0.75)")
    p.add_argument("--seed", type=num("seed"), default=0, help="image i's noise comes from (seed, i)")
    p.add_argument("--batch-size", type=num("batch_size"), default=32, help="images per forward pass, per process")
    p.add_argument("--sit-weights", choices=["ema", "raw"], default="ema",
                   help="the SiT's EMA or raw weights (its BatchNorm statistics denormalise the latents)")
    p.add_argument("--vae-weights", choices=["ema", "raw"], default="ema",
                   help="the VAE's EMA or raw weights (Table 2 reports both with the EMA SiT)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="network precision (auto: bf16 on GPU, fp32 on CPU); the sampler state is float64")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: the GPU when there is one")
    p.add_argument("--compile", action="store_true", help="torch.compile the SiT (GPU; compiling comes first: "
                                                          "worth it for long runs, see the README's Performance)")
    return p


if __name__ == "__main__":
    main(parse_args())
