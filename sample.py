"""Generate H&E tiles with a trained CytoSyn model (CytoSyn §3.1, §4.1; Figures 2 and 3).

    python sample.py --ckpt CKPT --cond tile.png --n 5               # 5 variations of a tile + OUT_grid.png
    python sample.py --ckpt CKPT --cond tiles/ other.png             # several tiles, or folders of tiles
    python sample.py --ckpt CKPT --features cls.npy --n 1            # precomputed (N, 768) CLS features
    python sample.py --ckpt CKPT --interpolate a.png b.png           # Figure 3: factors 0.2 ... 0.8
    python sample.py --ckpt CKPT --num-samples 64                    # unconditional (null embedding)
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --features cls.npy --n 1 --out DIR   # 100k tiles

Conditioning: the H0-mini CLS token of a 224 x 224 tile. Tiles must already be at 0.5 µm/px (20x), the
resolution CytoSyn was trained at; a larger tile is centre-cropped to 224 px, never resized, unless
`--cond-mpp MPP` gives their resolution (then they are rescaled to 0.5 µm/px first). Sampling (sampler.py):
250 Euler-Maruyama steps, guidance 2.5 on t in [0, 0.75]; decoding with the EMA SiT's BatchNorm
statistics and the EMA VAE (--sit-weights / --vae-weights pick raw ones).

Every image has a stable name and its own noise seed (from --seed and the image's index), so a run split
over any number of processes, or killed and started again, writes the same files: existing files are
skipped. OUT/settings.json records the run, and a rerun with other settings is refused rather than mixed
in. No non-finite image is ever written. From Python, with the released pipeline's keywords:

    pipe = load_pipeline("EXPORT_DIR")
    images = pipe(h0_mini_embeds=feats, num_inference_steps=250, guidance_scale=2.5, seed=0)["images"]

Left out: PixCell-style multi-tile conditioning, metrics (metrics.py), loading weights from the hub.
"""
import argparse
import os
from collections import namedtuple
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from features import encoder_features, load_encoder, read_cls_names
from sampler import euler_maruyama_sampler, euler_sampler, standard_normal
from support.cli import (BATCH_SIZE, SAMPLERS, SAMPLES_PER_COND, SAMPLING_RANGES, SEED, InputError, NonFinite, add_device_args, add_sampling_args,
                         autocast, check_guidance, check_number, number_in, processes,
                         resolve_precision, run)
from support.data import list_tile_args, open_tile, read_tile_at_mpp, size_at_mpp
from support.logs import save_rows
from support.outputs import check_output_folder, claim_output_folder, record_settings, save_png
from tiling import TILE_MPP
from support.weights import load_models

INTERPOLATION_FACTORS = (0.2, 0.4, 0.6, 0.8)      # paper Fig. 3: f = (1 - a) f_left + a f_right
GRID_ROWS, GRID_COLS = 8, 8                       # the grid shows at most this many rows / samples per row
# The released pipeline's keyword for a setting where it differs (as LazySlide calls it).
API_NAMES = {"num_sampling_steps": "num_inference_steps", "cfg_scale": "guidance_scale"}

