"""H0-mini: the frozen encoder that conditions CytoSyn and is its REPA target (CytoSyn §3.1).

H0-mini (Bioptimus; a ViT-B/14 with 4 register tokens, distilled from H-optimus-0) is used twice in
training: its CLS token conditions the SiT, and its 16 x 16 patch tokens, resized to the SiT's 14 x 14
token grid, are the REPA alignment target, resized so that they can be precomputed once per tile.
`encoder_features` is that one path, for train.py, sample.py and the benchmark alike.

    python features.py --tiles TILES --out TOKENS           # what train.py --tokens reads, per tile
    python features.py --pooled lazyslide.npy --out TOKENS  # (N, 1536) LazySlide/TRIDENT features -> their CLS

Per tile, OUT/<stem>.npy holds the CLS token then the resized patch tokens, fp16 (1 + 196) x 768 x 2 bytes
= 303 KB at 224 px, about 12 TB for the paper's 40 M tiles; OUT/cls.npy (N, 768) is the CLS array
`sample.py --features` takes, with OUT/cls_names.txt (one tile name per row, or the pair is refused). The
benchmark's other extractors live in extractors.py. Hub weights get one attempt: offline
(HF_HUB_OFFLINE=1, or the hub does not answer) they come from the local cache alone, or fail in one line.

Left out: REPA's other alignment encoders (DINOv2, CLIP, MAE).
"""
import functools
import io
import os
import tarfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from torch.utils.data import DataLoader
from tqdm import tqdm

from sit import SiT_models, token_grid
from support.cli import (
    BATCH_SIZE,
    IMAGE_SIZE,
    SEED,
    ArgumentParser,
    InputError,
    add_device_args,
    add_workers_arg,
    processes,
    run,
)
from support.data import SlideTiles, check_finite_rows, decode_tile, read_npy, tile_stem
from support.hub import create_timm_model
from support.manifests import find_tiles
from support.outputs import atomic, save_npy
from support.tiles import IMAGE_EXTENSIONS, TILE_SIZE
from vae import latent_size, vae_models

# H0-mini's input normalisation (its model card; the same constants as H-optimus-0).
H0_MINI_MEAN = (0.707223, 0.578729, 0.703617)
H0_MINI_STD = (0.211883, 0.230117, 0.177517)
ENCODER_SIZE = 224  # H0-mini sees 224 x 224 tiles (16 x 16 patches of 14 px)
GATED_H0 = "gated: accept its licence on https://huggingface.co/bioptimus/H0-mini, then `hf auth login`"
_SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
# The encoders that can condition and align a SiT (H0-mini's token layout): hub name, offline architecture,
# its kwargs, what the hub load passes.
ENCODER_ARCHS = {
    # NOTE: the hub's config.json is authoritative with pretrained=True. Offline we build timm's DINOv2
    # ViT-B/14 + 4 registers with a SwiGLU MLP of DINOv2's width (2 x 2048 packed, mlp_ratio 16/3):
    # 86 M parameters and the (B, 261, 768) output H0-mini's model card documents.
    "h0-mini": ("hf-hub:bioptimus/H0-mini", "vit_base_patch14_reg4_dinov2",
                dict(img_size=224, num_classes=0, mlp_ratio=16 / 3, **_SWIGLU), _SWIGLU),
    # NOTE: not a pathology model: a random two-block ViT/14 with H0-mini's token layout (CLS, 4 registers,
    # 16 x 16 patches), the one small encoder of the repo: smoke runs, the demo and the tests, for
    # conditioning and alignment as for metrics. Random weights only, seeded.
    # NOTE: LayerScale at 1 (DINOv2 initialises it at 1e-5): at 1e-5 a random CLS token hardly sees the tile
    # (norm 0.006 after the final norm, cosine 0.99 between any two tiles), so nothing could condition on it.
    "tiny": (None, "vit_base_patch14_reg4_dinov2",
             dict(img_size=224, num_classes=0, embed_dim=48, depth=2, num_heads=3, init_values=1.0), None),
}
ENCODERS = tuple(ENCODER_ARCHS)
CLS_FILE, NAMES_FILE = "cls.npy", "cls_names.txt"  # what sample.py --features and evaluate.py take


