"""Every frozen network's constants, and the repo's conventions, checked against where they come from.

A benchmark number is only as right as what the extractor sees: its normalisation, input size, resize kernel and
pooling. Each is checked here against its source, not against the code: timm's pretrained configuration for the
models timm hosts (read offline), the model card for the gated ones (its values listed once below, with its
address), pytorch-fid for the paper's Inception, scikit-image for Otsu's threshold, and closed forms for the pixel
ranges and the VAE's scaling. A value that differs from its source on purpose is listed in DEVIATIONS and must
carry a `# NOTE:` where it is set.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from pytorch_fid import inception as fid_module

import extractors
import features
import tiling
from extractors import EXTRACTORS, Extractor, build_extractor, create_extractor_model
from sample import Pipeline

ROOT = Path(__file__).resolve().parent.parent
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
BIOPTIMUS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))

# The models timm hosts: their pretrained configuration is in timm itself, readable offline.
TIMM_HOSTED = {"inception": "inception_v3.tv_in1k", "dinov2": "vit_base_patch14_dinov2.lvd142m"}
# The gated models: what their model cards say. kernel None: the card resizes nothing (it expects 224 px tiles).
CARDS = {
    # https://huggingface.co/bioptimus/H-optimus-0 : ToTensor, Normalize(mean, std); features = output (CLS), 1536-d
    "h-optimus-0": dict(**BIOPTIMUS, input_size=224, kernel=None, pooling="cls", dim=1536, prefix=5),
    # https://huggingface.co/bioptimus/H0-mini : the same normalisation; output[:, 0] is the CLS token, 768-d
    "h0-mini": dict(**BIOPTIMUS, input_size=224, kernel=None, pooling="cls", dim=768, prefix=5),
    # https://huggingface.co/MahmoodLab/UNI2-h : Resize(224) (torchvision: bilinear), ToTensor, Normalize(ImageNet);
    # timm_kwargs with reg_tokens=8, no_embed_class; the CLS token, 1536-d
    "uni2-h": dict(**IMAGENET, input_size=224, kernel="bilinear", pooling="cls", dim=1536, prefix=9),
    # https://huggingface.co/paige-ai/Virchow2 : timm's resolve_data_config (ImageNet, 224, bicubic); embedding =
    # CLS token ‖ mean of output[:, 5:] ("tokens 1-4 are register tokens"), 2560-d
    "virchow2": dict(**IMAGENET, input_size=224, kernel="bicubic", pooling="cls+patch_mean", dim=2560, prefix=5),
    # https://huggingface.co/MahmoodLab/UNI : Resize(224) (bilinear), ToTensor, Normalize(ImageNet); CLS, 1024-d
    "uni": dict(**IMAGENET, input_size=224, kernel="bilinear", pooling="cls", dim=1024, prefix=1),
}
# On purpose, each with a NOTE where it is set: DINOv2 sees the 224 px tile (its configuration says 518 px).
DEVIATIONS = {("dinov2", "input_size"): "dinov2"}


@pytest.mark.parametrize("name", list(TIMM_HOSTED))
def test_timm_hosted_extractors_take_timms_pretrained_configuration(name):
    cfg, spec = timm.get_pretrained_cfg(TIMM_HOSTED[name]), EXTRACTORS[name]
    assert spec.hub == TIMM_HOSTED[name]
    assert (spec.mean, spec.std, spec.kernel) == (tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)
    if (name, "input_size") in DEVIATIONS:
        assert spec.input_size != cfg.input_size[-1] and noted(DEVIATIONS[name, "input_size"])
    else:
        assert spec.input_size == cfg.input_size[-1]


def noted(key):
    """True when the registry entry of `key` in extractors.py carries a `# NOTE:` comment just above it."""
    text = (ROOT / "extractors.py").read_text()
    return re.search(rf"# NOTE:[^\n]*\n(?:\s*#[^\n]*\n)*\s*\"{re.escape(key)}\":", text) is not None


@pytest.mark.parametrize("name", list(CARDS))
def test_gated_extractors_take_their_model_cards_values(name):
    card, spec = CARDS[name], EXTRACTORS[name]
    assert (spec.mean, spec.std, spec.input_size, spec.pooling, spec.dim) == \
        (card["mean"], card["std"], card["input_size"], card["pooling"], card["dim"])
    if card["kernel"] is not None:
        assert spec.kernel == card["kernel"]


@pytest.mark.parametrize("name", [name for name in CARDS if EXTRACTORS[name].backend == "timm"])
def test_each_gated_architecture_has_the_cards_token_layout_and_width(name):
    """Built offline (random weights, no memory): the prefix tokens (CLS + registers) the pooling skips, and the
    embedding width that gives the card's feature size."""
    model = create_extractor_model(name, pretrained=False, device="meta")
    assert model.num_prefix_tokens == CARDS[name]["prefix"]
    width = CARDS[name]["dim"] // (2 if CARDS[name]["pooling"] == "cls+patch_mean" else 1)
    assert model.embed_dim == width
    tokens = model.forward_features(torch.empty(1, 3, 224, 224, device="meta"))
    patches = (224 // model.patch_embed.patch_size[0]) ** 2
    assert tuple(tokens.shape) == (1, CARDS[name]["prefix"] + patches, width)


def test_virchow2_pools_the_cls_token_and_the_mean_of_the_patch_tokens_without_registers():
    class Tokens(torch.nn.Module):  # a stand-in with Virchow 2's layout: CLS, 4 registers, 4 patch tokens
        num_prefix_tokens = 5

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.tokens = torch.arange(9 * 3, dtype=torch.float32).view(1, 9, 3) ** 2

        def forward_features(self, x):
            return self.tokens.expand(len(x), -1, -1)
    tokens = Tokens().tokens[0]
    out = Extractor("virchow2", Tokens()).embed(torch.rand(2, 3, 224, 224))
    card = torch.cat([tokens[0], tokens[5:].mean(0)])  # the card: output[:, 0] ‖ output[:, 5:].mean(1)
    assert torch.equal(out, card.expand(2, -1))


def test_h0_mini_is_the_model_cards_vit_b14_with_four_registers():
    assert (features.H0_MINI_MEAN, features.H0_MINI_STD) == (BIOPTIMUS["mean"], BIOPTIMUS["std"])
    assert features.ENCODER_SIZE == 224
    with torch.device("meta"):
        encoder = features.load_encoder("h0-mini", pretrained=False)
    assert (encoder.num_prefix_tokens, encoder.patch_embed.patch_size, encoder.embed_dim) == (5, (14, 14), 768)
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e6) == 86  # the card: 86 M parameters


