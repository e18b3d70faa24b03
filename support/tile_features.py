"""Tiles -> an extractor's features, for metrics.py and evaluate.py: the preprocessing of CytoSyn §4.3, in
order (JPEG re-encoding, centre crop, resize to the input size with a named kernel), folder walking, and a
cache on disk keyed by the folder's content, the extractor and the preprocessing.

    Preprocess(jpeg, crop, kernel, resize_to_input)   what happens to a tile before an extractor sees it
    check_one_size / resize_record                     tiles of several sizes refused, or said how they were resized
    note_resizes(extractor, sets, prep)                sets of different tile sizes: how each was resized, said
    extract_features(folder, spec, prep, get, ...)     (stems, (N, dim) float32), cached
    same_tiles(a, b)                                   two folders holding the same tiles (a degenerate comparison)
    score_extractors(names, score)                     every extractor, those not available here skipped with why

The extractors themselves (what each is, its normalisation and pooling): extractors.py.
"""
import functools
import hashlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from support.cli import InputError, MissingInput, Unavailable
from support.data import TileError, list_images, open_tile
from support.outputs import save_npy
from support.tiles import RESIZE_KERNELS


@dataclass(frozen=True)
class Preprocess:
    """What happens to a tile before an extractor sees it, in this order (paper §4.3)."""
    jpeg: int | None = None  # 1. re-encode as JPEG at this quality (PIL defaults; DS-MIL writes q70)
    crop: int | None = None  # 2. centre-crop to this many px (a 256 tile -> the 224 tile inside it)
    kernel: str | None = None  # 3. PIL resize kernel to the input size (None: the extractor's own)
    resize_to_input: bool = False  # tiles of several sizes: resize each straight to the input size


def tile_sizes(files):
    """The distinct (width, height) of the tiles, from their headers -> {size: first file}."""
    sizes = {}
    for path in files:
        sizes.setdefault(open_tile(path, decode=False).size, path)
    return sizes


def check_one_size(folder, files, prep):
    """A folder of mixed tile sizes would be resized silently to one input size: refused unless the
    preprocessing says how to bring them to one size -> the tiles' size ((w, h), or "mixed")."""
    sizes = tile_sizes(files)
    if len(sizes) == 1:
        return next(iter(sizes))
    if prep.crop is None and not prep.resize_to_input:
        shown = ", ".join(f"{w}x{h} ({Path(p).name})" for (w, h), p in list(sizes.items())[:3])
        raise TileError(f"{folder} holds tiles of {len(sizes)} sizes ({shown}): keep one size, or pass --crop N "
                        f"(centre crop) or --resize-to-input (resize each to the extractor's input)")
    return "mixed"


def resize_record(tile_size, spec, prep):
    """What brought the tiles of one set to the extractor's input size, in words, for every report."""
    size = prep.crop or tile_size
    side = size if isinstance(size, int) else (size[0] if size != "mixed" and size[0] == size[1] else None)
    if side == spec.input_size:
        return f"none ({spec.input_size} px tiles)"
    size = f"{side} px" if side else "mixed" if size == "mixed" else f"{size[0]}x{size[1]} px"
    if spec.resize_inside:
        return f"{size} -> {spec.input_size} px, {spec.kernel} inside the network (torch, not antialiased)"
    return f"{size} -> {spec.input_size} px, PIL {prep.kernel or spec.kernel} (antialiased when shrinking)"


def note_resizes(extractor, sets, prep):
    """Sets of tiles of different sizes (224 px real tiles, a model's 64 px ones) are each resized on their own to
    the extractor's input, so they do not show the same field of view: one line per set on the console saying how
    it was resized, and the flags that treat them alike. `sets`: {name: (its tile size, resize_record)}. Nothing
    when the sizes agree, or when --crop or --resize-to-input already says how."""
    if len({size for size, _ in sets.values()}) < 2 or prep.crop is not None or prep.resize_to_input:
        return
    for name, (size, record) in sets.items():
        shown = f"{size[0]}x{size[1]} px" if isinstance(size, tuple) else size
        print(f"note: {extractor}: {name} tiles ({shown}): {record}", file=sys.stderr, flush=True)
    print(f"note: {extractor}: the sets' tiles differ in size, each resized on its own: --crop N centre-crops every "
          f"set alike (the paper's 256 -> 224: --crop 224), --resize-to-input resizes each straight to the input",
          file=sys.stderr, flush=True)