def load_encoder(name="h0-mini", pretrained=True, seed=0):
    """The frozen conditioning/alignment encoder (H0-mini, or the random "tiny" one), in eval mode."""
    if name not in ENCODER_ARCHS:
        raise InputError(f"unknown encoder {name!r}; expected one of {list(ENCODERS)}")
    hub, arch, kwargs, hub_kwargs = ENCODER_ARCHS[name]
    return create_timm_model(name, hub, arch, kwargs, pretrained and hub is not None, seed, GATED_H0, hub_kwargs)


@torch.no_grad()
def encoder_features(encoder, images, token_grid=14):
    """Images (B, 3, H, W), uint8 or float in [0, 1] -> (cls (B, D), patches (B, token_grid^2, D)).

    Tiles that are not 224 px are resized to 224 first (bicubic, antialiased). The 16 x 16 patch
    tokens are resized to the SiT's token grid (14 x 14 for 224 px tiles) with bicubic
    interpolation and anti-aliasing, so that they can be precomputed once per tile (CytoSyn §3.1)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"the encoder expects RGB images (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if images.dtype != torch.uint8:
        lo, hi = torch.aminmax(x)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InputError(f"the encoder expects uint8 images or floats in [0, 1], got values in [{lo:.3g}, "
                             f"{hi:.3g}] (the VAE's [-1, 1] input is not the encoder's)")
    if x.shape[-2:] != (ENCODER_SIZE, ENCODER_SIZE):
        x = F.interpolate(x, size=(ENCODER_SIZE, ENCODER_SIZE), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(H0_MINI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(H0_MINI_STD, device=x.device).view(1, 3, 1, 1)
    tokens = encoder.forward_features((x - mean) / std)         # (B, 1 + 4 + 16*16, D), after the final norm
    cls, patches = tokens[:, 0], tokens[:, encoder.num_prefix_tokens:]
    return cls.float(), resize_tokens(patches.float(), token_grid)


def resize_tokens(tokens, token_grid):
    """(B, T, D) tokens on a square grid -> (B, token_grid^2, D), bicubic with anti-aliasing."""
    B, T, D = tokens.shape
    side = int(round(T ** 0.5))
    if side * side != T:
        raise InputError(f"cannot resize {T} tokens: not a square grid")
    if side == token_grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(B, D, side, side)                           # (B, D, 16, 16)
    x = F.interpolate(x, size=(token_grid, token_grid), mode="bicubic", antialias=True, align_corners=False)
    return x.flatten(2).transpose(1, 2)                                            # (B, token_grid^2, D)


# -------- Precomputed tokens (CytoSyn §3.1) ---------------------------------------------------------
def tile_batches(tiles, rank, world, done, size, resize, batch_size, num_workers):
    """This rank's share (r, r + world, ...) of the tiles not in `done` (stems) -> (batches of (stems, uint8
    (B, 3, S, S)), their count (None for shards), every tile's stem in order (None for shards))."""
    if tiles.kind == "files":
        names = [tile_stem(p) for p in tiles.items]
        if len(set(names)) != len(names):
            raise InputError("two tiles share a file name; features are stored by name: rename one")
        todo = [p for p in tiles.items[rank::world] if tile_stem(p) not in done]
        decode = functools.partial(decode_batch, size=size, resize=resize)
        return DataLoader(todo, batch_size, num_workers=num_workers, collate_fn=decode), len(todo), names
    if tiles.kind == "slides":
        rows, slides_dir, resample = tiles.items
        todo = [r for r in rows[rank::world] if r["name"] not in done]
        dataset = SlideTiles(todo, slides_dir, resample, size, resize)
        decode = functools.partial(decode_slide_batch, dataset=dataset)
        loader = DataLoader(range(len(todo)), batch_size, num_workers=num_workers, collate_fn=decode)
        return loader, len(todo), [r["name"] for r in rows]
    shards = tiles.items[rank::world]
    return (b for shard in shards for b in shard_batches(shard, size, resize, batch_size, done)), None, None


def decode_batch(paths, size, resize):
    return [tile_stem(p) for p in paths], torch.stack([decode_tile(p, p, size, resize) for p in paths])


