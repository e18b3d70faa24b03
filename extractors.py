"""The feature extractors of the benchmark (CytoSyn §4.1), in one registry: what each sees of a tile.

Each `ExtractorSpec` says what `pretrained=True` loads from the hub, what architecture `pretrained=False`
builds offline with seeded random weights (tests, pipeline checks), the input size, the resize kernel,
the normalisation and the pooling. Tiles reach every extractor as uint8 or floats in [0, 1].
H0-mini and the "tiny" test encoder come from features.py, through the very function training uses.

Left out: CONCH-v1 (needs the `conch` package) and Phikon-v2 (a `transformers` model), which are
registered but report that they are unavailable.
"""
import contextlib
import os
from dataclasses import asdict, dataclass, field

import torch
import torchvision
from pytorch_fid import inception as fid_module
from timm.layers import SwiGLUPacked

from features import ENCODERS, H0_MINI_MEAN, H0_MINI_STD, encoder_features, load_encoder
from support.cli import InputError, Unavailable
from support.hub import WITHOUT_WEIGHTS, create_timm_model, hub_failure, reachable

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
    backend: str = "timm"  # "timm" | "encoder" (features.encoder_features, as in training) | "pytorch-fid" | "none"
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
    # timm's torchvision Inception is another network than the paper's (fid-inception): its FD is
    # comparable with itself, not with Table 2. Its constants are timm's pretrained configuration's.
    "inception": ExtractorSpec("inception_v3.tv_in1k", "inception_v3", dict(num_classes=0), 299,
                               "bicubic", INCEPTION_MEAN, INCEPTION_STD, "head", 2048, bf16_ok=False),
    # NOTE: timm's configuration of these weights says 518 px; the tiles are 224 px and FD in DINOv2's space is
    # computed at 224 px (Stein et al. 2023), so the network is built for 224 (timm resamples its position
    # embeddings on load).
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
        kernel="bilinear", dim=1536, access=GATED.format("MahmoodLab/UNI2-h")),  # the card's Resize: bilinear
    "virchow2": ExtractorSpec(
        "hf-hub:paige-ai/Virchow2", "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
             global_pool="", dynamic_img_size=True, **_SWIGLU),
        pooling="cls+patch_mean", dim=2560, access=GATED.format("paige-ai/Virchow2")),
    "uni": ExtractorSpec(
        "hf-hub:MahmoodLab/uni", "vit_large_patch16_224",
        dict(img_size=224, init_values=1e-5, dynamic_img_size=True, num_classes=0),
        kernel="bilinear", dim=1024, access=GATED.format("MahmoodLab/UNI")),  # the card's Resize: bilinear
    # NOTE: Phikon-v2 is a transformers Dinov2Model, not a timm model, and no weight mapping onto timm's
    # ViT-L/16 has been checked here; it stays unavailable rather than approximated.
    "phikon-v2": ExtractorSpec("owkin/phikon-v2", None, dim=1024, backend="none", access="needs "
                               "`transformers` (owkin/phikon-v2: CLS of last_hidden_state), not wired in"),
    "conch-v1": ExtractorSpec("MahmoodLab/CONCH", None, input_size=448, mean=CLIP_MEAN, std=CLIP_STD,
                              dim=512, backend="none", access="needs the `conch` package "
                              "(github.com/mahmoodlab/CONCH) and " + GATED.format("MahmoodLab/CONCH")),
    # H0-mini and the random "tiny" encoder, built and normalised exactly as training conditions on them.
    "h0-mini": ExtractorSpec("hf-hub:bioptimus/H0-mini", "H0-mini (features.py)", mean=H0_MINI_MEAN,
                             std=H0_MINI_STD, dim=768, backend="encoder", access=GATED.format("bioptimus/H0-mini")),
    "tiny": ExtractorSpec(None, "tiny (features.py)", mean=H0_MINI_MEAN, std=H0_MINI_STD, dim=48,
                          backend="encoder"),
}
assert all(EXTRACTORS[name].backend == "encoder" for name in ENCODERS)


def spec_record(spec):
    """The registry entry as plain JSON (layer classes by name)."""
    record = asdict(spec)
    record["kwargs"] = {k: getattr(v, "__name__", v) for k, v in spec.kwargs.items()}
    return record


def weights_id(name, pretrained, seed=0):
    """What identifies the weights that make an extractor's features: its hub name, or the seed of its
    random weights. Feature caches are keyed by it."""
    return f"{EXTRACTORS[name].hub}" if pretrained else f"random(seed={seed})"


