"""The VAE's image losses: LPIPS and a PatchGAN discriminator with hinge losses.

CytoSyn (§3.3) trains the VAE end to end with the REPA-E objective, whose image terms come from
taming-transformers / LDM: L1 + LPIPS + KL + a hinge-GAN generator loss against a PatchGAN
discriminator (`NLayerDiscriminator`, ndf 64, 3 layers). This file holds the two networks and the
hinge losses; train.py weighs and sums the terms (REPA-E §3).

- `LPIPS` (Zhang et al. 2018, "lin" variant): VGG16 features at relu1_2, relu2_2, relu3_3,
  relu4_3, relu5_3 (timm `vgg16.tv_in1k`, the same torchvision ImageNet weights LPIPS uses),
  each unit-normalised over channels, squared difference, a learned 1x1 linear head per layer,
  spatial mean, sum over layers. By default the heads are the calibrated ones REPA-E trains with:
  `lpips/weights/v0.1/vgg.pth` inside the `lpips` package (a requirement; read from the installed
  package, no network), keys `lin0.model.1.weight` ... `lin4.model.1.weight`, each (1, C, 1, 1),
  summing to 6.93 / 8.86 / 17.52 / 51.52 / 47.03. Another file can be given; `heads="uniform"`
  weighs every channel 1/C, which is NOT the calibrated LPIPS (an explicit opt-in, for ablations).
- `NLayerDiscriminator`: the pix2pix / taming PatchGAN, module names as in taming (`main.N`), so
  a taming or REPA-E discriminator state dict loads as is.

Left out: LPIPS's AlexNet/SqueezeNet variants, dropout in the heads (only used to train them),
ActNorm in the discriminator, LeCam regularisation and adaptive GAN weighting (REPA-E uses a fixed
GAN weight of 0.1 from step 0).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from support.cli import InputError, MissingInput

# LPIPS's own input scaling for images in [-1, 1]: (x - shift) / scale. These are the ImageNet
# mean/std re-expressed for [-1, 1] input (e.g. -0.030 = 2 * 0.485 - 1, 0.458 = 2 * 0.229).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# timm VGG16 feature taps 0..4 are the ReLUs before each max-pool: relu1_2 ... relu5_3.
VGG16_TIMM_NAME = "vgg16.tv_in1k"
VGG16_ACCESS = "public weights (torchvision's ImageNet VGG16, as timm hosts them)"
VGG16_TAPS = (0, 1, 2, 3, 4)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
UNIFORM = "uniform"  # heads= value for 1/C per channel (not the calibrated LPIPS)


def calibrated_heads_path():
    """The calibrated heads file of the installed `lpips` package (the one REPA-E's code loads)."""
    from importlib.resources import files
    try:
        path = files("lpips") / "weights" / "v0.1" / "vgg.pth"
    except ModuleNotFoundError:
        raise MissingInput("the calibrated LPIPS heads ship with the `lpips` package: pip install lpips "
                                "(or pass --lpips-heads PATH, or --lpips-uniform for uncalibrated heads)") from None
    return str(path)


def load_lpips_heads(path):
    """Read the five LPIPS linear heads from a published `vgg.pth` -> list of (1, C, 1, 1) tensors."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingInput(f"LPIPS heads file {path} not found; pass the `vgg.pth` of the "
                                "lpips package (lpips/weights/v0.1/vgg.pth) or leave --lpips-heads unset") from None
    heads = []
    for k, c in enumerate(VGG16_CHANNELS):
        # `model.1` is the layout with the training-time Dropout in front; `model.0` without it.
        w = sd.get(f"lin{k}.model.1.weight", sd.get(f"lin{k}.model.0.weight"))
        if w is None or tuple(w.shape) != (1, c, 1, 1):
            got = None if w is None else tuple(w.shape)
            raise InputError(f"{path} is not an LPIPS VGG heads file: expected lin{k}.model.1.weight "
                             f"of shape (1, {c}, 1, 1), found {got}; keys: {sorted(sd)[:8]}")
        heads.append(w.float())
    return heads


def channel_normalize(f):
    """Unit-normalise a feature map over channels: f / ||f||_2 (LPIPS's normalize_tensor)."""
    # vector_norm has a zero sub-gradient at 0 (all-zero ReLU columns), where sqrt(sum f^2) has NaN.
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)


class LPIPS(nn.Module):
    """LPIPS distance between two image batches in [-1, 1] -> (B,). Frozen; always in eval mode.

    pretrained: load the ImageNet VGG16 weights through timm (hub download); False gives a random
        VGG, only useful for tests and smoke runs.
    heads: None -> the calibrated heads of the `lpips` package (REPA-E's); a path -> that `vgg.pth`;
        "uniform" -> 1/C per channel, which is NOT the calibrated LPIPS (see the module docstring).
    vgg_range_quirk: feed VGG REPA-E's doubly rescaled input (see `forward`); off by default.
    """

    def __init__(self, pretrained=True, heads=None, vgg_range_quirk=False):
        super().__init__()
        import timm  # imported here so that the discriminator alone needs no timm

        taps = dict(features_only=True, out_indices=VGG16_TAPS)
        if pretrained:  # one attempt at the hub; offline, the local cache or one line saying how to fetch it
            from support.hub import create_timm_model
            self.vgg = create_timm_model("LPIPS's VGG16", VGG16_TIMM_NAME, None, taps, True, 0, VGG16_ACCESS)
        else:
            self.vgg = timm.create_model(VGG16_TIMM_NAME, pretrained=False, **taps)
        assert tuple(self.vgg.feature_info.channels()) == VGG16_CHANNELS
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        if heads == UNIFORM:  # NOTE: an opt-in ablation: every channel weighs 1/C, not the calibrated LPIPS
            weights = [torch.full((1, c, 1, 1), 1.0 / c) for c in VGG16_CHANNELS]
        else:
            weights = load_lpips_heads(heads or calibrated_heads_path())
        for k, w in enumerate(weights):
            self.register_buffer(f"head{k}", w, persistent=False)
        self.calibrated, self.vgg_range_quirk = heads != UNIFORM, vgg_range_quirk
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen metric: never let a .train() call reach the VGG

    def forward(self, x, y):
        if self.vgg_range_quirk:
            # NOTE: REPA-E's loss rescales its [-1, 1] images once more (2 x - 1), so its VGG sees [-3, 1];
            # CytoSyn kept REPA-E's code. Off by default: LPIPS is defined on [-1, 1] input.
            x, y = 2 * x - 1, 2 * y - 1
        feats_x = self.vgg((x - self.shift) / self.scale)  # 5 x (B, C_k, H/2^k, W/2^k)
        feats_y = self.vgg((y - self.shift) / self.scale)
        dist = 0.0
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = (channel_normalize(fx.float()) - channel_normalize(fy.float())) ** 2  # (B, C_k, h, w)
            weighted = (diff * getattr(self, f"head{k}")).sum(dim=1)                   # (B, h, w): 1x1 conv head
            dist = dist + weighted.mean(dim=(1, 2))                                      # (B,): spatial mean
        return dist


def add_lpips_args(p):
    """train.py's LPIPS flags: the paper's calibrated LPIPS by default, and the ablations."""
    p.add_argument("--no-lpips", action="store_true", help="ablation / smoke run: no LPIPS term")
    p.add_argument("--lpips-heads", default=None, help="LPIPS heads file (default: the lpips package's calibrated "
                                                       "vgg.pth)")
    p.add_argument("--lpips-uniform", dest="lpips_heads", action="store_const", const=UNIFORM,
                   help="ablation: weigh VGG channels 1/C instead of the calibrated heads (not LPIPS)")
    p.add_argument("--lpips-vgg-range-quirk", action="store_true", help="REPA-E's code: VGG sees [-3, 1]")


def discriminator_init_(m):
    """taming's init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; taming-transformers' default): images -> (B, 1, h, w) logits.

    n_layers stride-2 4x4 convs (the first without norm), one stride-1 4x4 conv, then a 4x4 conv to
    one channel; LeakyReLU(0.2) and BatchNorm between. Widths ndf * min(2^n, 8). For a 224 px input
    with ndf 64, 3 layers: 224 -> 112 -> 56 -> 28 -> 27 -> 26, i.e. (B, 1, 26, 26), each logit
    seeing a 70x70 receptive field.
    """

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            out = ndf * min(2 ** n, 8)
            # No conv bias before BatchNorm (its shift does the same job).
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        layers += [nn.Conv2d(width, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.apply(discriminator_init_)

    def forward(self, x):
        return self.main(x)  # (B, 3, H, W) -> (B, 1, h, w)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: (mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))) / 2."""
    # The 1/2 is taming's and REPA-E's (CytoSyn's code base); it matters for the grad clip at 1.0.
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake):
    """Generator (VAE decoder) hinge loss: -mean(D(fake))."""
    return -logits_fake.mean()
