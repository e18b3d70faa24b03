"""What an encoder sees of a tile: H0-mini for conditioning and alignment, and every feature extractor
of the benchmark (CytoSyn §3.1, §4.1).

H0-mini (Bioptimus; a ViT-B/14 with 4 register tokens, distilled from H-optimus-0) is frozen and used
twice in training: its CLS token conditions the SiT, and its patch tokens, resized from 16 x 16 to the
SiT's 14 x 14 token grid, are the REPA alignment target (CytoSyn §3.1: resized so that they can be
precomputed once per tile). `encoder_features` is that one path, for train.py, sample.py and metrics.py.

The benchmark's extractors (Inception, DINOv2, H-optimus-0, UNI2-h, Virchow 2, UNI, H0-mini, ...) live
in one registry, `EXTRACTORS`: what `pretrained=True` loads from the hub, what architecture
`pretrained=False` builds offline with random weights (tests, pipeline checks), the input size, the
resize kernel, the normalisation and the pooling. Every tile reaches them as uint8, or floats in [0, 1].

`python features.py TILES OUT` precomputes, per tile, what `train.py --features OUT` reads: the CLS token
and the patch tokens resized to the token grid, fp16 (1 + 196) x 768 x 2 bytes = 303 KB per 224 px tile,
about 12 TB for 40 M tiles; also OUT/cls.npy (N, 768), the CLS array `sample.py --features` takes.

Left out: CONCH-v1 (needs the `conch` package) and Phikon-v2 (a `transformers` model), which are
registered but report that they are unavailable; REPA's other alignment encoders (DINOv2, CLIP, MAE).
"""
import argparse
import contextlib
import functools
import io
import os
import sys
import tarfile
from dataclasses import asdict, dataclass, field

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from tqdm import tqdm

from support.cli import error_line, number_in, processes
from support.data import IMAGE_EXTENSIONS, SlideTiles, decode_tile, find_slide_tiles, find_tiles

# H0-mini's input normalisation (its model card; the same constants as H-optimus-0).
H0_MINI_MEAN = (0.707223, 0.578729, 0.703617)
H0_MINI_STD = (0.211883, 0.230117, 0.177517)
ENCODER_SIZE = 224  # H0-mini sees 224 x 224 tiles (16 x 16 patches of 14 px)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's inception_v3.tv_in1k takes [-1, 1] inputs
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
GATED = "gated: accept its licence on https://huggingface.co/{}, then `hf auth login` (or set HF_TOKEN)"
_SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)


@dataclass(frozen=True)
class ExtractorSpec:
    hub: str | None  # what pretrained=True loads: a timm name, "hf-hub:org/repo", or a hub repo
    arch: str | None  # the timm architecture pretrained=False builds, with the same kwargs
    kwargs: dict = field(default_factory=dict)
    input_size: int = 224
    kernel: str = "bicubic"  # resize kernel when a tile is not input_size px
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    pooling: str = "cls"  # "cls" | "cls+patch_mean" | "head" (timm's own global pool)
    dim: int = 0
    backend: str = "timm"  # "timm" | "h0" (through encoder_features, as in training) | "none"
    access: str = "public weights: check the network or the Hugging Face cache (HF_HOME)"  # or how to get them
    bf16_ok: bool = True  # may run under bf16 autocast on GPU
    hub_kwargs: dict | None = None  # what pretrained=True passes, where the model card says other than kwargs
    resize_inside: bool = False  # the network resizes its input itself: tiles reach it at their own size


