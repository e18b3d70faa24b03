"""A synthetic twin of a whole-slide region (sample.py --region): what is read, checked, decoded and written around
the sampling, which sample.py does with sampler.multidiffusion_velocity (MultiDiffusion, Bar-Tal et al., 2023).

CytoSyn generates 224 px tiles at 0.5 µm/px (§3.1). A twin is W x H pixels at the same resolution: one latent for
the whole region, covered by windows of the model's tile size that overlap by half a window, each window
conditioned on the H0-mini CLS of the real tile at its place (or on a row of --cond-grid).

    plan_region(...)               every check of --at / --size / --cond-grid, before anything is sampled: the
                                   windows, the level the slide is read from, the memory the twin needs
    read_region(plan)              the real region, read as tiling.py reads its tiles -> uint8 (H, W, 3)
    decode_tiled(decode, x, f)     the latent decoded whole when it is one decoding tile, else in overlapping
                                   tiles blended with linear ramps
    write_twin(out, twin, real)    OUT.png, OUT/OUT.tiff (write_pyramid_tiff: tiled, pyramidal, 0.5 µm/px, for
                                   OpenSlide and so tiling.py) and OUT_side_by_side.png (real | twin)
    seam_crops(plan)               tiles at the windows (their conditioning tiles) and across window boundaries,
                                   for metrics.seam_scores

Left out: regions read at other resolutions than the model's, weighted (non-uniform) window averages, and
windows conditioned on anything but one CLS each.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from support.cli import InputError
from support.outputs import atomic, save_png
from support.tiles import TILE_MPP

WINDOW_STRIDE = 0.5  # windows start every half window: each position inside is averaged over 2 x 2 windows
DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent cells: 512 px decoding tiles overlapping by 128 px (f8)
TIFF_TILE = 256  # the TIFF's tile side, and where its pyramid stops (a level that fits one tile is the last)
READ_KERNEL = "lanczos"  # tiling.py's default --resize-kernel, for slides not scanned at 0.5 µm/px
# Host memory per output pixel, besides the decoder: the real region and the twin (uint8 RGB each), the picture
# side by side (2x), the decoder's blending sums (float32 RGB + weight), the TIFF's smaller levels and the
# float64 latent state and velocities of the sampler (about 10 copies of 4 channels at 1/64 of the pixels).
BYTES_PER_PIXEL = 3 + 3 + 6 + 16 + 1 + 10 * 4 * 8 // 64
DECODER_COPIES = 4  # float32 activations of the decoder's full-resolution width alive at once (docs/regions.md)


@dataclass
class RegionPlan:
    """One twin: where it is, its size, and how its latent is cut into windows."""
    slide: str | None  # the slide file (None: --cond-grid alone, no real region)
    x: int             # level-0 top-left, as tiling.py's coordinates
    y: int
    width: int         # output pixels at 0.5 µm/px
    height: int
    factor: int        # the VAE's downsampling: latent cells per pixel
    window: int        # the SiT's latent side: one window
    starts_y: list     # latent rows where windows start
    starts_x: list
    geometry: object = None  # support.slides.Geometry of the read (None without a slide)

    @property
    def tile(self):  # a window's side in pixels: the model's tile size
        return self.window * self.factor

    @property
    def grid(self):  # (rows, cols) of windows: --cond-grid's first two dimensions
        return len(self.starts_y), len(self.starts_x)

    @property
    def windows(self):  # latent (top, left) of each window, row by row: the order of the conditioning rows
        return [(top, left) for top in self.starts_y for left in self.starts_x]


def window_starts(length, window, stride):
    """Where windows of `window` cells start along an axis of `length` cells: every `stride` cells, and the last
    window flush with the end, so that every cell is covered and no window hangs over the edge."""
    starts = list(range(0, length - window + 1, stride))
    return starts if starts[-1] == length - window else starts + [length - window]


def parse_pair(text, flag):
    """'X,Y' or 'W' (W,W) -> two ints; for --at and --size."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or (flag == "--at" and len(values) != 2):
        raise InputError(f"{flag} {text!r}: give " + ("X,Y (level-0 pixels of the slide)" if flag == "--at"
                                                      else "W or W,H (pixels at 0.5 µm/px)"))
    return (values * 2)[:2]


def check_region_args(args):
    """--region SLIDE --at X,Y --size W[,H] and --cond-grid go together, and with no other conditioning."""
    region = {"--region": args.region, "--at": args.at, "--cond-grid": args.cond_grid, "--slide-mpp": args.slide_mpp}
    if not any(region.values()) and args.size is None:
        return
    others = [f for f in ("--cond", "--features", "--interpolate", "--cond-mean", "--restain", "--style", "--n",
                          "--num-samples", "--strength", "--cond-mpp") if getattr(args, f[2:].replace("-", "_"))]
    if others:
        raise InputError(f"{others[0]} does not go with --region / --cond-grid: a twin is one image, conditioned "
                         f"window by window on its region's tiles (or on --cond-grid)")
    if args.size is None or not (args.region or args.cond_grid):
        raise InputError("a twin needs --size W[,H] and --region SLIDE --at X,Y (or --cond-grid FILE.npy)")
    if bool(args.region) != bool(args.at) or (args.slide_mpp and not args.region):
        raise InputError("--region SLIDE goes with --at X,Y (level-0 pixels of its top-left corner); --slide-mpp "
                         "with --region")
    args.at = args.at and parse_pair(args.at, "--at")
    args.size = parse_pair(args.size, "--size")
    if args.region and not os.path.isfile(args.region):
        raise InputError(f"--region {args.region}: no such slide file")