def preprocessed_tile(path, prep, size, kernel):
    """One tile as (size, size, 3) uint8 after JPEG, crop and resize."""
    im = open_tile(path)
    if im.width != im.height:
        raise TileError(f"{path} is {im.width}x{im.height} px, not a square tile: keep only tiles in the folder")
    if prep.jpeg is not None:
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=prep.jpeg)
        im = Image.open(buffer).convert("RGB")
    if prep.crop is not None:
        w, h = im.size
        if min(w, h) < prep.crop:
            raise InputError(f"{path}: tile is {w}x{h} px, smaller than the centre crop {prep.crop}")
        left, top = (w - prep.crop) // 2, (h - prep.crop) // 2
        im = im.crop((left, top, left + prep.crop, top + prep.crop))
    if size is not None and im.size != (size, size):  # None: the network resizes (resize_inside)
        im = im.resize((size, size), RESIZE_KERNELS[kernel])  # PIL antialiases when it downsamples
    return np.asarray(im)


def load_batch(paths, prep, size, kernel):
    """The DataLoader's collate_fn, so tiles are decoded in its worker processes -> (B, 3, S, S) uint8."""
    return torch.from_numpy(np.stack([preprocessed_tile(p, prep, size, kernel) for p in paths])).permute(0, 3, 1, 2)


def cache_key(files, folder, prep, identity):
    """Folder content (relative names, sizes, mtimes) + the extractor's identity + preprocessing -> hex digest."""
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(dict(identity, prep=asdict(prep)), sort_keys=True, default=str).encode())
    return h.hexdigest()


def extract_features(folder, spec, prep, get_extractor, *, identity, bf16=False, device="cpu", batch_size=64,
                     workers=0, cache_dir=None):
    """Features of every tile under `folder` in sorted path order -> (stems, (N, spec.dim) float32).

    `spec` says what the extractor sees (input size, kernel, resize_inside, dim); `identity` (a JSON-able dict:
    the extractor's name, its registry entry, its weights) keys the cache. `get_extractor()` is called only on
    a cache miss, so cached folders need neither the model nor the hub."""
    files, name = [Path(p) for p in list_images(folder)], identity["extractor"]
    if not files:
        raise MissingInput(f"{folder}: no tiles (PNG, JPEG or TIFF) inside")
    stems = [p.stem for p in files]
    tile_size, cache = check_one_size(folder, files, prep), None
    if cache_dir is not None:
        key = cache_key(files, Path(folder), prep, dict(identity, bf16=bf16))
        cache = Path(cache_dir) / f"{Path(folder).resolve().name}-{name}-{key[:16]}.npy"
        if cache.exists():
            return stems, np.load(cache)
    extractor, kernel = get_extractor(), prep.kernel or spec.kernel
    size = None if spec.resize_inside and not prep.resize_to_input and tile_size != "mixed" else spec.input_size
    collate = functools.partial(load_batch, prep=prep, size=size, kernel=kernel)
    loader = torch.utils.data.DataLoader(files, batch_size, num_workers=workers, collate_fn=collate,
                                         pin_memory=torch.device(device).type == "cuda")
    feats, i = np.empty((len(files), spec.dim), np.float32), 0
    for x in tqdm(loader, desc=f"{name} <- {folder}", unit="batch"):
        x = x.to(device, non_blocking=True).float() / 255  # (B, 3, S, S) in [0, 1]
        f = extractor.embed(x, bf16)  # (B, dim)
        if f.shape[1] != spec.dim:
            raise RuntimeError(f"{name} returned {f.shape[1]} features; the registry says {spec.dim}")
        feats[i:i + len(f)] = f.cpu().numpy()
        i += len(f)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_npy(feats, cache)  # atomic: a killed run leaves no half-written cache
    return stems, feats




def same_tiles(folder_a, folder_b):
    """True when two folders are one folder, or hold byte-identical sets of tiles (a degenerate comparison:
    FD 0 says nothing about a generator). Contents are hashed only when names and sizes already agree."""
    if os.path.realpath(folder_a) == os.path.realpath(folder_b):
        return True
    files = [sorted(Path(p) for p in list_images(f)) for f in (folder_a, folder_b)]
    if [p.stat().st_size for p in files[0]] and \
            sorted(p.stat().st_size for p in files[0]) != sorted(p.stat().st_size for p in files[1]):
        return False
    digests = [sorted(hashlib.sha1(p.read_bytes()).hexdigest() for p in group) for group in files]
    return digests[0] == digests[1]


def score_extractors(names, score):
    """score(name) -> rows, for every extractor; one that is not available here (gated, offline, a package
    missing) is skipped with its reason, printed and returned, so the report lists it."""
    rows, skipped = [], []
    for name in names:
        try:
            rows += score(name)
        except Unavailable as e:
            print(f"skipped: {e}", file=sys.stderr)
            skipped.append(dict(extractor=name, error=str(e)))
    return rows, skipped