EXTRACTORS = {
    # The paper's Inception (through Jiralerspong et al.'s code): pytorch-fid's InceptionV3([pool3],
    # resize_input=True, normalize_input=True) with the FID weights (pt_inception-2015-12-05, fetched by
    # pytorch-fid on first use). [0, 1] input at the tile's own size, bilinear resize to 299 inside, 2048-d.
    "fid-inception": ExtractorSpec("pt_inception-2015-12-05 (pytorch-fid)", "pytorch-fid InceptionV3", {}, 299,
                                   "bilinear", dim=2048, backend="pytorch-fid", bf16_ok=False, resize_inside=True,
                                   access="pytorch-fid downloads its FID weights from github.com on first use"),
    # NOTE: timm's torchvision Inception is another network than the paper's (fid-inception): its FD is
    # comparable with itself, not with Table 2.
    "inception": ExtractorSpec("inception_v3.tv_in1k", "inception_v3", dict(num_classes=0), 299,
                               "bilinear", INCEPTION_MEAN, INCEPTION_STD, "head", 2048, bf16_ok=False),
    "dinov2": ExtractorSpec("vit_base_patch14_dinov2.lvd142m", "vit_base_patch14_dinov2",
                            dict(img_size=224, num_classes=0), dim=768),
    "h-optimus-0": ExtractorSpec(
        "hf-hub:bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2",
        dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
        mean=H0_MINI_MEAN, std=H0_MINI_STD, dim=1536, access=GATED.format("bioptimus/H-optimus-0")),
    "uni2-h": ExtractorSpec(
        "hf-hub:MahmoodLab/UNI2-h", "vit_giant_patch14_224",  # the kwargs fix every shape
        dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
             dynamic_img_size=True, **_SWIGLU),
        dim=1536, access=GATED.format("MahmoodLab/UNI2-h")),
    "virchow2": ExtractorSpec(
        "hf-hub:paige-ai/Virchow2", "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
             global_pool="", dynamic_img_size=True, **_SWIGLU),
        pooling="cls+patch_mean", dim=2560, access=GATED.format("paige-ai/Virchow2")),
    "uni": ExtractorSpec(
        "hf-hub:MahmoodLab/uni", "vit_large_patch16_224",
        dict(img_size=224, init_values=1e-5, dynamic_img_size=True, num_classes=0),
        dim=1024, access=GATED.format("MahmoodLab/UNI")),
    # NOTE: Phikon-v2 is a transformers Dinov2Model, not a timm model, and no weight mapping onto timm's
    # ViT-L/16 has been checked here; it stays unavailable rather than approximated.
    "phikon-v2": ExtractorSpec("owkin/phikon-v2", None, dim=1024, backend="none", access="needs "
                               "`transformers` (owkin/phikon-v2: CLS of last_hidden_state), not wired in"),
    "conch-v1": ExtractorSpec("MahmoodLab/CONCH", None, input_size=448, mean=CLIP_MEAN, std=CLIP_STD,
                              dim=512, backend="none", access="needs the `conch` package "
                              "(github.com/mahmoodlab/CONCH) and " + GATED.format("MahmoodLab/CONCH")),
    # H0-mini, built and normalised exactly as training conditions on it (encoder_features).
    # NOTE: the hub's config.json is authoritative with pretrained=True. Offline we build timm's DINOv2
    # ViT-B/14 + 4 registers with a SwiGLU MLP of DINOv2's width (2 x 2048 packed, mlp_ratio 16/3):
    # 86 M parameters and the (B, 261, 768) output H0-mini's model card documents.
    "h0-mini": ExtractorSpec("hf-hub:bioptimus/H0-mini", "vit_base_patch14_reg4_dinov2",
                             dict(img_size=224, num_classes=0, mlp_ratio=16 / 3, **_SWIGLU),
                             mean=H0_MINI_MEAN, std=H0_MINI_STD, dim=768, backend="h0",
                             access=GATED.format("bioptimus/H0-mini"), hub_kwargs=_SWIGLU),
    # NOTE: not a pathology model: a random two-block ViT/14 with H0-mini's token layout (CLS, 4 registers,
    # 16 x 16 patches), the one small encoder of the repo: smoke runs, the demo and the tests, for
    # conditioning and alignment as for metrics. Random weights only, seeded (`build_extractor`).
    # NOTE: LayerScale at 1 (DINOv2 initialises it at 1e-5): at 1e-5 a random CLS token hardly sees the tile
    # (norm 0.006 after the final norm, cosine 0.99 between any two tiles), so nothing could condition on it.
    "tiny": ExtractorSpec(None, "vit_base_patch14_reg4_dinov2",
                          dict(img_size=224, num_classes=0, embed_dim=48, depth=2, num_heads=3, init_values=1.0),
                          mean=H0_MINI_MEAN, std=H0_MINI_STD, dim=48, backend="h0"),
}
ENCODERS = ("h0-mini", "tiny")  # the extractors that can condition and align a SiT (H0-mini's token layout)


class ExtractorUnavailable(RuntimeError):
    """The weights or the package an extractor needs are not here; the message says how to get them."""


