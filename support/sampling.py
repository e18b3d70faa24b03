"""What a sample.py run makes, and from what: where its conditioning comes from (CytoSyn §3.1: the H0-mini CLS
token of a 224 px tile at 0.5 µm/px), the images it writes (jobs) and its grid (Figures 2 and 3).

    TileSource(paths, size, mpp)    tiles; every header checked up front, each tile read when a batch needs it
    ArraySource(arr, dim, what)     an (N, D) feature array (or LazySlide's (N, 2 D) CLS + mean patch token)
    MeanSource(source)              the mean CLS of another source's rows: one conditioning (--cond-mean)
    content_tiles(images, size)     the Python API's content tiles to restain -> uint8 (N, 3, size, size)
    plan_jobs(...), restain_jobs    every image of a run: its name, its conditioning, its noise id; the grid's rows

Left out: PixCell-style multi-tile conditioning (a set of CLS tokens rather than their mean).
"""
import os
from collections import namedtuple

import numpy as np
import torch
from PIL import Image

from support.cli import InputError
from support.data import check_finite_rows, open_tile, read_npy, read_tile_at_mpp, size_at_mpp
from support.logs import save_rows
from support.tiles import TILE_MPP

MEAN_CHUNK = 32  # tiles encoded, or array rows read, at a time when averaging a source's features
INTERPOLATION_FACTORS = (0.2, 0.4, 0.6, 0.8)      # paper Fig. 3: f = (1 - a) f_left + a f_right
GRID_ROWS, GRID_COLS = 8, 8                       # the grid shows at most this many rows / samples per row

# One image to generate: its file name, its conditioning as a mix of sources ((index, weight), ...;
# empty = unconditional), and the id its noise seed comes from.
Job = namedtuple("Job", "name mix noise_id")


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
        check_finite_rows(arr, what)
        self.arr, self.names = arr, [f"{i:06d}" for i in range(len(arr))]

    def tile(self, i):
        return None

    def features(self, indices, pipe):
        return torch.from_numpy(np.asarray(self.arr[indices], dtype=np.float32)).to(pipe.device)


class MeanSource:
    """One conditioning: the mean CLS of all the rows of a TileSource or an ArraySource (a slide's tiles, as
    LazySlide's users ask), summed in float64 a chunk at a time and computed once."""

    def __init__(self, source):
        self.source, self.names, self.mean = source, ["mean"], None

    def tile(self, i):
        return None

    def features(self, indices, pipe):
        if self.mean is None:
            rows = len(self.source.names)
            total = sum(self.source.features(list(range(a, min(a + MEAN_CHUNK, rows))), pipe).double().sum(0)
                        for a in range(0, rows, MEAN_CHUNK))
            self.mean = (total / rows).float()  # (D,)
        return self.mean.expand(len(indices), -1)


def read_feature_array(path, flag):
    """A .npy array, memory-mapped; a missing file or another format is one line naming the flag (its rows are
    checked finite by ArraySource, and by sample.py before it builds the model)."""
    return read_npy(path, flag)


def batch_conditioning(source, jobs, pipe):
    """(B, D) features of a batch: each job's weighted mix of source features; None if unconditional."""
    if source is None:
        return None
    needed = sorted({i for job in jobs for i, _ in job.mix})
    feats = dict(zip(needed, source.features(needed, pipe)))
    return torch.stack([sum(w * feats[i] for i, w in job.mix) for job in jobs])


def content_tiles(images, size):
    """The Python API's content tiles (a list of PIL images or uint8 (H, W, 3) arrays, or one uint8 (N, H, W, 3)
    array) -> uint8 (N, 3, size, size), centre-cropped as sample.py's tiles (which must be at 0.5 µm/px)."""
    tiles = []
    for k, image in enumerate(images):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < size:
            raise InputError(f"restain_from[{k}] is a {arr.dtype} array of shape {arr.shape}; give uint8 RGB tiles of "
                             f"at least {size}x{size} px at {TILE_MPP} µm/px (H, W, 3)")
        top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
        tiles.append(torch.from_numpy(arr[top:top + size, left:left + size].copy()).permute(2, 0, 1))
    if not tiles:
        raise InputError("restain_from holds no tiles")
    return torch.stack(tiles)  # (N, 3, size, size)


# -------- Jobs and grids ---------------------------------------------------------------------------------
def plan_jobs(source, n, num_samples=None, interpolate=False, content=None):
    """All images of the run, in a fixed order, and the grid layout: rows of ("tile", index) / ("file", name)
    (and ("content", index) for --restain)."""
    if content is not None:  # one image per content tile, named after it: content | style | result
        jobs = restain_jobs(content.names, 1)
        return jobs, [[("content", j.noise_id), ("tile", 0), ("file", j.name)] for j in jobs[:GRID_ROWS]]
    if interpolate:
        a, b = source.names
        jobs, rows = [], []
        for k in range(n):  # one noise per row, shared by its factors, so the row changes only in f
            row = [Job(f"{a}_{b}_{k:02d}_a{alpha:.1f}", ((0, 1 - alpha), (1, alpha)), k)
                   for alpha in INTERPOLATION_FACTORS]
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


def restain_jobs(names, n, one_style=True):
    """n images per content tile (image k of tile i: noise id i n + k), each conditioned on the style: the
    source's row 0, or the tile's own row."""
    return [Job(name if n == 1 else f"{name}_{k:02d}", ((0 if one_style else i, 1.0),), i * n + k)
            for i, name in enumerate(names) for k in range(n)]


def read_png(out, name):
    with Image.open(os.path.join(out, name + ".png")) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # uint8 (3, H, W)


def save_grid(rows, sources, out, path):
    """Figure 2 / 3 style: each row a reference tile (when there is one) and its samples, side by side;
    `sources` gives the tiles of each kind of cell ("tile", "content")."""
    if rows:
        save_rows([[read_png(out, ref) if kind == "file" else sources[kind].tile(ref) for kind, ref in row]
                   for row in rows], path)
