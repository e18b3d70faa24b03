"""Generate H&E tiles with a trained CytoSyn model (CytoSyn §3.1, §4.1; Figures 2 and 3).

    python sample.py --ckpt CKPT --cond tile.png --n 5               # 5 variations of a tile + OUT_grid.png
    python sample.py --ckpt CKPT --cond tiles/ other.png             # several tiles, or folders of tiles
    python sample.py --ckpt CKPT --features cls.npy --n 1            # precomputed (N, 768) CLS features
    python sample.py --ckpt CKPT --interpolate a.png b.png           # Figure 3: factors 0.2 ... 0.8
    python sample.py --ckpt CKPT --cond-mean slide_tiles/ --n 8      # a slide's mean CLS (or --cond-mean cls.npy)
    python sample.py --ckpt CKPT --restain tiles/ --style s.png --strength 0.5   # one tile's stain on others
    python sample.py --ckpt CKPT --num-samples 64                    # unconditional (null embedding)
    python sample.py --ckpt CKPT --region SLIDE --at X,Y --size 1024 --out twin    # a region's synthetic twin
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --features cls.npy --n 1 --out DIR   # 100k tiles

Conditioning: the H0-mini CLS token of a 224 x 224 tile. Tiles must already be at 0.5 µm/px (20x), the
resolution CytoSyn was trained at; a larger tile is centre-cropped to 224 px, never resized, unless
`--cond-mpp MPP` gives their resolution (then they are rescaled to 0.5 µm/px first). Sampling (sampler.py):
250 Euler-Maruyama steps, guidance 2.5 on t in [0, 0.75]; decoding with the EMA SiT's BatchNorm
statistics and the EMA VAE (--sit-weights / --vae-weights pick raw ones).

Restaining (not in the paper; Owkin's announced next step) is SDEdit (Meng et al., 2022) on the interpolant:
each content tile is encoded (the VAE posterior's mean: the deterministic latent; a sample's noise would only
add to eps) and normalised with the SiT's running BatchNorm statistics, noised to t = S (--strength) as
x_S = (1 - S) x + S eps, then integrated from S to 0 guided by the style tile's CLS. Small S keeps the cells
and changes little; S = 1 ignores the content. OUT/restain.json holds, per tile, how much of the content's
structure it kept and how far its stain moved towards the style's (support/stain.py).

Every image has a stable name and its own noise seed (from --seed and the image's index), so a run split
over any number of processes, or killed and started again, writes the same files: existing files are
skipped. OUT/settings.json records the run, and a rerun with other settings is refused rather than mixed
in. No non-finite image is ever written. From Python, with the released pipeline's keywords:

    pipe = load_pipeline("EXPORT_DIR")
    images = pipe(h0_mini_embeds=feats, num_inference_steps=250, guidance_scale=2.5, seed=0)["images"]
    images = pipe(h0_mini_embeds=feats.mean(0, keepdims=True), num_images_per_prompt=8)["images"]  # --cond-mean
    images = pipe(h0_mini_embeds=style_cls, restain_from=[content_pil], strength=0.5)["images"]   # --restain

A region's twin (--region SLIDE --at X,Y --size W[,H], or --cond-grid FILE.npy): one W x H latent sampled as a
whole with MultiDiffusion (sampler.multidiffusion_velocity), each window of the model's tile size conditioned on
the CLS of the real tile at its place (or on a row of the grid); its noise is image 0's stream of --seed, so a
region one window large is sample.py's first image. Writes OUT.png, OUT/OUT.tiff (pyramidal, 0.5 µm/px, for
OpenSlide and tiling.py), OUT_side_by_side.png (real | twin) and OUT/seams.json (support/region.py).

Left out: PixCell-style multi-tile conditioning, metrics (metrics.py). --ckpt also takes an export on the hub,
hf-hub:ORG/REPO[@REVISION] (support/hub.py); `python -m support.weights export --format diffusers` writes one that
diffusers loads as LazySlide loads CytoSyn, with the same images.
"""
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from features import encoder_features, load_encoder, read_cls_names
from repa_loss import interpolate
from sampler import euler_maruyama_sampler, euler_sampler, multidiffusion_velocity, standard_normal
from support import region
from support.cli import (
    BATCH_SIZE,
    SAMPLERS,
    SAMPLES_PER_COND,
    SAMPLING_RANGES,
    SEED,
    ArgumentParser,
    InputError,
    NonFinite,
    Unavailable,
    add_device_args,
    add_sampling_args,
    autocast,
    check_guidance,
    check_number,
    number_in,
    processes,
    resolve_precision,
    run,
)
from support.data import check_finite_rows, list_tile_args
from support.hub import hub_weights
from support.outputs import check_output_folder, claim_output_folder, record_settings, save_json, save_png
from support.sampling import (
    ArraySource,
    MeanSource,
    TileSource,
    batch_conditioning,
    content_tiles,
    plan_jobs,
    read_feature_array,
    read_png,
    restain_jobs,
    save_grid,
)
from support.stain import score_restained
from support.tiles import TILE_MPP
from support.weights import load_models
from vae import to_pixels