def spec_record(spec):
    """The registry entry as plain JSON (layer classes by name)."""
    record = asdict(spec)
    record["kwargs"] = {k: getattr(v, "__name__", v) for k, v in spec.kwargs.items()}
    return record


def weights_id(name, pretrained, seed=0):
    """What identifies the weights that make an extractor's features: its hub name, or the seed of its
    random weights. Feature caches are keyed by it."""
    return f"{EXTRACTORS[name].hub}" if pretrained else f"random(seed={seed})"


def create_model(name, pretrained=True, seed=0, device="cpu"):
    """The frozen timm model of a registered extractor, in eval mode. `pretrained=True` downloads it from
    the hub exactly as its model card does (gated ones: accept the licence, then `hf auth login`);
    `pretrained=False` builds the same architecture with random weights drawn from `seed`, so two
    runs of a pipeline check see the same features. device="meta" builds it without memory."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; choose from {', '.join(EXTRACTORS)}")
    spec, device = EXTRACTORS[name], torch.device(device)
    if spec.backend == "none":
        raise ExtractorUnavailable(f"{name}: not available in this build: {spec.access}")
    if pretrained and spec.hub is None:
        raise ExtractorUnavailable(f"{name}: has no pretrained weights; use --random-weights")
    if spec.backend == "pytorch-fid":
        return fid_inception(pretrained, seed).to(device)
    if pretrained:
        try:
            kwargs = spec.kwargs if spec.hub_kwargs is None else spec.hub_kwargs
            model = timm.create_model(spec.hub, pretrained=True, **kwargs)
        except Exception as err:  # gated repo, no token, no network: say which, and what to do
            raise ExtractorUnavailable(f"{name}: could not load {spec.hub} ({hub_failure(err)}); {spec.access}; "
                                       f"or use --random-weights to test the pipeline") from err
    else:
        with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
            with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's random stream
                torch.manual_seed(seed)
                model = timm.create_model(spec.arch, pretrained=False, **spec.kwargs)
    return model.eval().requires_grad_(False).to(device)


def fid_inception(pretrained=True, seed=0):
    """pytorch-fid's FID Inception, pool3 (2048-d), in eval mode. pretrained=False builds the same network
    (the FID blocks, 1008 classes) with seeded random weights, without fetching the FID weights."""
    from unittest import mock

    from pytorch_fid import inception as fid_module
    if pretrained:
        try:
            model = fid_module.InceptionV3([3], resize_input=True, normalize_input=True)
        except Exception as err:
            raise ExtractorUnavailable(f"fid-inception: could not fetch pytorch-fid's FID weights "
                                       f"({hub_failure(err)}); or use --random-weights to test the pipeline") from err
        return model.eval().requires_grad_(False)
    # fid_inception_v3() builds the FID architecture and then loads the downloaded weights: skip the load
    with torch.random.fork_rng(devices=[]), \
            mock.patch.object(fid_module, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fid_module.torchvision.models.Inception3, "load_state_dict", lambda *a, **k: None):
        torch.manual_seed(seed)
        model = fid_module.InceptionV3([3], resize_input=True, normalize_input=True)
    return model.eval().requires_grad_(False)


def hub_failure(err):
    """A failed hub download, told apart: no network, or no access to a gated model."""
    text = f"{type(err).__name__}: {err}"
    if any(s in text for s in ("401", "403", "GatedRepo", "gated", "Unauthorized", "Forbidden")):
        return f"no access: {text[:200]}"
    if any(s in text for s in ("Connection", "Timeout", "resolve", "offline", "OfflineMode", "LocalEntryNotFound",
                               "Network", "unreachable")):
        return f"network unreachable (offline?): {text[:200]}"
    return text[:200]


def load_encoder(name="h0-mini", pretrained=True, seed=0):
    """The frozen conditioning/alignment encoder (H0-mini, or the random "tiny" one), in eval mode."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {list(ENCODERS)}")
    return create_model(name, pretrained=pretrained and EXTRACTORS[name].hub is not None, seed=seed)


