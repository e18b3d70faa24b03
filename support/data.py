"""Tiles in: the one tile decoder of the repo, and CytoSyn's training data (CytoSyn §3.2-3.3).

    open_tile     every tool's tile decoder (training, sampling, metrics): one rule each for grey-scale,
                  alpha, palette, 16-bit, truncated files and whole slides passed as tiles;
    TileFolder    tiles listed up front (a folder searched recursively, or a manifest's `train` rows),
                  read through a DistributedSampler that can start an epoch part way (exact resume);
    TileShards    tiles streamed from .tar shards with the standard library, for tens of millions of
                  files without an index, split by rank and data worker.

Each training item is (uint8 tile (3, H, W), precomputed H0-mini tokens (1 + T, D) or an empty tensor).
Tiles must be the training size; another size is an error unless the caller asks for a centre crop or a
rescale. Left out: data augmentation (neither the paper nor REPA-E states any), and decoding on the GPU.
"""
import io
import itertools
import os
import random
import tarfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from support.cli import InputError, MissingInput, NonFinite
from support.tiles import IMAGE_EXTENSIONS, SLIDE_EXTENSIONS

NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file
ROWS_AT_ONCE = 65_536  # rows of a feature array checked for finiteness at a time (a memory-mapped 100k x 768)
MAX_TILE_PX = 2048  # a larger image is a slide or a region, not a tile (CytoSyn's are 224 px)


class TileError(InputError):
    """A file that is not a usable tile; the message names it and says what to do."""


def open_tile(src, name=None, decode=True):
    """The one tile decoder of the repo (training, sampling, metrics): an image file (path or file
    object) -> an 8-bit RGB PIL image, or a TileError naming the file. The rules:

        grey-scale (1, L, I;16, F ...)      refused: H&E tiles are RGB
        RGBA, LA, palette with transparency alpha dropped when every pixel is opaque, else refused
        palette, CMYK, YCbCr                converted to RGB
        16-bit RGB                          Pillow reads it as 8-bit RGB
        truncated or not an image           refused, named
        a whole slide (SVS, ..., a multi-page TIFF, a side over MAX_TILE_PX)   refused: use tiling.py

    decode=False checks the header only (fast; the pixels are read later)."""
    name = str(name if name is not None else src)
    if name.lower().endswith(SLIDE_EXTENSIONS):
        raise TileError(f"{name} is a whole-slide file, not a tile: cut it into tiles with tiling.py")
    try:
        im = Image.open(src)
    except FileNotFoundError:
        raise TileError(f"{name}: no such file") from None
    except Image.DecompressionBombError as err:
        raise TileError(f"{name} is a huge image ({err}), a whole slide rather than a tile: cut it into tiles "
                        f"with tiling.py") from err
    except (OSError, ValueError) as err:  # Pillow's UnidentifiedImageError is an OSError
        raise TileError(f"{name} is not an image Pillow can read ({type(err).__name__}); give PNG/JPEG/TIFF "
                        f"H&E tiles, or remove it") from err
    if getattr(im, "n_frames", 1) > 1 or max(im.size) > MAX_TILE_PX:
        raise TileError(f"{name} is {im.size[0]}x{im.size[1]} px"
                        f"{' with several pages' if getattr(im, 'n_frames', 1) > 1 else ''}: "
                        f"a whole slide or a region, not a tile (at most {MAX_TILE_PX} px); cut it into tiles "
                        f"with tiling.py")
    if im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;") or im.mode == "LA":
        raise TileError(f"{name} is grey-scale (mode {im.mode}); H&E tiles are RGB: re-export it in colour, or "
                        f"remove it")
    if not decode:
        return im
    try:
        im.load()
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "RGBa", "PA"):
            alpha = im.getchannel("A")
            if alpha.getextrema()[0] < 255:
                raise TileError(f"{name} has transparent pixels (mode {im.mode}), whose colour is undefined: "
                                f"save the tile as opaque RGB")
        return im.convert("RGB") if im.mode != "RGB" else im
    except OSError as err:  # truncated or corrupt data
        raise TileError(f"{name} could not be decoded ({type(err).__name__}: {err}); is it truncated? Remove "
                        f"it or re-export it") from err


def decode_tile(src, name, size, resize=None):
    """A training tile -> uint8 tensor (3, size, size). Another size is an error unless `resize` says
    "crop" (centre crop) or "scale" (bicubic)."""
    return fit_tile(open_tile(src, name), name, size, resize)


