"""SD-VAE f8d4: the latent auto-encoder of CytoSyn (CytoSyn §3.1; LDM `AutoencoderKL`).

224 x 224 RGB tiles in [-1, 1] <-> 28 x 28 x 4 latents (downsampling factor 8, 4 channels).
Encoder: conv_in, four resolution levels of two ResNet blocks (channels 128 * (1, 2, 4, 4)) with a
stride-2 downsample between them, a middle block (ResNet, self-attention, ResNet), GroupNorm(32),
Swish, conv_out to 2 x 4 channels: the mean and log-variance of a diagonal Gaussian (`double_z`).
The decoder mirrors it with three ResNet blocks per level and nearest-neighbour upsampling.

CytoSyn trains this VAE from scratch, end to end with the SiT (REPA-E), so there is no scaling
factor inside the VAE: the SiT's BatchNorm normalises latents instead (sit.py).

State-dict names are LDM's, as in REPA-E's released `sdvae-f8d4.pt` (`encoder.down.0.block.0.norm1`,
`encoder.mid.attn_1.q`, `quant_conv`, ...). `convert_diffusers_state_dict` maps the diffusers
`AutoencoderKL` layout onto them. Left out: dropout, timestep embeddings and attention at inner
resolutions (all unused by f8d4), and the deterministic/non-variational variants.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

vae_models = {
    "f8d4": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4),  # 83.65 M parameters
    # NOTE: not a paper size; same structure (factor 8, 4 channels) at a few hundred K parameters.
    "tiny": dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4),
}
GROUPS = 32          # GroupNorm groups everywhere
LOGVAR_RANGE = (-30.0, 20.0)


def latent_size(name, image_size):
    """Side of the latent of an image_size px tile: image_size / 2^(levels - 1) (224 -> 28 for f8d4)."""
    return image_size // 2 ** (len(vae_models[name]["ch_mult"]) - 1)


def build_vae(name):
    if name not in vae_models:
        raise ValueError(f"unknown VAE preset {name!r}; expected one of {list(vae_models)}")
    vae = AutoencoderKL(**vae_models[name])
    vae.config["vae"] = name
    return vae


def Normalize(channels):
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv on the skip path when the width changes (LDM calls it nin_shortcut)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convolutions as projections."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)            # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)        # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only: (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def middle(channels):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(width, ch * mult))
                width = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = middle(width)
        self.norm_out = Normalize(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)  # double_z: mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)                            # (B, ch, H, W)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)                # (B, C, H/2, W/2) per level but the last
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_channels=3):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = middle(width)
        self.up = nn.ModuleList()  # indexed like the encoder's levels (up[0] is full resolution)
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, ch * ch_mult[level]))
                width = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(width)
            self.up.insert(0, stage)
        self.norm_out = Normalize(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)                            # (B, C, h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)                  # (B, C, 2h, 2w) per level but the last
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 8h, 8w)


class DiagonalGaussian:
    """The VAE posterior q(z | x) = N(mean, diag(std^2)), from the encoder's 2z channels."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise  # reparameterisation: gradients reach mean and std

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over C, H, W: (B,). Eq. 7 of Kingma & Welling (2014)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.factor = 2 ** (len(ch_mult) - 1)
        self.z_channels = z_channels
        self.config = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels)

    def encode(self, x):
        """Images in [-1, 1], (B, 3, H, W) with H, W multiples of 8 -> posterior over (B, 4, H/8, W/8)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"the VAE expects RGB images of shape (B, 3, H, W) with H and W multiples of "
                             f"{self.factor}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"the VAE expects float images in [-1, 1] (uint8 / 127.5 - 1), got dtype {x.dtype}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"the VAE decodes latents of shape (B, {self.z_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, generator=None):
        """-> (posterior, z ~ posterior, reconstruction of z): the first step of REPA-E training."""
        posterior = self.encode(x)
        z = posterior.sample(generator)
        return posterior, z, self.decode(z)


def to_pixels(images):
    """Decoded images (B, 3, H, W), about [-1, 1] -> uint8 (B, H, W, 3): the inverse of uint8 / 127.5 - 1, clamped."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


# diffusers `AutoencoderKL` names -> the LDM names used here, as substring replacements applied in this order: one
# table, read left to right by convert_diffusers_state_dict and right to left by to_diffusers_state_dict. Besides
# names, diffusers numbers the decoder's up_blocks from the lowest resolution (up_blocks.0 == up.3 for f8d4) and
# stores the attention projections as Linear layers (C, C) where LDM has 1x1 convolutions (C, C, 1, 1).
DIFFUSERS_NAMES = (("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
                   ("mid_block.attentions.0.", "mid.attn_1."), (".resnets.", ".block."),
                   (".conv_shortcut.", ".nin_shortcut."), ("downsamplers.0.", "downsample."),
                   ("upsamplers.0.", "upsample."),
                   ("attn_1.group_norm.", "attn_1.norm."), ("attn_1.to_q.", "attn_1.q."), ("attn_1.to_k.", "attn_1.k."),
                   ("attn_1.to_v.", "attn_1.v."), ("attn_1.to_out.0.", "attn_1.proj_out."),
                   ("conv_norm_out.", "norm_out."), ("encoder.down_blocks.", "encoder.down."))
# Files saved by diffusers before 0.14 use older attention names (read only; exports use the current ones).
DIFFUSERS_OLD_NAMES = (("attn_1.query.", "attn_1.q."), ("attn_1.key.", "attn_1.k."), ("attn_1.value.", "attn_1.v."),
                       ("attn_1.proj_attn.", "attn_1.proj_out."))


def renamed(key, table):
    for old, new in table:
        key = key.replace(old, new)
    return key


def flip_up_blocks(key, old, new, num_up):
    """decoder.{old}.i. -> decoder.{new}.(num_up - 1 - i).: the decoder's levels counted from the other end."""
    if not key.startswith(f"decoder.{old}."):
        return key
    i = int(key.split(".")[2])
    return key.replace(f"decoder.{old}.{i}.", f"decoder.{new}.{num_up - 1 - i}.", 1)


def convert_diffusers_state_dict(sd):
    """Rename a diffusers `AutoencoderKL` state dict to the LDM names used here (DIFFUSERS_NAMES)."""
    num_up = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks.")), default=-1)
    out = {}
    for key, value in sd.items():
        new = flip_up_blocks(renamed(key, DIFFUSERS_NAMES + DIFFUSERS_OLD_NAMES), "up_blocks", "up", num_up)
        if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[new] = value
    return out


def to_diffusers_state_dict(sd):
    """Our (LDM-named) state dict -> diffusers `AutoencoderKL`'s: DIFFUSERS_NAMES read right to left."""
    num_up = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("decoder.up.")), default=-1)
    back = tuple((new, old) for old, new in reversed(DIFFUSERS_NAMES))
    out = {}
    for key, value in sd.items():
        new = renamed(flip_up_blocks(key, "up", "up_blocks", num_up), back)
        if ".attentions.0." in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[new] = value
    return out