@torch.no_grad()
def encoder_features(encoder, images, token_grid=14):
    """Images (B, 3, H, W), uint8 or float in [0, 1] -> (cls (B, D), patches (B, token_grid^2, D)).

    Tiles that are not 224 px are resized to 224 first (bicubic, antialiased). The 16 x 16 patch
    tokens are resized to the SiT's token grid (14 x 14 for 224 px tiles) with bicubic
    interpolation and anti-aliasing, so that they can be precomputed once per tile (CytoSyn §3.1)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the encoder expects RGB images (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if images.dtype != torch.uint8:
        lo, hi = torch.aminmax(x)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"the encoder expects uint8 images or floats in [0, 1], got values in [{lo:.3g}, "
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
        raise ValueError(f"cannot resize {T} tokens: not a square grid")
    if side == token_grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(B, D, side, side)                           # (B, D, 16, 16)
    x = F.interpolate(x, size=(token_grid, token_grid), mode="bicubic", antialias=True, align_corners=False)
    return x.flatten(2).transpose(1, 2)                                            # (B, token_grid^2, D)


def pool_tokens(tokens, pooling, num_prefix):
    """Final-norm tokens (B, T, D), T = CLS + registers + patches -> (B, D) or (B, 2D)."""
    if pooling == "cls":
        return tokens[:, 0]  # (B, D)
    if pooling == "cls+patch_mean":  # Virchow 2: CLS ‖ mean of the patch tokens, registers left out
        return torch.cat([tokens[:, 0], tokens[:, num_prefix:].mean(1)], dim=1)  # (B, 2D)
    raise ValueError(f"unknown pooling {pooling!r}")


class Extractor:
    """A frozen model with its normalisation and pooling: embed(x in [0, 1], (B, 3, S, S)) -> (B, dim)."""

    def __init__(self, name, model, weights="pretrained"):
        self.name, self.spec, self.model, self.weights = name, EXTRACTORS[name], model, weights
        device = next(model.parameters()).device
        self.num_prefix = getattr(model, "num_prefix_tokens", 0)
        self.mean, self.std = (torch.tensor(v, device=device).view(1, 3, 1, 1)
                               for v in (self.spec.mean, self.spec.std))

    @torch.no_grad()
    def embed(self, x, bf16=False):
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16 and x.device.type == "cuda"):
            if self.spec.backend == "h0":  # normalises inside, as in training; CLS
                return encoder_features(self.model, x)[0].float()
            if self.spec.backend == "pytorch-fid":  # [0, 1] in; resizes and normalises inside
                return self.model(x)[0].flatten(1).float()  # (B, 2048, 1, 1) -> (B, 2048)
            x = (x - self.mean) / self.std
            if self.spec.pooling == "head":
                out = self.model(x)  # (B, D) timm global pool, num_classes=0
            else:
                out = pool_tokens(self.model.forward_features(x), self.spec.pooling, self.num_prefix)
        return out.float()


def build_extractor(name, pretrained=True, device="cpu", seed=0):
    """A registered extractor; pretrained=False gives the same architecture with random weights from
    `seed` (device="meta" builds it without memory, for shape checks)."""
    model = create_model(name, pretrained, seed, device)
    return Extractor(name, model, weights_id(name, pretrained, seed))


# -------- Precomputed tokens (CytoSyn §3.1): python features.py TILES OUT -------------------------
TOKEN_STRIDE = 16  # image px per SiT token: the VAE's factor 8 x the SiT's patch 2 (every preset)
CLS_FILE, NAMES_FILE = "cls.npy", "cls_names.txt"  # what sample.py --features and evaluate.py take


def save_npy_atomic(path, array):
    """np.save to a temporary name, then a rename: a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def tile_stem(name):
    return os.path.splitext(os.path.basename(name))[0]


def decoded_files(paths, args):
    """(stems, uint8 (B, 3, S, S)) batches of tile files, decoded in DataLoader workers as in training."""
    decode = functools.partial(decode_batch, size=args.image_size, resize=args.resize)
    return torch.utils.data.DataLoader(paths, args.batch_size, num_workers=args.workers, collate_fn=decode)


def decode_batch(paths, size, resize):
    return [tile_stem(p) for p in paths], torch.stack([decode_tile(p, p, size, resize) for p in paths])


def decode_slide_batch(indices, dataset):
    """(stems, uint8 (B, 3, S, S)) of a SlideTiles batch: the tiles read from their slides."""
    return [dataset.paths[i] for i in indices], torch.stack([dataset[i][0] for i in indices])