def test_the_papers_inception_is_pytorch_fids_pool3_network():
    """pytorch-fid's InceptionV3([pool3], resize_input=True, normalize_input=True): [0, 1] in, a bilinear resize
    to 299 and the [-1, 1] scaling inside, 2048-d out."""
    spec = EXTRACTORS["fid-inception"]
    assert (spec.input_size, spec.kernel, spec.resize_inside, spec.dim) == (299, "bilinear", True, 2048)
    assert fid_module.InceptionV3.BLOCK_INDEX_BY_DIM[spec.dim] == 3
    model = extractors.fid_inception(pretrained=False)
    assert (model.resize_input, model.normalize_input, model.output_blocks, model.last_needed_block) == \
        (True, True, [3], 3)
    assert tuple(build_extractor("fid-inception", pretrained=False).embed(torch.rand(1, 3, 64, 64)).shape) == (1, 2048)


def test_otsu_threshold_splits_where_scikit_image_splits():
    """Otsu (1979) on the saturation histogram (256 bins on [0, 1]): scikit-image's threshold_otsu on the same
    histogram picks the same bin; it returns the bin's centre, tissue_mask keeps what lies above the bin's edge."""
    from skimage.filters import threshold_otsu
    rng = np.random.default_rng(0)
    for background, tissue in ((3000, 1000), (500, 4000), (2000, 2000)):
        values = np.concatenate([rng.beta(2, 20, background), rng.beta(8, 6, tissue)])
        counts, edges = np.histogram(values, bins=256, range=(0, 1))
        theirs = threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2))
        assert tiling.otsu_threshold(values) == pytest.approx(theirs + (edges[1] - edges[0]) / 2, abs=1e-12)


# -------- Pixel ranges and the VAE's scaling (REPA-E's training loop; CytoSyn §3.1) ---------------------------
def test_the_vae_sees_uint8_over_127_5_minus_1_and_decoding_inverts_it_exactly():
    import train
    levels = torch.arange(256, dtype=torch.uint8)
    images = levels.view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    nets = type("Nets", (), dict(device=torch.device("cpu"), vae=type("V", (), dict(z_channels=4, factor=8)),
                                 sit=None))()
    batch = train.make_batch(nets, images, torch.zeros(2, 5, 8))
    assert torch.equal(batch.x, images.float() / 127.5 - 1) and (batch.x.min(), batch.x.max()) == (-1, 1)

    class Identity(torch.nn.Module):  # a VAE and a SiT that change nothing: decode shows its own arithmetic
        factor, input_size, in_channels = 1, 16, 3

        def decode(self, z):
            return z

        def denormalize(self, x):
            return x
    pipe = Pipeline(Identity(), Identity(), "cpu")
    pixels = pipe.decode(batch.x.double(), [0, 1])  # (B, H, W, 3) uint8
    assert np.array_equal(pixels, images.permute(0, 2, 3, 1).numpy())


def test_decoding_has_no_scaling_factor_besides_the_latent_batchnorm():
    """REPA-E replaces SD's fixed latent scale (0.18215) with a BatchNorm: the latent the VAE decodes is the
    SiT's denormalised state, z = x sqrt(running_var) + running_mean, and nothing else."""
    seen = {}

    class VAE(torch.nn.Module):
        factor = 8

        def decode(self, z):
            seen["z"] = z
            return torch.zeros(len(z), 3, 16, 16)

    class SiT(torch.nn.Module):
        input_size, in_channels = 2, 4
        mean, var = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([4.0, 0.25, 1.0, 9.0])

        def denormalize(self, x):
            return x * self.var.sqrt().view(1, 4, 1, 1) + self.mean.view(1, 4, 1, 1)
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    Pipeline(SiT(), VAE(), "cpu").decode(x, [0])
    assert torch.allclose(seen["z"], x.float() * SiT.var.sqrt().view(1, 4, 1, 1) + SiT.mean.view(1, 4, 1, 1))