def decode_slide_batch(indices, dataset):
    """(stems, uint8 (B, 3, S, S)) of a SlideTiles batch: the tiles read from their slides."""
    return [dataset.paths[i] for i in indices], torch.stack([dataset[i][0] for i in indices])


def shard_batches(path, size, resize, batch_size, done):
    """(stems, uint8 batch) from one tar shard, in member order; tiles already written are skipped."""
    stems, tiles = [], []
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            stem, ext = os.path.splitext(os.path.basename(member.name))
            if not member.isfile() or ext.lower() not in IMAGE_EXTENSIONS or stem in done:
                continue
            stems.append(stem)
            tiles.append(decode_tile(io.BytesIO(tar.extractfile(member).read()), f"{path}:{member.name}", size, resize))
            if len(tiles) == batch_size:
                yield stems, torch.stack(tiles)
                stems, tiles = [], []
    if tiles:
        yield stems, torch.stack(tiles)


def shard_names(path):
    """The tile stems of a tar shard, in member order (headers only)."""
    with tarfile.open(path, mode="r|*") as tar:
        return [tile_stem(m.name) for m in tar if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)]


def write_tokens(encoder, batches, out, grid, device, bar):
    """Per tile OUT/<stem>.npy: fp16 (1 + grid^2, D), the CLS token then the resized patch tokens."""
    for stems, tiles in batches:
        cls, patches = encoder_features(encoder, tiles.to(device), grid)    # (B, D), (B, T, D)
        tokens = torch.cat([cls[:, None], patches], 1).half().cpu().numpy()  # (B, 1 + T, D)
        for stem, array in zip(stems, tokens):
            save_npy(array, os.path.join(out, stem + ".npy"))
        bar.update(len(stems))


def write_cls_array(out, names):
    """OUT/cls.npy (N, D) float32 (the fp16 CLS tokens) and OUT/cls_names.txt, the tile stems in order."""
    cls = np.stack([np.load(os.path.join(out, n + ".npy"), mmap_mode="r")[0] for n in names]).astype(np.float32)
    save_npy(cls, os.path.join(out, CLS_FILE))
    write_names(out, names)
    return cls


def write_names(out, names):
    """OUT/cls_names.txt: the tile stems of cls.npy's rows, one per line."""
    with atomic(os.path.join(out, NAMES_FILE)) as tmp, open(tmp, "w") as f:
        f.write("".join(n + "\n" for n in names))


def read_cls_names(path, rows):
    """The tile names of a CLS array `path` of `rows` rows: OUT/cls_names.txt beside OUT/cls.npy, as this
    file writes them (None when there is none). Refused when it does not name exactly one tile per row:
    which name goes with which features would be a guess (files of two runs, or a copy cut short)."""
    names_path = os.path.join(os.path.dirname(os.path.abspath(path)), NAMES_FILE)
    if os.path.basename(path) != CLS_FILE or not os.path.exists(names_path):
        return None
    with open(names_path) as f:
        names = f.read().splitlines()
    if len(names) != rows:
        raise InputError(f"{names_path} names {len(names)} tiles but {path} holds {rows} rows of features: they are "
                         f"not one pair (files of two runs, or a copy cut short); write both again with features.py")
    return names


def import_pooled(path, out, dim=768):
    """LazySlide's / TRIDENT's H0-mini features, CLS then the mean of the patch tokens ((N, 1536), .npy or
    .h5 `features`) -> OUT/cls.npy, the first `dim` columns (the CLS token CytoSyn conditions on)."""
    if path.endswith((".h5", ".hdf5")):
        import h5py
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise InputError(f"{path} has no 'features' dataset (found {list(f)}); TRIDENT writes 'features'")
            feats = f["features"][:]
            names = [f"{x}_{y}" for x, y in f["coords"][:]] if "coords" in f else None
        if names is not None and len(names) != len(feats):
            raise InputError(f"{path} holds {len(feats)} features but {len(names)} coords: which patch is which "
                             f"would be a guess; export the features and their coords together")
    else:
        feats, names = read_npy(path, "--pooled"), None
    if feats.ndim != 2 or feats.shape[1] not in (dim, 2 * dim):
        raise InputError(f"{path} has shape {feats.shape}: expected (N, {dim}) CLS or (N, {2 * dim}) CLS + mean "
                         f"patch H0-mini features")
    check_finite_rows(feats, f"--pooled {path}")  # before anything is written
    names = names or [f"{i:06d}" for i in range(len(feats))]
    cls = np.ascontiguousarray(feats[:, :dim], dtype=np.float32)
    os.makedirs(out, exist_ok=True)
    save_npy(cls, os.path.join(out, CLS_FILE))
    write_names(out, names)
    took = ("the first 768 of 1536 dims (the CLS token; the rest is the mean of the patch tokens, which "
            "CytoSyn does not condition on)" if feats.shape[1] == 2 * dim else "all 768 dims (CLS)")
    print(f"{path}: took {took} of {len(cls)} tiles -> {out}/{CLS_FILE} (no patch tokens: sampling only, "
          f"train.py --tokens needs `python features.py --tiles TILES --out OUT`)")
    return cls