def decoded_slides(rows, slides_dir, resample, args):
    """Batches of a manifest's tiles read from the slides (no PNG copy), in DataLoader workers."""
    dataset = SlideTiles(rows, slides_dir, resample, args.image_size, args.resize)
    decode = functools.partial(decode_slide_batch, dataset=dataset)
    return torch.utils.data.DataLoader(range(len(rows)), args.batch_size, num_workers=args.workers, collate_fn=decode)


def decoded_shard(path, args, done):
    """(stems, uint8 batch) from one tar shard, in member order; tiles already written are skipped."""
    stems, tiles = [], []
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            stem, ext = os.path.splitext(os.path.basename(member.name))
            if not member.isfile() or ext.lower() not in IMAGE_EXTENSIONS or stem in done:
                continue
            data = io.BytesIO(tar.extractfile(member).read())
            stems.append(stem)
            tiles.append(decode_tile(data, f"{path}:{member.name}", args.image_size, args.resize))
            if len(tiles) == args.batch_size:
                yield stems, torch.stack(tiles)
                stems, tiles = [], []
    if tiles:
        yield stems, torch.stack(tiles)


def shard_names(path):
    """The tile stems of a tar shard, in member order (headers only)."""
    with tarfile.open(path, mode="r|*") as tar:
        return [tile_stem(m.name) for m in tar if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)]


def write_tokens(encoder, batches, out, token_grid, device, bar):
    """Per tile OUT/<stem>.npy: fp16 (1 + token_grid^2, D), the CLS token then the resized patch tokens."""
    for stems, tiles in batches:
        cls, patches = encoder_features(encoder, tiles.to(device), token_grid)  # (B, D), (B, T, D)
        tokens = torch.cat([cls[:, None], patches], 1).half().cpu().numpy()   # (B, 1 + T, D)
        for stem, array in zip(stems, tokens):
            save_npy_atomic(os.path.join(out, stem + ".npy"), array)
        bar.update(len(stems))