SAMPLES_PER_TILE, STRENGTH = 5, 0.5              # --n's and --strength's defaults
# The released pipeline's keyword for a setting where it differs (as LazySlide calls it).
API_NAMES = {"num_sampling_steps": "num_inference_steps", "cfg_scale": "guidance_scale"}


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
    def generate(self, cond, noise_ids, settings, content=None, strength=1.0):
        """(B, D) CLS features (None: unconditional) -> uint8 images (B, H, W, 3). Image i's noise (its start and
        its Brownian increments) comes from its own generator, seeded by (settings.seed, noise_ids[i]).
        Restaining (SDEdit): with `content`, uint8 tiles (B, 3, H, W), the start is not noise at t = 1 but the
        content's latent noised to t = strength on the interpolant, x_S = (1 - S) x + S eps."""
        gens = [torch.Generator(self.device).manual_seed(noise_seed(settings.seed, i)) for i in noise_ids]
        shape = (len(noise_ids), self.sit.in_channels, self.sit.input_size, self.sit.input_size)
        x = standard_normal(shape, gens, self.device)  # the first draw of every image's stream: eps
        if content is not None:
            t = torch.full((len(x),), float(strength), dtype=torch.float64, device=self.device)
            x = interpolate(self.encode(content), x, t)  # (B, 4, h, w) at t = strength
        guidance = dict(cond=cond, num_steps=settings.num_sampling_steps, cfg_scale=settings.cfg_scale,
                        guidance_low=settings.guidance_low, guidance_high=settings.guidance_high,
                        t_start=strength if content is not None else 1.0)
        with autocast(self.device, self.precision):  # the network in bf16 if asked; the sampler state float64
            if settings.sampler == "sde":
                x = euler_maruyama_sampler(self.velocity, x, generator=gens, **guidance)
            else:
                x = euler_sampler(self.velocity, x, heun=settings.sampler == "heun", **guidance)
        return self.decode(x, noise_ids)

    def encode(self, tiles):
        """uint8 tiles (B, 3, H, W) -> float64 latents (B, 4, h, w) in the SiT's space: the VAE posterior's mean,
        normalised with the SiT's running BatchNorm statistics (decode() undoes it), in float32 as decode()."""
        posterior = self.vae.encode(tiles.to(self.device).float() / 127.5 - 1.0)
        return self.sit.normalize(posterior.mean).double()  # the SiT is in eval mode: running statistics

    def decode(self, x, noise_ids):
        """Normalised latents -> uint8 images (B, H, W, 3), refusing any non-finite one before it is written."""
        # NOTE: decoded in float32 even after bf16 sampling (once per image, against hundreds of SiT passes),
        # so bf16 cannot band the 8-bit output.
        check_finite(x, noise_ids, "latents")
        images = self.vae.decode(self.sit.denormalize(x.float()))  # (B, 3, H, W), about [-1, 1]
        check_finite(images, noise_ids, "decoded pixels")
        return to_pixels(images).cpu().numpy()

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
                 guidance_low=0.0, guidance_high=0.75, seed=0, batch_size=32, sampler="sde", restain_from=None,
                 strength=STRENGTH):
        """The released pipeline's call: h0_mini_embeds (N, 768) or None -> {"images": N x num_images_per_prompt
        PIL images}, embed by embed; the jobs, seeds and functions of `sample.py --features`. With restain_from
        (M content tiles at 0.5 µm/px: PIL images or uint8 (H, W, 3) arrays), the M x num_images_per_prompt
        restained tiles of `sample.py --restain`: h0_mini_embeds is then the style's CLS, one row for every tile
        or one per tile (a style tile's: pipe.encode_tiles(uint8 (1, 3, 224, 224)))."""
        settings = SamplingSettings(sampler, num_inference_steps, guidance_scale, guidance_low, guidance_high, seed)
        n = check_number("num_images_per_prompt", num_images_per_prompt, int, 1, 10_000)
        source = None  # unconditional: the null embedding; guidance off
        if h0_mini_embeds is not None:
            embeds = (h0_mini_embeds.detach().float().cpu().numpy() if torch.is_tensor(h0_mini_embeds)
                      else np.asarray(h0_mini_embeds, dtype=np.float32))
            source = ArraySource(embeds, self.sit.cond_dim, "h0_mini_embeds")
        content = None if restain_from is None else content_tiles(restain_from, self.tile_size)
        if content is None:
            jobs, _ = plan_jobs(source, n)
        else:
            check_number("strength", strength, float, 0, 1, open_low=True)
            if source is None or len(source.names) not in (1, len(content)):
                raise InputError(f"restain_from ({len(content)} tiles) needs h0_mini_embeds, the style's CLS: one row "
                                 f"for all tiles or one per tile")
            jobs = restain_jobs([f"{i:06d}" for i in range(len(content))], n, one_style=len(source.names) == 1)
        images = []
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            cond, ids = batch_conditioning(source, batch, self), [j.noise_id for j in batch]
            out = self.generate(cond, ids, settings, None if content is None else content[[i // n for i in ids]],
                                strength)
            images += [Image.fromarray(im) for im in out]
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
        raise NonFinite(f"{len(bad)} image(s) have non-finite {what} "
                        f"(noise ids {bad[:5]}{' ...' if len(bad) > 5 else ''}); "
                        f"nothing of this batch was written. Likely causes: non-finite weights or conditioning "
                        f"features, or a guidance scale that blows up (try a smaller one)")


#################################################################################
#                                 Conditioning                                  #
#################################################################################

def conditioning_source(args, pipe):
    """What the flags name -> (the conditioning: a TileSource, an ArraySource or a MeanSource, None when
    unconditional; the content tiles of --restain, whose conditioning is --style, or None)."""
    size, mpp, dim = pipe.tile_size, args.cond_mpp or TILE_MPP, pipe.sit.cond_dim
    if args.restain:
        return TileSource([args.style], size, mpp), TileSource(list_tile_args(args.restain, "--restain"), size, mpp)
    if args.features:
        source = ArraySource(read_feature_array(args.features, "--features"), dim, f"--features {args.features}")
        read_cls_names(args.features, len(source.arr))  # features.py's names beside its cls.npy must fit it
        return source, None
    if npy_of(args.cond_mean):
        path = args.cond_mean[0]
        return MeanSource(ArraySource(read_feature_array(path, "--cond-mean"), dim, f"--cond-mean {path}")), None
    if args.cond_mean:
        return MeanSource(TileSource(list_tile_args(args.cond_mean, "--cond-mean"), size, mpp)), None
    if args.cond or args.interpolate:
        paths = list_tile_args(args.cond or args.interpolate, "--cond" if args.cond else "--interpolate")
        return TileSource(paths, size, mpp), None
    return None, None


def npy_of(cond_mean):
    """--cond-mean's feature array, when it names one (else it names tiles)."""
    return cond_mean[0] if cond_mean and cond_mean[0].endswith(".npy") else None


def output_settings(args, step):
    """What decides the images of an output folder (OUT/settings.json): a rerun with others is refused."""
    files = lambda paths: None if paths is None else [os.path.abspath(p) for p in paths]  # noqa: E731
    return dict(ckpt=os.path.abspath(args.ckpt), ckpt_step=step, sit_weights=args.sit_weights,
                vae_weights=args.vae_weights, **asdict(SamplingSettings.from_args(args)), precision=args.precision,
                cond_mpp=args.cond_mpp, cond=files(args.cond), features=files(args.features and [args.features]),
                interpolate=files(args.interpolate), n=args.n, num_samples=args.num_samples,
                cond_mean=files(args.cond_mean), restain=files(args.restain), style=files(args.style and [args.style]),
                strength=args.strength)


#################################################################################
#                          A region's synthetic twin                            #
#################################################################################

@torch.no_grad()
def generate_region(pipe, cond, plan, settings, batch_size=32):
    """(K, D) features, one per window of `plan` (support/region.py) -> the region's normalised latent (1, C, h, w),
    sampled as one with MultiDiffusion. Its noise is image 0's stream of settings.seed, drawn as generate() draws an
    image's (start, then Brownian increments), so a one-window region is sample.py's first image, bit for bit."""
    gens = [torch.Generator(pipe.device).manual_seed(noise_seed(settings.seed, 0))]
    shape = (1, pipe.sit.in_channels, plan.height // plan.factor, plan.width // plan.factor)
    x = standard_normal(shape, gens, pipe.device)  # (1, C, h, w), the whole latent from one stream
    velocity = multidiffusion_velocity(pipe.velocity, plan.starts_y, plan.starts_x, plan.window, batch_size)
    guidance = dict(cond=cond.to(pipe.device)[None], num_steps=settings.num_sampling_steps,  # cond (1, K, D)
                    cfg_scale=settings.cfg_scale, guidance_low=settings.guidance_low,
                    guidance_high=settings.guidance_high)
    with autocast(pipe.device, pipe.precision):
        if settings.sampler == "sde":
            return euler_maruyama_sampler(velocity, x, generator=gens, **guidance)
        return euler_sampler(velocity, x, heun=settings.sampler == "heun", **guidance)


def encode_crops(pipe, image, corners, size, batch_size):
    """CLS features (N, D) of the tiles of `image` (uint8 (H, W, 3)) at the top-left `corners`."""
    return torch.cat([pipe.encode_tiles(torch.from_numpy(region.crops(image, corners[i:i + batch_size], size)))
                      for i in range(0, len(corners), batch_size)]).cpu()


def measure_seams(pipe, plan, twin, real, batch_size):
    """OUT/seams.json: metrics.seam_scores of tiles at window centres and across window boundaries (support/region.py:
    seam_crops), in the space of the checkpoint's encoder (the conditioning's H0-mini)."""
    from metrics import seam_scores  # the benchmark's code, loaded once a twin is scored

    centres, boundaries = region.seam_crops(plan)
    feats = {f"{where}_{which}": encode_crops(pipe, image, corners, plan.tile, batch_size).double().numpy()
             for where, corners in (("centre", centres), ("boundary", boundaries))
             for which, image in (("synthetic", twin), ("real", real)) if image is not None and corners}
    return dict(seam_scores(**feats), extractor=pipe.encoder_name, tile=plan.tile,
                window_stride=(plan.starts_x[1] - plan.starts_x[0]) * plan.factor if len(plan.starts_x) > 1 else None)


def sample_region(args):
    """--region / --cond-grid: one twin, every input checked before anything is sampled or written."""
    settings = SamplingSettings.from_args(args)
    with processes(args.device) as (_, world, device):
        if world > 1:
            raise InputError("--region samples one latent in one process: run it with python, not torchrun")
        args.precision = resolve_precision(args.precision, device)
        check_output_folder(args.out, {"--region": [args.region], "--cond-grid": [args.cond_grid]})
        pipe = load_pipeline(args.ckpt, device, args.sit_weights, args.vae_weights, args.precision, args.compile)
        grid = None if args.cond_grid is None else read_feature_array(args.cond_grid, "--cond-grid")
        if grid is not None and (grid.ndim != 3 or grid.shape[2] != pipe.sit.cond_dim):
            raise InputError(f"--cond-grid {args.cond_grid} has shape {grid.shape}; this model needs (rows, cols, "
                             f"{pipe.sit.cond_dim}) CLS features, one per window")
        plan = region.plan_region(args.region, args.at, args.size, pipe.vae.factor, pipe.sit.input_size,
                                  pipe.vae.config, None if grid is None else grid.shape, args.slide_mpp)
        claim_output_folder(args.out)
        record_settings(args.out, dict(output_settings(args, pipe.step), region=args.region and os.path.abspath(
            args.region), at=args.at, size=args.size, cond_grid=args.cond_grid and os.path.abspath(args.cond_grid),
            slide_mpp=args.slide_mpp))
        real = None if args.region is None else region.read_region(plan)
        cond = (torch.from_numpy(np.array(grid, np.float32)).flatten(0, 1) if grid is not None  # (K, D)
                else encode_crops(pipe, real, region.seam_crops(plan)[0], plan.tile, args.batch_size))  # windows
        print(f"{args.size[0]} x {args.size[1]} px twin in {args.out}: {plan.grid[0]} x {plan.grid[1]} windows of "
              f"{plan.tile} px, {args.sampler} {args.num_sampling_steps} steps, cfg {args.cfg_scale} on "
              f"[{args.guidance_low}, {args.guidance_high}], {args.precision}", flush=True)
        x = generate_region(pipe, cond, plan, settings, args.batch_size)
        twin = region.decode_tiled(lambda z: pipe.decode(z, [0]), x, plan.factor)
        written = region.write_twin(args.out, twin, real)
        seams = measure_seams(pipe, plan, twin, real, args.batch_size)
        save_json(seams, os.path.join(args.out, "seams.json"))
        print(f"done: {', '.join(written)}; seams: {seams}", flush=True)
    return 0


#################################################################################
#                                  main                                         #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    try:
        if args.size:  # a region's synthetic twin
            return sample_region(args)
        return write_samples(args)
    except Unavailable as err:  # the encoder's hub weights: sample.py has no --random-weights, but takes features
        err.then = err.then and ("or condition on CLS features computed where the weights are (features.py): "
                                 "--features FILE.npy")
        raise


def write_samples(args):
    settings = SamplingSettings.from_args(args)
    with processes(args.device) as (rank, world, device):
        args.precision = resolve_precision(args.precision, device)
        # generated tiles must never land among real ones (nor be read back as conditioning by a rerun)
        check_output_folder(args.out, {"--cond": args.cond, "--features": args.features and [args.features],
                                       "--interpolate": args.interpolate, "--cond-mean": args.cond_mean,
                                       "--restain": args.restain, "--style": args.style and [args.style]})
        for flag, path in (("--features", args.features), ("--cond-mean", npy_of(args.cond_mean))):
            if path:  # read and checked (format, NaN rows) before any model is built
                check_finite_rows(read_feature_array(path, flag), f"{flag} {path}")
        args.ckpt = hub_weights(args.ckpt)  # hf-hub:ORG/REPO: its snapshot's folder, so settings.json names the commit
        pipe = load_pipeline(args.ckpt, device, args.sit_weights, args.vae_weights, args.precision, args.compile)
        source, content = conditioning_source(args, pipe)
        jobs, grid_rows = plan_jobs(source, args.n, args.num_samples, bool(args.interpolate), content)
        claim_output_folder(args.out)  # made, writable, and no other run's while this one writes (rank 0 locks it)
        record_settings(args.out, output_settings(args, pipe.step), rank)
        path = lambda job: os.path.join(args.out, job.name + ".png")  # noqa: E731
        todo = [j for j in jobs[rank::world] if not os.path.exists(path(j))]  # resume: skip finished files
        if rank == 0:
            guidance = (f"cfg {args.cfg_scale} on [{args.guidance_low}, {args.guidance_high}]" if source is not None
                        else "unconditional") + (f", from t = {args.strength}" if content is not None else "")
            print(f"{len(jobs)} images in {args.out}, {sum(os.path.exists(path(j)) for j in jobs)} already there; "
                  f"{args.sampler} {args.num_sampling_steps} steps, {guidance}, {args.precision}, {world} "
                  f"process(es)", flush=True)
        with tqdm(total=len(todo), unit="img", disable=rank != 0) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                cond, ids = batch_conditioning(source, batch, pipe), [j.noise_id for j in batch]
                try:
                    tiles = None if content is None else torch.stack([content.tile(i) for i in ids])
                    images = pipe.generate(cond, ids, settings, tiles, args.strength)
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
            save_grid(grid_rows, {"tile": source, "content": content}, args.out, grid)
            if content is not None:  # each tile's numbers (support/stain.py), printed and in OUT/restain.json
                score_restained(((j.name, read_png(args.out, j.name), content.tile(j.noise_id), source.tile(0))
                                 for j in jobs), args.strength, os.path.join(args.out, "restain.json"))
            print(f"done: {args.out}/ and {grid}", flush=True)
    return 0


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_samples is not None and (args.cond or args.features or args.interpolate or args.cond_mean
                                         or args.restain):
        raise InputError("--num-samples is for unconditional runs; with --cond/--features/--cond-mean each "
                         "conditioning gets --n images")
    if args.interpolate and not all(os.path.isfile(f) for f in args.interpolate):
        raise InputError("--interpolate takes two tile files (not folders, and they must exist)")
    if bool(args.restain) != bool(args.style) or (args.strength is not None and not args.restain):
        raise InputError("--restain CONTENT... takes --style STYLE_TILE (and --strength S); --style and --strength "
                         "go with --restain only")
    if args.restain and args.n is not None:
        raise InputError("--restain writes one tile per content tile, named after it: --n is for the other modes")
    if args.style and not os.path.isfile(args.style):
        raise InputError(f"--style {args.style}: give one tile file (it must exist)")
    if args.cond_mean and any(p.endswith(".npy") for p in args.cond_mean) and len(args.cond_mean) > 1:
        raise InputError("--cond-mean takes tiles (files or folders) or one .npy feature array, not both")
    region.check_region_args(args)
    args.n = None if args.restain or args.size else (args.n or SAMPLES_PER_TILE)
    args.strength = (args.strength or STRENGTH) if args.restain else None
    check_guidance(args)
    return args


def build_parser():
    p = ArgumentParser(description="Generate H&E tiles with CytoSyn. Conditioning tiles must be at "
                                            f"{TILE_MPP} µm/px (20x); they are centre-cropped to 224 px, not resized "
                                            "(see --cond-mpp).")
    p.add_argument("--ckpt", required=True, help="train.py checkpoint, export folder (python -m support.weights "
                                                 "export), REPA-E checkpoint, or an export on the hub: "
                                                 "hf-hub:ORG/REPO[@REVISION]; carries its model config")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--cond", nargs="+", metavar="TILE", help="conditioning tiles (files or folders)")
    what.add_argument("--features", metavar="FILE.npy", help="precomputed (N, 768) H0-mini CLS features")
    what.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                      help="Figure 3: condition on (1 - a) f_A + a f_B, a = 0.2, 0.4, 0.6, 0.8")
    what.add_argument("--cond-mean", nargs="+", metavar="TILES_OR_NPY", help="condition on the mean CLS of tiles "
                      "(files or folders, e.g. a slide's) or of an (N, 768) .npy feature array")
    what.add_argument("--restain", nargs="+", metavar="CONTENT", help="restain these tiles (files or folders) with "
                      "the stain of --style: SDEdit from t = --strength")
    p.add_argument("--region", metavar="SLIDE", help="a synthetic twin of a region of this slide (any OpenSlide "
                   "format), each window conditioned on the real tile at its place; with --at and --size")
    p.add_argument("--at", metavar="X,Y", help="--region: the region's top-left corner in level-0 pixels")
    p.add_argument("--size", metavar="W[,H]", help="--region / --cond-grid: the twin's size in pixels at "
                   f"{TILE_MPP} µm/px, multiples of the VAE's factor (8)")
    p.add_argument("--cond-grid", metavar="FILE.npy", help="condition a twin's windows on this (rows, cols, 768) "
                   "grid of CLS features instead of the region's tiles (e.g. one interpolated between tissues)")
    p.add_argument("--slide-mpp", type=number_in(float, 0, 100, open_low=True), default=None,
                   help="--region: µm per level-0 pixel of the slide, overriding its metadata")
    p.add_argument("--style", metavar="STYLE_TILE", help="--restain: the tile whose stain (CLS) guides the result")
    p.add_argument("--strength", type=number_in(float, 0, 1, open_low=True), metavar="S", default=None,
                   help=f"--restain: the time the content is noised to, in (0, 1] (default {STRENGTH}); small S "
                        "keeps the cells, S = 1 ignores them")
    p.add_argument("--cond-mpp", type=number_in(float, 0, 100, open_low=True), metavar="MPP", default=None,
                   help=f"the tiles' µm/px (conditioning, content, style) if not {TILE_MPP}: rescale them to "
                        f"{TILE_MPP} before cropping")
    p.add_argument("--n", type=SAMPLES_PER_COND, default=None, help=f"samples per conditioning (rows of the "
                                                                     f"interpolation; default {SAMPLES_PER_TILE})")
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