# One image to generate: its file name, its conditioning as a mix of sources ((index, weight), ...;
# empty = unconditional), and the id its noise seed comes from.
Job = namedtuple("Job", "name mix noise_id")


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides an image besides the weights and the conditioning (CytoSyn §4.1 defaults)."""
    sampler: str = "sde"
    num_sampling_steps: int = 250
    cfg_scale: float = 2.5
    guidance_low: float = 0.0
    guidance_high: float = 0.75
    seed: int = 0

    def __post_init__(self):  # the CLI's ranges, told with the Python API's keywords
        for name, (kind, low, high) in SAMPLING_RANGES.items():
            check_number(API_NAMES.get(name, name), getattr(self, name), kind, low, high)
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler={self.sampler!r}: choose from {', '.join(SAMPLERS)}")
        check_guidance(self)

    @classmethod
    def from_args(cls, args):
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})


def noise_seed(seed, noise_id):
    """Independent streams for every (seed, image) pair (no overlap between seed s, image i+1 and s+1, i)."""
    return int(np.random.SeedSequence([seed, noise_id]).generate_state(1, np.uint64)[0] >> 1)


class Pipeline:
    """A SiT and a VAE ready to sample, on one device: generate() for sample.py, evaluate.py and train.py's
    grids; called with the released CytoSyn pipeline's keywords from Python (LazySlide)."""

    def __init__(self, sit, vae, device, precision="fp32", encoder="h0-mini", encoder_seed=0, compile=False, step=None):
        self.sit, self.vae, self.device, self.precision = sit, vae, torch.device(device), precision
        self.encoder_name, self.encoder_seed, self.encoder, self.step = encoder, encoder_seed, None, step

        def velocity(x, t, c, drop=None):  # the sampler's v(x, t, c, drop)
            return sit(x, t, c, drop)[0]
        # With compile, torch.compile fuses the elementwise work between the matrix products (half of an
        # eager forward's time); dynamic=False: one graph per batch shape (B unguided, 2B guided).
        self.velocity = torch.compile(velocity, dynamic=False) if compile else velocity

    @property
    def tile_size(self):
        return self.vae.factor * self.sit.input_size

    @torch.no_grad()
    def generate(self, cond, noise_ids, settings):
        """(B, D) CLS features (None: unconditional) -> uint8 images (B, H, W, 3); image i's noise (its start
        and its Brownian increments) comes from its own generator, seeded by (settings.seed, noise_ids[i])."""
        gens = [torch.Generator(self.device).manual_seed(noise_seed(settings.seed, i)) for i in noise_ids]
        shape = (len(noise_ids), self.sit.in_channels, self.sit.input_size, self.sit.input_size)
        noise = standard_normal(shape, gens, self.device)  # the first draw of every image's stream
        guidance = dict(cond=cond, num_steps=settings.num_sampling_steps, cfg_scale=settings.cfg_scale,
                        guidance_low=settings.guidance_low, guidance_high=settings.guidance_high)
        with autocast(self.device, self.precision):  # the network in bf16 if asked; the sampler state float64
            if settings.sampler == "sde":
                x = euler_maruyama_sampler(self.velocity, noise, generator=gens, **guidance)
            else:
                x = euler_sampler(self.velocity, noise, heun=settings.sampler == "heun", **guidance)
        return self.decode(x, noise_ids)

    def decode(self, x, noise_ids):
        """Normalised latents -> uint8 images (B, H, W, 3), refusing any non-finite one before it is written."""
        # NOTE: decoded in float32 even after bf16 sampling (once per image, against hundreds of SiT passes),
        # so bf16 cannot band the 8-bit output.
        check_finite(x, noise_ids, "latents")
        images = self.vae.decode(self.sit.denormalize(x.float()))  # (B, 3, H, W), about [-1, 1]
        check_finite(images, noise_ids, "decoded pixels")
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def encode_tiles(self, tiles):
        """uint8 tiles (B, 3, S, S) -> their CLS features (B, D), from the checkpoint's encoder."""
        if self.encoder is None:
            # the "tiny" encoder is random, drawn from the run's seed: the very encoder a smoke run trained with
            self.encoder = load_encoder(self.encoder_name, seed=self.encoder_seed).to(self.device)
            if self.encoder.embed_dim != self.sit.cond_dim:
                raise InputError(f"the checkpoint's SiT takes {self.sit.cond_dim}-d features but encoder "
                                 f"{self.encoder_name!r} gives {self.encoder.embed_dim}-d ones")
        return encoder_features(self.encoder, tiles.to(self.device))[0]

    def __call__(self, h0_mini_embeds=None, num_images_per_prompt=1, num_inference_steps=250, guidance_scale=2.5,
                 guidance_low=0.0, guidance_high=0.75, seed=0, batch_size=32, sampler="sde"):
        """The released pipeline's call: h0_mini_embeds (N, 768) or None -> {"images": N x num_images_per_prompt
        PIL images}, embed by embed; the jobs, seeds and functions of `sample.py --features`."""
        settings = SamplingSettings(sampler, num_inference_steps, guidance_scale, guidance_low, guidance_high, seed)
        n = check_number("num_images_per_prompt", num_images_per_prompt, int, 1, 10_000)
        source = None  # unconditional: the null embedding; guidance off
        if h0_mini_embeds is not None:
            embeds = (h0_mini_embeds.detach().float().cpu().numpy() if torch.is_tensor(h0_mini_embeds)
                      else np.asarray(h0_mini_embeds, dtype=np.float32))
            source = ArraySource(embeds, self.sit.cond_dim, "h0_mini_embeds")
        jobs, _ = plan_jobs(source, n)
        images = []
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            cond = batch_conditioning(source, batch, self)
            images += [Image.fromarray(im) for im in self.generate(cond, [j.noise_id for j in batch], settings)]
        return {"images": images}