def fit_tile(im, name, size, resize=None):
    """An RGB PIL tile -> uint8 tensor (3, size, size), under decode_tile's rule for other sizes."""
    if im.size != (size, size):
        if resize is None:
            raise TileError(f"{name} is {im.size[0]}x{im.size[1]} px but --image-size is {size}: tile "
                            f"the slides at {size} px, or pass --resize crop (centre crop) or --resize scale")
        if resize == "crop":
            im = centre_crop(im, size, name)
        else:
            im = im.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)  # (3, H, W) uint8


def centre_crop(im, size, name):
    """The size x size square at the centre (a 256 px tile -> the 224 px tile inside it, paper §4.3)."""
    if min(im.size) < size:
        raise TileError(f"{name} ({im.size[0]}x{im.size[1]} px) is smaller than {size} px: cannot crop")
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def list_images(folder, recursive=True):
    """Image files under a folder, sorted (so every rank and every run agrees)."""
    if not os.path.isdir(folder):
        raise MissingInput(f"{folder}: no such folder")
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not recursive:
            break
    return found


def read_npy(path, what, mmap=True):
    """A .npy array file -> the array (memory-mapped, weights-only: no pickled objects); else one line naming
    `what` and saying what the file is: missing, not a .npy file (text, a pickle, another format), or an array
    of Python objects."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise MissingInput(f"{what} {path}: no such file") from None
    except (ValueError, OSError) as err:
        with open(path, "rb") as f:
            head = f.read(64)
        if not head.startswith(NPY_MAGIC):  # numpy's "pickled data" is any file that is not a .npy
            kind = ("an empty file" if not head else "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head)
                    else f"another format, beginning {head[:8]!r}")
            raise InputError(f"{what} {path} is not a NumPy .npy array file (it holds {kind}); write the array "
                             f"with numpy.save") from None
        raise InputError(f"{what} {path} is a .npy file but not an array of numbers ({str(err).splitlines()[0]}); "
                         f"write a float array with numpy.save") from None


def check_finite_rows(arr, what):
    """Refuse an (N, D) feature array with NaN or inf in any row, naming the rows (0-based), before any model
    runs: a non-finite conditioning is found otherwise only after sampling, as black tiles."""
    arr = arr.reshape(1, -1) if arr.ndim < 2 else arr.reshape(len(arr), int(np.prod(arr.shape[1:])))  # a vector: a row
    bad = np.concatenate([np.flatnonzero(~np.isfinite(arr[i:i + ROWS_AT_ONCE]).all(1)) + i
                          for i in range(0, len(arr), ROWS_AT_ONCE)] or [np.zeros(0, int)])
    if len(bad):
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        raise NonFinite(f"{what}: {len(bad)} of its {len(arr)} rows hold NaN or inf (rows {shown}, counting from "
                        f"0); remove or recompute them")


def load_features(features_dir, stem, tokens):
    """Precomputed H0-mini tokens of one tile -> float32 (1 + tokens, D): CLS, then patch tokens."""
    path = os.path.join(features_dir, stem + ".npy")
    if not os.path.exists(path):
        raise MissingInput(f"no precomputed features {path} for tile {stem}; compute them for every "
                                f"training tile or drop --features")
    feats = read_npy(path, "--tokens", mmap=False)
    if feats.ndim != 2 or feats.shape[0] != 1 + tokens:
        raise InputError(f"{path} has shape {feats.shape}; expected (1 + {tokens}, D): the CLS token then the "
                         f"patch tokens resized to the SiT's token grid for this --image-size")
    return torch.from_numpy(feats.astype(np.float32))


def feature_dim(features_dir):
    first = next((f for f in sorted(os.listdir(features_dir)) if f.endswith(".npy")), None)
    if first is None:
        raise MissingInput(f"--features {features_dir} holds no .npy files")
    return read_npy(os.path.join(features_dir, first), "--tokens").shape[1]


class TileFolder(Dataset):
    """Tiles listed up front (a folder or a manifest) -> (uint8 (3, H, W), features or an empty tensor)."""

    def __init__(self, paths, size, resize=None, features=None, tokens=0):
        self.paths, self.size, self.resize, self.features, self.tokens = paths, size, resize, features, tokens
        if features:  # features are found by file stem: two tiles of one name would share them silently
            seen = {}
            for p in paths:
                stem = os.path.splitext(os.path.basename(p))[0]
                if stem in seen:
                    raise InputError(f"--features needs unique tile names, but {seen[stem]} and {p} are both "
                                     f"{stem!r}; rename one or drop --features")
                seen[stem] = p

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        stem = os.path.splitext(os.path.basename(path))[0]
        feats = load_features(self.features, stem, self.tokens) if self.features else torch.empty(0)
        return decode_tile(path, path, self.size, self.resize), feats


class SlideTiles(TileFolder):
    """A manifest's tiles read from the slides inside the data workers (slides.SlideTileReader), pixel for
    pixel the PNGs tiling.py wrote, so a cohort trains without a PNG copy of every tile. Each worker
    process opens its own slide handles on first use."""

    def __init__(self, rows, slides_dir, resample, size, resize=None, features=None, tokens=0):
        super().__init__([r["name"] for r in rows], size, resize, features, tokens)
        self.rows, self.slides_dir, self.resample = rows, slides_dir, resample
        self.reader, self.pid = None, None

    def __getitem__(self, i):
        from support.slides import SlideError, SlideTileReader  # OpenSlide only where slides are read
        if self.reader is None or self.pid != os.getpid():  # a fresh reader after a fork
            self.reader, self.pid = SlideTileReader(self.slides_dir, self.resample), os.getpid()
        row, name = self.rows[i], self.paths[i]
        try:
            tile = Image.fromarray(self.reader.read(row))
        except (SlideError, OSError) as err:
            raise TileError(f"tile {name} of slide {row['slide_file']} could not be read ({err})") from err
        feats = load_features(self.features, name, self.tokens) if self.features else torch.empty(0)
        return fit_tile(tile, f"{row['slide_file']}:{name}", self.size, self.resize), feats

    def __getstate__(self):  # open slide handles do not cross process boundaries
        return {**self.__dict__, "reader": None, "pid": None}


class TileShards(IterableDataset):
    """Tiles streamed from tar shards (tens of millions of tiles, no index): an endless stream.

    Each pass shuffles the shard order with the same seed on every rank; reader k of R * W (rank r,
    data worker w, k = r * W + w) reads shards k, k + R * W, ...; a buffer shuffles tiles locally.
    Endless, so that ranks whose shards differ in length never run out at different steps.
    """

    def __init__(self, shards, size, resize=None, features=None, tokens=0, rank=0, world=1, seed=0,
                 shuffle_buffer=1000, start_pass=0):
        self.shards, self.size, self.resize, self.features, self.tokens = shards, size, resize, features, tokens
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer, self.start_pass = shuffle_buffer, start_pass

    def read_shard(self, path):
        with tarfile.open(path, mode="r|*") as tar:  # streaming mode: members are read in order, once
            for member in tar:
                stem, ext = os.path.splitext(os.path.basename(member.name))
                if not member.isfile() or ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                data = io.BytesIO(tar.extractfile(member).read())
                feats = load_features(self.features, stem, self.tokens) if self.features else torch.empty(0)
                yield decode_tile(data, f"{path}:{member.name}", self.size, self.resize), feats

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * workers + worker, self.world * workers
        if len(self.shards) < readers:
            raise InputError(f"{len(self.shards)} tar shards for {readers} readers (ranks x data workers): "
                             f"write at least {readers} shards or lower --num-workers")
        rng = random.Random(f"{self.seed}-{reader}")
        buffer = []
        for n in itertools.count(self.start_pass):
            order = random.Random(self.seed + n).sample(self.shards, len(self.shards))
            for shard in order[reader::readers]:
                for item in self.read_shard(shard):
                    buffer.append(item)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))


class ResumableSampler(DistributedSampler):
    """DistributedSampler (drop_last) that can start an epoch part way, for an exact resume."""

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), getattr(self, "skip", 0), None)

    def __len__(self):
        return self.num_samples - getattr(self, "skip", 0)


def batches(dataset, sampler, loader, step, steps_per_epoch):
    """Endless (images, features) batches, starting where `step` left the data order."""
    if sampler is None:  # a tar stream is endless already
        yield from loader
        return
    first_epoch, done_in_epoch = divmod(step, steps_per_epoch)
    for epoch in itertools.count(first_epoch):
        sampler.set_epoch(epoch, skip=done_in_epoch * loader.batch_size if epoch == first_epoch else 0)
        yield from loader


def training_batches(tiles, *, size, resize, features, tokens, rank, world, local_batch, seed, num_workers,
                     shuffle_buffer, start_step, pin_memory):
    """--tiles' tiles -> (dataset, endless (uint8 images (B, 3, H, W), features) batches for this rank),
    starting where `start_step` left the data order (exact resume for tile lists)."""
    kind, items = tiles
    common = dict(size=size, resize=resize, features=features, tokens=tokens)
    loader_kw = dict(batch_size=local_batch, num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                     persistent_workers=num_workers > 0,
                     # Its own generator: a new epoch's iterator must not draw from the training RNG,
                     # or a resumed run (which starts its iterator at another step) would diverge.
                     generator=torch.Generator().manual_seed(seed * world + rank))
    if kind == "slides":
        rows, slides_dir, resample = items
        dataset = SlideTiles(rows, slides_dir, resample, **common)
        items = rows
    if kind == "shards":
        dataset = TileShards(items, **common, rank=rank, world=world, seed=seed, shuffle_buffer=shuffle_buffer,
                             start_pass=start_step)  # a resumed stream starts a fresh shuffle, not mid-pass
        return dataset, batches(dataset, None, DataLoader(dataset, **loader_kw), start_step, None)
    if kind == "files":
        dataset = TileFolder(items, **common)
    if len(dataset) < local_batch * world:
        raise InputError(f"{len(dataset)} tiles is less than one global batch ({local_batch * world})")
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, sampler=sampler, **loader_kw)
    return dataset, batches(dataset, sampler, loader, start_step, len(dataset) // world // local_batch)


def first_tiles(dataset, n):
    """The first n tiles of the data, in file order (not shuffled) -> (uint8 (n, 3, H, W), features)."""
    if isinstance(dataset, TileShards):
        stream = TileShards(dataset.shards, dataset.size, dataset.resize, dataset.features, dataset.tokens,
                            shuffle_buffer=1)
        items = list(itertools.islice(iter(stream), n))
    else:
        items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


# -------- Tiles given on a command line (sample.py --cond) -------------------------------------------
def list_tile_args(paths, flag):
    """Tiles named on a command line (files and folders) -> image paths; folders are read in sorted order, not
    recursively. Outputs are named after the tiles, so two tiles of one name are refused."""
    tiles = []
    for p in paths:
        if os.path.isdir(p):
            found = list_images(p, recursive=False)
            if not found:
                raise MissingInput(f"{flag} {p}: the folder holds no tiles (PNG, JPEG or TIFF)")
            tiles += found
        elif os.path.isfile(p):
            tiles.append(p)
        else:
            raise MissingInput(f"{flag} {p}: no such file or folder")
    stems = [os.path.splitext(os.path.basename(t))[0] for t in tiles]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise InputError(f"two conditioning tiles are both named {dup!r}: outputs are named after the tiles; "
                         "rename one")
    return tiles


def size_at_mpp(im, path, size, mpp, target_mpp):
    """A tile's size once rescaled from mpp to target_mpp; a TileError when it is smaller than size."""
    scale = mpp / target_mpp
    w, h = round(im.size[0] * scale), round(im.size[1] * scale)
    if min(w, h) < size:
        at = "" if mpp == target_mpp else f" once rescaled from {mpp} to {target_mpp} µm/px"
        raise TileError(f"{path} is {im.size[0]}x{im.size[1]} px{at}; CytoSyn needs at least {size}x{size} px at "
                        f"{target_mpp} µm/px ({size * target_mpp:g} µm): tile the slide larger, or give the tiles' "
                        f"resolution with --cond-mpp MPP")
    return w, h


def read_tile_at_mpp(path, size, mpp, target_mpp):
    """A tile at mpp µm/px -> uint8 (3, size, size): rescaled to target_mpp only when the two differ, then
    centre-cropped (a 256 px tile loses 16 px on each side, as the paper's 224 px crops of 256 px tiles)."""
    im = open_tile(path)
    w, h = size_at_mpp(im, path, size, mpp, target_mpp)
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BICUBIC)  # PIL's bicubic is antialiased when shrinking
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)))  # (size, size, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, size, size)


def tile_stem(name):
    return os.path.splitext(os.path.basename(name))[0]