def available_bytes():
    """Host memory this process may still take (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def region_bytes(width, height, vae_config, factor):
    """Host memory a W x H twin needs at its peak, roughly: BYTES_PER_PIXEL per pixel, and on one decoding tile the
    decoder's full-resolution activations (the width out of its last upsampling) and its middle attention matrix."""
    side = min(DECODE_TILE * factor, max(width, height))
    channels = vae_config["ch"] * max(vae_config["ch_mult"][:2])
    return width * height * BYTES_PER_PIXEL + 4 * (DECODER_COPIES * channels * side ** 2 + (side // factor) ** 4)


def plan_region(slide, at, size, factor, window, vae_config, cond_grid_shape=None, slide_mpp=None):
    """--region SLIDE --at X,Y --size W,H (or --cond-grid alone: no slide, at None) -> a RegionPlan, every user
    error an InputError before anything is sampled or written."""
    width, height = size
    tile = window * factor
    for name, n in (("width", width), ("height", height)):
        if n % factor:
            raise InputError(f"--size: the {name} {n} is not a multiple of the VAE's factor {factor} (its latent "
                             f"would not cover it): use {n // factor * factor} or {(n // factor + 1) * factor}")
        if n < tile:
            raise InputError(f"--size: the {name} {n} is smaller than one window, the model's tile of {tile} px")
    need, free = region_bytes(width, height, vae_config, factor), available_bytes()
    if free is not None and need > free:
        raise InputError(f"--size {width},{height}: a twin this large needs about {need / 2 ** 30:.1f} GiB of memory "
                         f"and {free / 2 ** 30:.1f} GiB is available: make the region smaller, or twin it in parts")
    stride = max(1, int(window * WINDOW_STRIDE))
    plan = RegionPlan(slide, *(at or (0, 0)), width, height, factor, window,
                      window_starts(height // factor, window, stride), window_starts(width // factor, window, stride))
    if cond_grid_shape is not None and tuple(cond_grid_shape[:2]) != plan.grid:
        raise InputError(f"--cond-grid has {cond_grid_shape[0]} x {cond_grid_shape[1]} windows but a {width} x "
                         f"{height} px region has {plan.grid[0]} x {plan.grid[1]} (windows of {tile} px every "
                         f"{stride * factor} px)")
    if slide is not None:
        locate(plan, slide_mpp)
    return plan


def locate(plan, slide_mpp):
    """Check that the region lies inside the slide, at the level tiling.py would read it from (plan.geometry)."""
    from support.slides import open_slide, resolve_mpp, slide_geometry  # openslide only once a slide is read

    slide = open_slide(plan.slide)
    try:
        mpp, _ = resolve_mpp(slide, global_mpp=slide_mpp)
        plan.geometry = slide_geometry(slide, mpp, TILE_MPP, plan.tile)
        per_px = plan.geometry.scale * plan.geometry.downsample  # level-0 pixels per output pixel
        right, bottom = plan.x + plan.width * per_px, plan.y + plan.height * per_px
        width, height = slide.dimensions
        if plan.x < 0 or plan.y < 0 or right > width or bottom > height:
            raise InputError(f"--at {plan.x},{plan.y} --size {plan.width},{plan.height}: the region spans level-0 "
                             f"pixels ({plan.x}, {plan.y}) to ({math.ceil(right)}, {math.ceil(bottom)}), outside the "
                             f"slide ({width} x {height} px at {mpp:.3f} µm/px)")
    finally:
        slide.close()


def read_region(plan):
    """The real region at 0.5 µm/px -> uint8 (H, W, 3): one read, placed as tiling.py places a tile whose top-left
    is (x, y), so a one-window region is tiling.py's tile there, pixel for pixel."""
    from support.slides import open_slide, read_output_pixels
    from support.tiles import RESIZE_KERNELS

    slide, geo = open_slide(plan.slide), plan.geometry
    try:
        per_px = geo.scale * geo.downsample
        return read_output_pixels(slide, geo, plan.x / per_px, plan.y / per_px, plan.width, plan.height,
                                  RESIZE_KERNELS[READ_KERNEL])
    finally:
        slide.close()


# -------- Decoding a large latent ------------------------------------------------------------------
def ramp(n, overlap, before, after):
    """1-D blending weights of a decoding tile of n pixels: rising over `overlap` px where a neighbour comes
    before it, falling where one comes after, 1 elsewhere (and at the region's borders)."""
    w = np.ones(n, np.float32)
    rise = (np.arange(n, dtype=np.float32) + 0.5) / overlap
    if before:
        w = np.minimum(w, rise)
    if after:
        w = np.minimum(w, rise[::-1])
    return w


def decode_tiled(decode, x, factor, tile=DECODE_TILE, overlap=DECODE_OVERLAP):
    """Normalised latents (1, C, h, w) -> uint8 (f h, f w, 3). `decode` maps latents (1, C, a, b) to uint8
    (1, f a, f b, 3) (sample.Pipeline.decode). A latent of at most tile x tile cells is decoded whole; a larger
    one in tiles of tile x tile cells overlapping by `overlap`, each blended into its neighbours with linear
    ramps over the overlap, so that the decoder's per-tile statistics (GroupNorm, attention) leave no edge."""
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return decode(x)[0]
    total = np.zeros((h * factor, w * factor, 3), np.float32)
    weight = np.zeros((h * factor, w * factor, 1), np.float32)
    starts_y = window_starts(h, min(tile, h), tile - overlap)
    starts_x = window_starts(w, min(tile, w), tile - overlap)
    for i, top in enumerate(starts_y):
        for j, left in enumerate(starts_x):
            part = decode(x[..., top:top + tile, left:left + tile])[0].astype(np.float32)  # (S, S', 3)
            wy = ramp(part.shape[0], overlap * factor, i > 0, i < len(starts_y) - 1)
            wx = ramp(part.shape[1], overlap * factor, j > 0, j < len(starts_x) - 1)
            mask = (wy[:, None] * wx[None, :])[..., None]  # (S, S', 1)
            rows, cols = slice(top * factor, top * factor + part.shape[0]), slice(left * factor,
                                                                                  left * factor + part.shape[1])
            total[rows, cols] += mask * part
            weight[rows, cols] += mask
    return np.round(total / weight).clip(0, 255).astype(np.uint8)


# -------- What a twin writes -----------------------------------------------------------------------
def write_pyramid_tiff(image, path, mpp, tile=TIFF_TILE):
    """uint8 (H, W, 3) -> a tiled pyramidal TIFF that OpenSlide opens ("generic-tiff") with openslide.mpp-x = mpp:
    one page per level, each half the one before (box-averaged), down to one that fits a tile; lossless (deflate,
    which tifffile writes without imagecodecs)."""
    import tifffile  # a runtime dependency for this file alone (README: dependencies)

    levels, level = [image], Image.fromarray(image)
    while max(level.size) > tile:
        level = level.reduce(2)
        levels.append(np.asarray(level))
    with atomic(path) as tmp, tifffile.TiffWriter(tmp) as tiff:
        for k, pixels in enumerate(levels):
            per_cm = 1e4 / (mpp * 2 ** k)  # OpenSlide reads µm/px from the resolution in pixels per centimetre
            tiff.write(pixels, tile=(tile, tile), resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                       subfiletype=int(k > 0), photometric="rgb", compression="zlib")


def write_twin(out, twin, real=None):
    """OUT.png, OUT/OUT.tiff (the folder then holds one slide for tiling.py) and OUT_side_by_side.png (with the real
    region) -> the paths written."""
    stem = os.path.normpath(out)
    paths = [stem + ".png", os.path.join(out, os.path.basename(stem) + ".tiff")]
    save_png(twin, paths[0])
    write_pyramid_tiff(twin, paths[1], TILE_MPP)
    if real is not None:
        paths.append(stem + "_side_by_side.png")
        save_png(side_by_side(real, twin), paths[2])
    return paths


def side_by_side(real, twin, gap=8):
    """real | twin, a white gap between them -> uint8 (H, 2 W + gap, 3)."""
    white = np.full((real.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([real, white, twin], axis=1)


def seam_crops(plan):
    """Top-left pixel corners of tiles (the model's tile size) cut from a twin: at the windows themselves (each
    conditioned on its own tile), and across window boundaries, centred half-way between two neighbouring
    window centres (across a row, a column, or at a corner of four): the points furthest from every window
    centre, where seams would show. For windows that did not overlap these would be centred on their edges."""
    f = plan.factor
    middle = lambda starts: [(a + b) * f // 2 for a, b in zip(starts, starts[1:])]  # noqa: E731
    ys, xs = [s * f for s in plan.starts_y], [s * f for s in plan.starts_x]
    my, mx = middle(plan.starts_y), middle(plan.starts_x)
    centres = [(y, x) for y in ys for x in xs]
    boundaries = [(y, x) for y in my for x in xs] + [(y, x) for y in ys for x in mx] + [(y, x) for y in my for x in mx]
    return centres, boundaries


def crops(image, corners, size):
    """uint8 (H, W, 3) and top-left corners -> uint8 (N, 3, size, size)."""
    return np.stack([image[y:y + size, x:x + size] for y, x in corners]).transpose(0, 3, 1, 2)