def write_features(args, rank, world, device):
    """This rank's share of the tiles (r, r + world, ...); rank 0 then writes the CLS array."""
    tiles = find_tiles(args.tiles, args.slides)
    os.makedirs(args.out, exist_ok=True)
    done = {tile_stem(f) for f in os.listdir(args.out) if f.endswith(".npy") and f != CLS_FILE}
    encoder = load_encoder(args.encoder, pretrained=not args.random_weights, seed=args.seed).to(device)
    grid = token_grid(args.model, latent_size(args.vae, args.image_size))  # the SiT's grid for this tile size
    batches, total, names = tile_batches(tiles, rank, world, done, args.image_size, args.resize, args.batch_size,
                                         args.num_workers)
    print(f"rank {rank}/{world}: {tiles.describe()}, {len(done)} tiles already in {args.out}", flush=True)
    with tqdm(total=total, unit="tile", disable=rank != 0, desc="tokens") as bar:
        write_tokens(encoder, batches, args.out, grid, device, bar)
    if world > 1:
        dist.barrier()  # every rank's tokens are written before rank 0 reads them all
    if rank == 0:
        names = names if tiles.kind != "shards" else [n for shard in tiles.items for n in shard_names(shard)]
        cls = write_cls_array(args.out, names)
        per_tile = (1 + grid * grid) * cls.shape[1] * 2
        print(f"done: {len(names)} x (1 + {grid}x{grid}, {cls.shape[1]}) fp16 tokens ({per_tile / 1e3:.0f} KB per "
              f"tile) in {args.out}/, and {args.out}/{CLS_FILE} {cls.shape} for sample.py --features")


def build_parser():
    p = ArgumentParser(description="Precompute H0-mini tokens for train.py --tokens (CytoSyn §3.1), "
                                            "or import (N, 1536) LazySlide/TRIDENT features as CLS for sampling.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tiles", help="what train.py --tiles takes: tiling.py's output or its manifest.csv, a tile "
                                      "folder, tar shards")
    what.add_argument("--pooled", metavar="FILE", help="an (N, 1536) or (N, 768) .npy or .h5 of H0-mini features "
                                                       "(LazySlide, TRIDENT): their CLS -> OUT/cls.npy")
    p.add_argument("--out", required=True, help="output folder: <tile stem>.npy per tile, cls.npy and cls_names.txt")
    p.add_argument("--slides", default=None, metavar="SLIDES_DIR",
                   help="read the tiles of a tiling.py manifest from its slides (train.py --slides): no PNG copy")
    p.add_argument("--encoder", choices=ENCODERS, default="h0-mini", help="tiny: the random seeded test encoder")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights instead of the hub's (pipeline checks, offline)")
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2", help="the SiT the tokens are for")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4", help="the VAE the tokens are for")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=TILE_SIZE, help="train.py's --image-size")
    p.add_argument("--resize", choices=["crop", "scale"], default=None, help="train.py's --resize")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=64)
    add_workers_arg(p)
    p.add_argument("--seed", type=SEED, default=0, help="the random encoder's seed")
    add_device_args(p, precision=False)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.pooled:
        import_pooled(args.pooled, args.out)
        return 0
    with processes(args.device, args.num_workers) as (rank, world, device):
        write_features(args, rank, world, device)
    return 0


if __name__ == "__main__":
    run(main)