def write_cls_array(out, names):
    """OUT/cls.npy (N, D) float32 (the fp16 CLS tokens) and OUT/cls_names.txt, the tile stems in order."""
    cls = np.stack([np.load(os.path.join(out, n + ".npy"), mmap_mode="r")[0] for n in names]).astype(np.float32)
    save_npy_atomic(os.path.join(out, CLS_FILE), cls)
    with open(os.path.join(out, NAMES_FILE + ".tmp"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    os.replace(os.path.join(out, NAMES_FILE + ".tmp"), os.path.join(out, NAMES_FILE))
    return cls


def import_pooled(path, out, dim=768):
    """LazySlide's / TRIDENT's H0-mini features, CLS then the mean of the patch tokens ((N, 1536), .npy or
    .h5 `features`) -> OUT/cls.npy, the first `dim` columns (the CLS token CytoSyn conditions on)."""
    if path.endswith((".h5", ".hdf5")):
        import h5py
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path} has no 'features' dataset (found {list(f)}); TRIDENT writes 'features'")
            feats = f["features"][:]
            names = [f"{x}_{y}" for x, y in f["coords"][:]] if "coords" in f else None
    else:
        feats, names = np.load(path), None
    if feats.ndim != 2 or feats.shape[1] not in (dim, 2 * dim):
        raise ValueError(f"{path} has shape {feats.shape}: expected (N, {dim}) CLS or (N, {2 * dim}) CLS + mean "
                         f"patch H0-mini features")
    names = names or [f"{i:06d}" for i in range(len(feats))]
    cls = np.ascontiguousarray(feats[:, :dim], dtype=np.float32)
    os.makedirs(out, exist_ok=True)
    save_npy_atomic(os.path.join(out, CLS_FILE), cls)
    with open(os.path.join(out, NAMES_FILE), "w") as f:
        f.write("".join(n + "\n" for n in names))
    took = ("the first 768 of 1536 dims (the CLS token; the rest is the mean of the patch tokens, which "
            "CytoSyn does not condition on)" if feats.shape[1] == 2 * dim else "all 768 dims (CLS)")
    print(f"{path}: took {took} of {len(cls)} tiles -> {out}/{CLS_FILE} (no patch tokens: sampling only, "
          f"train.py --features needs `python features.py TILES OUT`)")
    return cls


def precompute(args):
    """Every tile of --data's kinds -> OUT/<stem>.npy tokens and OUT/cls.npy; resumable, split over ranks."""
    with processes(torch.cuda.is_available() and args.device != "cpu") as (rank, world, device):
        device = torch.device(args.device) if args.device and args.device != "cpu" else device
        write_features(args, rank, world, device)


def write_features(args, rank, world, device):
    """This rank's share of the tiles (r, r + world, ...); rank 0 then writes the CLS array."""
    kind, items = find_slide_tiles(args.tiles, args.slides) if args.slides else find_tiles(args.tiles)
    os.makedirs(args.out, exist_ok=True)
    done = {tile_stem(f) for f in os.listdir(args.out) if f.endswith(".npy") and f != CLS_FILE}
    encoder = load_encoder(args.encoder, pretrained=not args.random_weights, seed=args.seed).to(device)
    grid = args.token_grid or args.image_size // TOKEN_STRIDE
    if kind == "files":
        names = [tile_stem(p) for p in items]
        if len(set(names)) != len(names):
            raise ValueError(f"{args.tiles}: two tiles share a file name; features are stored by name")
        todo = [p for p in items[rank::world] if tile_stem(p) not in done]
        batches, total = decoded_files(todo, args), len(todo)
    elif kind == "slides":
        rows, slides_dir, resample = items
        names = [r["name"] for r in rows]
        todo = [r for r in rows[rank::world] if r["name"] not in done]
        batches, total = decoded_slides(todo, slides_dir, resample, args), len(todo)
    else:
        todo = items[rank::world]
        batches = (b for shard in todo for b in decoded_shard(shard, args, done))
        total = None
    count = f"{len(names)} tiles" if kind != "shards" else f"{len(items)} tar shards"
    print(f"rank {rank}/{world}: {count}{' read from their slides' if kind == 'slides' else ''}, {len(done)} tiles "
          f"already in {args.out}", flush=True)
    with tqdm(total=total, unit="tile", disable=rank != 0, desc="tokens") as bar:
        write_tokens(encoder, batches, args.out, grid, device, bar)
    if world > 1:
        dist.barrier()  # every rank's tokens are written before rank 0 reads them all
    if rank == 0:
        names = names if kind != "shards" else [n for shard in items for n in shard_names(shard)]
        cls = write_cls_array(args.out, names)
        per_tile = (1 + grid * grid) * cls.shape[1] * 2
        print(f"done: {len(names)} x (1 + {grid}x{grid}, {cls.shape[1]}) fp16 tokens ({per_tile / 1e3:.0f} KB per "
              f"tile) in {args.out}/, and {args.out}/{CLS_FILE} {cls.shape} for sample.py --features")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Precompute H0-mini tokens for train.py --features (CytoSyn §3.1), "
                                            "or import (N, 1536) LazySlide/TRIDENT features as CLS for sampling.")
    p.add_argument("tiles", help="what train.py --data takes (a tile folder, a manifest .csv, tar shards), or an "
                                 "(N, 1536) / (N, 768) .npy or .h5 of H0-mini features to import")
    p.add_argument("out", help="output folder: <tile stem>.npy per tile, cls.npy and cls_names.txt")
    p.add_argument("--slides", default=None, metavar="SLIDES_DIR",
                   help="read the tiles of a tiling.py manifest from its slides (train.py --slides): no PNG copy")
    p.add_argument("--encoder", choices=ENCODERS, default="h0-mini", help="tiny: the random seeded test encoder")
    p.add_argument("--random-weights", action="store_true", help="untrained encoder (pipeline tests)")
    p.add_argument("--image-size", type=number_in(int, 16, 4096), default=224, help="train.py's --image-size")
    p.add_argument("--resize", choices=["crop", "scale"], default=None, help="train.py's --resize")
    p.add_argument("--token-grid", type=number_in(int, 1, 256), default=None,
                   help=f"side of the SiT's token grid (default: image size / {TOKEN_STRIDE}, 14 for 224 px)")
    p.add_argument("--batch-size", type=number_in(int, 1, 100_000), default=64)
    p.add_argument("--workers", type=number_in(int, 0, 256), default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=number_in(int, 0, 2**63 - 1), default=0, help="the random encoder's seed")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if os.path.isfile(args.tiles) and args.tiles.endswith((".npy", ".h5", ".hdf5")):
            import_pooled(args.tiles, args.out)
        else:
            precompute(args)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"features.py: error: {error_line(err)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