def load_pipeline(path, device=None, sit_weights="ema", vae_weights="ema", precision="auto", compile=False):
    """Any weights sample.py --ckpt takes (an export folder, a train.py or REPA-E checkpoint) -> a Pipeline;
    on the GPU when there is one (bf16 network passes), else the CPU (float32)."""
    if sit_weights not in ("ema", "raw") or vae_weights not in ("ema", "raw"):
        raise InputError(f"sit_weights / vae_weights are 'ema' or 'raw', not {sit_weights!r} / {vae_weights!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = load_models(path, device, sit_weights == "ema", vae_weights == "ema")
    return Pipeline(models.sit, models.vae, device, resolve_precision(precision, device), models.encoder,
                    models.seed, compile, models.step)


def check_finite(x, noise_ids, what):
    """Stop before a non-finite image is written: a NaN or an inf would be saved as a black or garbage tile."""
    bad = [i for i, ok in zip(noise_ids, torch.isfinite(x).flatten(1).all(1).tolist()) if not ok]
    if bad:
        raise NonFinite(f"{len(bad)} image(s) have non-finite {what} (noise ids {bad[:5]}{' ...' if len(bad) > 5 else ''}); "
                        f"nothing of this batch was written. Likely causes: non-finite weights or conditioning "
                        f"features, or a guidance scale that blows up (try a smaller one)")


#################################################################################
#                                 Conditioning                                  #
#################################################################################

class TileSource:
    """Conditioning tiles, read and encoded a batch at a time; every header is checked up front."""

    def __init__(self, paths, size, mpp):
        for p in paths:  # fail early on a bad tile, before hours of sampling (the header is enough)
            size_at_mpp(open_tile(p, decode=False), p, size, mpp, TILE_MPP)
        self.paths, self.size, self.mpp = paths, size, mpp
        self.names = [os.path.splitext(os.path.basename(p))[0] for p in paths]

    def tile(self, i):
        return read_tile_at_mpp(self.paths[i], self.size, self.mpp, TILE_MPP)

    def features(self, indices, pipe):
        return pipe.encode_tiles(torch.stack([self.tile(i) for i in indices]))  # CLS (B, D)


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
            raise InputError(f"{what} has shape {arr.shape}; this model needs (N, {dim}) H0-mini CLS features, N >= 1")
        self.arr, self.names = arr, [f"{i:06d}" for i in range(len(arr))]

    def tile(self, i):
        return None

    def features(self, indices, pipe):
        return torch.from_numpy(np.asarray(self.arr[indices], dtype=np.float32)).to(pipe.device)


def batch_conditioning(source, jobs, pipe):
    """(B, D) features of a batch: each job's weighted mix of source features; None if unconditional."""
    if source is None:
        return None
    needed = sorted({i for job in jobs for i, _ in job.mix})
    feats = dict(zip(needed, source.features(needed, pipe)))
    return torch.stack([sum(w * feats[i] for i, w in job.mix) for job in jobs])


def conditioning_source(args, pipe):
    """What --cond, --features or --interpolate name -> a TileSource or an ArraySource; None: unconditional."""
    if args.features:
        try:
            arr = np.load(args.features, mmap_mode="r")
        except (ValueError, OSError) as err:  # a missing file, or not a .npy array
            raise InputError(f"--features {args.features}: cannot read it as a .npy array ({type(err).__name__}: "
                             f"{err})") from None
        source = ArraySource(arr, pipe.sit.cond_dim, f"--features {args.features}")
        read_cls_names(args.features, len(source.arr))  # features.py's names beside its cls.npy must fit it
        return source
    if args.cond or args.interpolate:
        paths = list_tile_args(args.cond or args.interpolate, "--cond" if args.cond else "--interpolate")
        return TileSource(paths, pipe.tile_size, args.cond_mpp or TILE_MPP)
    return None


#################################################################################
#                               Jobs and grids                                  #
#################################################################################

def plan_jobs(source, n, num_samples=None, interpolate=False):
    """All images of the run, in a fixed order, and the grid layout: rows of ("tile", index) / ("file", name)."""
    if interpolate:
        a, b = source.names
        jobs, rows = [], []
        for k in range(n):  # one noise per row, shared by its factors, so the row changes only in f
            row = [Job(f"{a}_{b}_{k:02d}_a{alpha:.1f}", ((0, 1 - alpha), (1, alpha)), k) for alpha in INTERPOLATION_FACTORS]
            jobs += row
            rows.append([("tile", 0)] + [("file", j.name) for j in row] + [("tile", 1)])
        return jobs, rows[:GRID_ROWS]
    if source is None:
        jobs = [Job(f"{j:06d}", (), j) for j in range(num_samples or n)]
        names = [("file", j.name) for j in jobs[:GRID_ROWS * GRID_COLS]]
        return jobs, [names[r:r + GRID_COLS] for r in range(0, len(names), GRID_COLS)]
    jobs = [Job(f"{name}_{k:02d}", ((i, 1.0),), i * n + k) for i, name in enumerate(source.names) for k in range(n)]
    rows = [([("tile", i)] if isinstance(source, TileSource) else [])  # the reference tile on the left (Figure 2)
            + [("file", f"{source.names[i]}_{k:02d}") for k in range(min(n, GRID_COLS))]
            for i in range(min(len(source.names), GRID_ROWS))]
    return jobs, rows


def save_grid(rows, source, out, path):
    """Figure 2 / 3 style: each row a reference tile (when there is one) and its samples, side by side."""
    def cell(kind, ref):
        if kind == "tile":
            return source.tile(ref)
        with Image.open(os.path.join(out, ref + ".png")) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    if rows:
        save_rows([[cell(*c) for c in row] for row in rows], path)


def output_settings(args, step):
    """What decides the images of an output folder (OUT/settings.json): a rerun with others is refused."""
    files = lambda paths: None if paths is None else [os.path.abspath(p) for p in paths]  # noqa: E731
    return dict(ckpt=os.path.abspath(args.ckpt), ckpt_step=step, sit_weights=args.sit_weights,
                vae_weights=args.vae_weights, **asdict(SamplingSettings.from_args(args)), precision=args.precision,
                cond_mpp=args.cond_mpp, cond=files(args.cond), features=files(args.features and [args.features]),
                interpolate=files(args.interpolate), n=args.n, num_samples=args.num_samples)


#################################################################################
#                                  main                                         #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    settings = SamplingSettings.from_args(args)
    with processes(args.device) as (rank, world, device):
        args.precision = resolve_precision(args.precision, device)
        # generated tiles must never land among real ones (nor be read back as conditioning by a rerun)
        check_output_folder(args.out, {"--cond": args.cond, "--features": args.features and [args.features],
                                       "--interpolate": args.interpolate})
        pipe = load_pipeline(args.ckpt, device, args.sit_weights, args.vae_weights, args.precision, args.compile)
        source = conditioning_source(args, pipe)
        jobs, grid_rows = plan_jobs(source, args.n, args.num_samples, bool(args.interpolate))
        claim_output_folder(args.out)  # made, writable, and no other run's while this one writes (rank 0 locks it)
        record_settings(args.out, output_settings(args, pipe.step), rank)
        path = lambda job: os.path.join(args.out, job.name + ".png")  # noqa: E731
        todo = [j for j in jobs[rank::world] if not os.path.exists(path(j))]  # resume: skip finished files
        if rank == 0:
            guidance = (f"cfg {args.cfg_scale} on [{args.guidance_low}, {args.guidance_high}]" if source is not None
                        else "unconditional")
            print(f"{len(jobs)} images in {args.out}, {sum(os.path.exists(path(j)) for j in jobs)} already there; "
                  f"{args.sampler} {args.num_sampling_steps} steps, {guidance}, {args.precision}, {world} "
                  f"process(es)", flush=True)
        with tqdm(total=len(todo), unit="img", disable=rank != 0) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                try:
                    images = pipe.generate(batch_conditioning(source, batch, pipe), [j.noise_id for j in batch], settings)
                except NonFinite as err:
                    raise NonFinite(f"{err} (images {', '.join(j.name for j in batch)}; --cfg-scale {args.cfg_scale}, "
                                    f"--ckpt {args.ckpt})") from None
                for job, image in zip(batch, images):
                    save_png(image, path(job))
                bar.update(len(batch))
        if world > 1:
            dist.barrier()
        if rank == 0:
            # next to the folder, not in it: the folder holds the tiles (and settings.json), ready for metrics.py
            grid = os.path.normpath(args.out) + "_grid.png"
            save_grid(grid_rows, source, args.out, grid)
            print(f"done: {args.out}/ and {grid}", flush=True)
    return 0


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_samples is not None and (args.cond or args.features or args.interpolate):
        raise InputError("--num-samples is for unconditional runs; with --cond/--features each conditioning gets "
                         "--n images")
    if args.interpolate and not all(os.path.isfile(f) for f in args.interpolate):
        raise InputError("--interpolate takes two tile files (not folders, and they must exist)")
    check_guidance(args)
    return args


def build_parser():
    p = argparse.ArgumentParser(description="Generate H&E tiles with CytoSyn. Conditioning tiles must be at "
                                            f"{TILE_MPP} µm/px (20x); they are centre-cropped to 224 px, not resized "
                                            "(see --cond-mpp).")
    p.add_argument("--ckpt", required=True, help="train.py checkpoint, export folder (python -m support.weights "
                                                 "export) or REPA-E checkpoint; carries its model config")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--cond", nargs="+", metavar="TILE", help="conditioning tiles (files or folders)")
    what.add_argument("--features", metavar="FILE.npy", help="precomputed (N, 768) H0-mini CLS features")
    what.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                      help="Figure 3: condition on (1 - a) f_A + a f_B, a = 0.2, 0.4, 0.6, 0.8")
    p.add_argument("--cond-mpp", type=number_in(float, 0, 100, open_low=True), metavar="MPP", default=None,
                   help=f"the conditioning tiles' µm/px if not {TILE_MPP}: rescale them to {TILE_MPP} before cropping")
    p.add_argument("--n", type=SAMPLES_PER_COND, default=5, help="samples per conditioning (rows of the "
                                                                          "interpolation)")
    p.add_argument("--num-samples", type=number_in(int, 1, 10 ** 9), help="unconditional: number of images "
                                                                           "(default --n)")
    p.add_argument("--out", default="samples", help="output folder; a rerun with the same settings keeps its images")
    add_sampling_args(p)
    p.add_argument("--seed", type=SEED, default=0, help="image i's noise comes from (seed, i)")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=32, help="images per forward pass, per "
                                                                                    "process")
    p.add_argument("--sit-weights", choices=["ema", "raw"], default="ema",
                   help="the SiT's EMA or raw weights (its BatchNorm statistics denormalise the latents)")
    p.add_argument("--vae-weights", choices=["ema", "raw"], default="ema",
                   help="the VAE's EMA or raw weights (Table 2 reports both with the EMA SiT)")
    add_device_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the SiT (GPU; compiling comes first: "
                                                          "worth it for long runs, see docs/performance.md)")
    return p


if __name__ == "__main__":
    run(main)