def create_extractor_model(name, pretrained=True, seed=0, device="cpu"):
    """The frozen model of a registered extractor, in eval mode. `pretrained=True` downloads it from the hub
    exactly as its model card does (gated ones: accept the licence, then `hf auth login`);
    `pretrained=False` builds the same architecture with random weights drawn from `seed`, so two runs of
    a pipeline check see the same features. device="meta" builds it without memory."""
    if name not in EXTRACTORS:
        raise InputError(f"unknown extractor {name!r}; choose from {', '.join(EXTRACTORS)}")
    spec, device = EXTRACTORS[name], torch.device(device)
    if spec.backend == "none":
        raise Unavailable(f"{name}: not available in this build: {spec.access}")
    if pretrained and spec.hub is None:
        raise Unavailable(f"{name}: has no pretrained weights; use --random-weights")
    if spec.backend == "encoder":
        return load_encoder(name, pretrained, seed).to(device)
    if spec.backend == "pytorch-fid":
        return fid_inception(pretrained, seed).to(device)
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model = create_timm_model(name, spec.hub, spec.arch, spec.kwargs, pretrained, seed, spec.access,
                                  spec.hub_kwargs)
    return model.to(device)


def fid_inception(pretrained=True, seed=0):
    """pytorch-fid's FID Inception, pool3 (2048-d), in eval mode. pretrained=False assembles the same network
    (torchvision's Inception v3 with 1008 classes and pytorch-fid's FID blocks, as pytorch-fid's
    fid_inception_v3 does) with seeded random weights, without fetching the FID weights."""
    if pretrained:
        url = fid_module.FID_WEIGHTS_URL
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")  # where torch.hub keeps what it downloads
        if not os.path.exists(os.path.join(folder, os.path.basename(url))) and not reachable(url):
            raise Unavailable(f"fid-inception: pytorch-fid's FID weights are not in {folder} and {url} does not answer "
                              f"(offline?): download that file on a machine with access and copy it into {folder} "
                              f"(TORCH_HOME/hub/checkpoints)", WITHOUT_WEIGHTS)
        try:
            model = fid_module.InceptionV3([3], resize_input=True, normalize_input=True)
        except Exception as err:
            raise Unavailable(f"fid-inception: could not fetch pytorch-fid's FID weights ({hub_failure(err)})",
                              WITHOUT_WEIGHTS) from err
        return model.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        for block, make in (("Mixed_5b", lambda: fid_module.FIDInceptionA(192, pool_features=32)),
                            ("Mixed_5c", lambda: fid_module.FIDInceptionA(256, pool_features=64)),
                            ("Mixed_5d", lambda: fid_module.FIDInceptionA(288, pool_features=64)),
                            ("Mixed_6b", lambda: fid_module.FIDInceptionC(768, channels_7x7=128)),
                            ("Mixed_6c", lambda: fid_module.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6d", lambda: fid_module.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6e", lambda: fid_module.FIDInceptionC(768, channels_7x7=192)),
                            ("Mixed_7b", lambda: fid_module.FIDInceptionE_1(1280)),
                            ("Mixed_7c", lambda: fid_module.FIDInceptionE_2(2048))):
            setattr(net, block, make())
    return FIDInceptionPool3(net).eval().requires_grad_(False)


class FIDInceptionPool3(fid_module.InceptionV3):
    """pytorch-fid's InceptionV3([pool3], resize_input=True, normalize_input=True) around a given Inception
    network: the same four blocks and forward, without the download its constructor does."""

    def __init__(self, net):
        torch.nn.Module.__init__(self)
        self.resize_input, self.normalize_input, self.output_blocks, self.last_needed_block = True, True, [3], 3
        pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)
        self.blocks = torch.nn.ModuleList([
            torch.nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool),
            torch.nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(kernel_size=3, stride=2)),
            torch.nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                                net.Mixed_6d, net.Mixed_6e),
            torch.nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c,
                                torch.nn.AdaptiveAvgPool2d(output_size=(1, 1)))])


def pool_tokens(tokens, pooling, num_prefix):
    """Final-norm tokens (B, T, D), T = CLS + registers + patches -> (B, D) or (B, 2D)."""
    if pooling == "cls":
        return tokens[:, 0]  # (B, D)
    if pooling == "cls+patch_mean":  # Virchow 2: CLS ‖ mean of the patch tokens, registers left out
        return torch.cat([tokens[:, 0], tokens[:, num_prefix:].mean(1)], dim=1)  # (B, 2D)
    raise InputError(f"unknown pooling {pooling!r}")


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
            if self.spec.backend == "encoder":  # normalises inside, as in training; CLS
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
    model = create_extractor_model(name, pretrained, seed, device)
    return Extractor(name, model, weights_id(name, pretrained, seed))
