"""SiT: the latent denoiser of CytoSyn (CytoSyn §3.1; SiT §2; REPA-E §3).

A transformer over 2x2 patches of the 4-channel VAE latent, with adaLN-Zero blocks (DiT), that
predicts the velocity of the linear interpolant

    x_t = (1 - t) x + t eps,   t = 0 data, t = 1 noise,   target v = eps - x.

CytoSyn's changes to REPA-E's SiT, all in this file:
  * the class-label table is replaced by `CondEmbedder`, which maps the 768-d H0-mini CLS token of
    a tile to the conditioning vector, with a learned null embedding for classifier-free guidance;
  * latents are 28x28 (224 px tiles, VAE factor 8), hence 14x14 = 196 tokens.

Kept from REPA-E: the projector MLP after block `encoder_depth` (its output is aligned with the
H0-mini patch tokens, see repa_loss.py), the affine-free BatchNorm `bn` that normalises latents
(`SyncedLatentBatchNorm` takes its batch statistics over all ranks in a multi-process run), and the
state-dict names, so REPA-E checkpoints load into everything but the conditioning embedder.

Left out: learn_sigma (SiT-XL/2 here predicts 16 = 2*2*4 channels), qk-norm, patch sizes other
than those in the preset table, and the loss computation (REPA-E folds it into `forward`; here it
lives in repa_loss.py so that the sampler and the trainer share one definition).
"""
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# name -> architecture. SiT-XL/2 at input_size 28 is CytoSyn's denoiser (683 M parameters).
SiT_models = {
    "SiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "SiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "SiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "SiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    # NOTE: not a paper size; a few-second CPU model for tests and the demo.
    "SiT-T/2": dict(depth=4, hidden_size=64, patch_size=2, num_heads=4, encoder_depth=2, projector_dim=128),
}

BN_EPS, BN_MOMENTUM = 1e-4, 0.1  # REPA-E's latent BatchNorm
TIME_FREQUENCIES = 256            # size of the sinusoidal timestep embedding


def token_grid(name, latent_size):
    """Side of the SiT's token grid on a latent_size x latent_size latent (28 -> 14 for patch 2): the grid
    the REPA target is resized to."""
    return latent_size // SiT_models[name]["patch_size"]


def build_sit(name, **kwargs):
    """Build a SiT preset by name; `kwargs` override the preset (input_size, cond_dim, ...)."""
    if name not in SiT_models:
        raise ValueError(f"unknown SiT preset {name!r}; expected one of {list(SiT_models)}")
    model = SiT(**{**SiT_models[name], **kwargs})
    model.config["model"] = name
    return model


def modulate(x, shift, scale):
    """adaLN: scale and shift every token of x (B, T, D) by per-sample vectors (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos position embedding (MAE/DiT), (grid*grid, dim) for tokens in row-major
    order: the first half encodes the column, the second half the row (MAE's order, so a fresh
    model matches REPA-E's); each half is [sin, cos] of the position times 10000^(-k/(dim/4))."""
    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        angles = np.outer(pos, omega)                                   # (T, d/2)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (T, d)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([one_axis(cols.ravel(), dim // 2), one_axis(rows.ravel(), dim // 2)], axis=1)


def patchify(x, p):
    """(B, C, H, W) -> (B, T, p*p*C), tokens in row-major order, channels ordered (p, q, c).
    The exact inverse of `unpatchify`; it documents the token layout the final layer writes."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, C):
    """(B, T, p*p*C) -> (B, C, H, W), for a square grid of T tokens."""
    B, T, _ = x.shape
    h = w = math.isqrt(T)
    x = x.reshape(B, h, w, p, p, C)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, C, h * p, w * p)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of the latent -> tokens (a strided conv)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, T, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (fed raw, as REPA-E does) -> sinusoidal features [cos, sin] -> MLP -> (B, D)."""

    def __init__(self, hidden_size, frequencies=TIME_FREQUENCIES, max_period=10000):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        half = frequencies // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        args = t.float()[:, None] * self.freqs[None]                  # (B, F/2)
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))           # (B, D)


class CondEmbedder(nn.Module):
    """H0-mini CLS features (B, cond_dim) -> conditioning vector (B, D). CytoSyn §3.1.

    Classifier-free guidance needs an 'unconditional' input: a learned null feature vector that
    replaces the real features of a row when that row is dropped (`drop` True), with probability
    `dropout` in training mode, and for every row when `cond` is None.
    """

    def __init__(self, cond_dim, hidden_size, dropout):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.null_cond = nn.Parameter(torch.zeros(cond_dim))
        self.dropout = dropout

    def forward(self, cond=None, drop=None):
        if cond is None:  # unconditional: one null row, broadcast over the batch
            return self.mlp(self.null_cond[None])                      # (1, D)
        if self.training and self.dropout > 0:
            random_drop = torch.rand(cond.shape[0], device=cond.device) < self.dropout
            drop = random_drop if drop is None else drop | random_drop
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_cond.to(cond.dtype), cond)
        return self.mlp(cond)                                          # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)              # each (B, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)        # (B, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning vector c sets a shift, a scale and a
    gate for each branch; the gates start at zero so every block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))   # (B, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C)


def projector_mlp(hidden_size, projector_dim, z_dim):
    """REPA's projector: SiT tokens -> the encoder's feature space (1152 -> 2048 -> 2048 -> 768)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class SiT(nn.Module):
    def __init__(self, input_size=28, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, cond_dim=768, cond_dropout=0.1, encoder_depth=8, z_dim=768, projector_dim=2048):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, {depth}], got {encoder_depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.cond_dim, self.encoder_depth = cond_dim, encoder_depth
        self.token_grid = input_size // patch_size  # tokens per side: 14 for a 28 x 28 latent
        self.config = dict(input_size=input_size, in_channels=in_channels, cond_dim=cond_dim,
                           cond_dropout=cond_dropout, encoder_depth=encoder_depth, z_dim=z_dim,
                           projector_dim=projector_dim, depth=depth, hidden_size=hidden_size,
                           patch_size=patch_size, num_heads=num_heads)

        num_tokens = self.token_grid ** 2
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = CondEmbedder(cond_dim, hidden_size, cond_dropout)
        # A frozen parameter (not a buffer) so that REPA-E's state dicts, which hold it, load as they are.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.projectors = nn.ModuleList([projector_mlp(hidden_size, projector_dim, z_dim)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        # Latent normalisation (REPA-E §3): affine-free so the diffusion loss cannot shrink the
        # latents to cheat; batch statistics in the SiT pass, running statistics elsewhere.
        self.bn = nn.BatchNorm2d(in_channels, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT/SiT initialisation; the zeroed adaLN and output layers make a new model output 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # as a linear layer on the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        for mlp in (self.t_embedder.mlp, self.y_embedder.mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.null_cond, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                        self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- latent normalisation (REPA-E §3) ---------------------------------------------------------
    def normalize(self, z):
        """VAE latent -> SiT space. Train mode: batch statistics (and running stats get updated);
        eval mode: running statistics, as in REPA-E's VAE-align pass and at sampling time."""
        return self.bn(z)

    def denormalize(self, x):
        """SiT space -> VAE latent with the running statistics (use the EMA model's for decoding).
        As REPA-E, without BatchNorm's eps, so this is the inverse of `normalize` up to eps = 1e-4."""
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(x.dtype)
        std = self.bn.running_var.sqrt().view(1, -1, 1, 1).to(x.dtype)
        return x * std + mean

    def check_inputs(self, x, t, cond, drop):
        size, C = self.input_size, self.in_channels
        if not (torch.is_tensor(x) and torch.is_tensor(t)):
            raise ValueError("SiT expects tensors: x (B, C, H, W) and t (B,)")
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"SiT expects latents of shape (B, {C}, {size}, {size}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"SiT expects one time per sample, shape ({x.shape[0]},), got {tuple(t.shape)}")
        if cond is not None and cond.shape != (x.shape[0], self.cond_dim):
            raise ValueError(f"SiT expects conditioning features of shape ({x.shape[0]}, {self.cond_dim}), "
                             f"got {tuple(cond.shape)}")
        if drop is not None and (drop.dtype != torch.bool or drop.shape != (x.shape[0],)):
            raise ValueError(f"SiT expects drop as a bool mask of shape ({x.shape[0]},), "
                             f"got {drop.dtype} {tuple(drop.shape)}")

    def forward(self, x, t, cond=None, drop=None, align_only=False):
        """x: normalised latent x_t (B, C, H, W); t: (B,) in [0, 1], t = 0 data; cond: (B, cond_dim)
        H0-mini CLS features or None; drop: optional bool (B,), rows that get the null embedding.
        Returns (velocity (B, C, H, W), projected tokens (B, T, z_dim) after block encoder_depth);
        with align_only the blocks after encoder_depth are skipped and the velocity is None."""
        self.check_inputs(x, t, cond, drop)
        x = self.x_embedder(x) + self.pos_embed                 # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(cond, drop)    # (B, D)
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)                                      # (B, T, D)
            if i == self.encoder_depth:
                proj = self.projectors[0](x)                     # (B, T, z_dim)
                if align_only:
                    return None, proj
        x = self.final_layer(x, c)                               # (B, T, p*p*C)
        return unpatchify(x, self.patch_size, self.in_channels), proj  # (B, C, H, W)


class SyncedLatentBatchNorm(nn.BatchNorm2d):
    """The SiT's latent BatchNorm with batch statistics over all ranks (SyncBatchNorm, also on CPU).

    torch's SyncBatchNorm runs on GPUs only. Here batch statistics are only used in the SiT update,
    on z.detach() with an affine-free BN, so they need no gradient: three small all-reduces (count,
    sum, squared deviations).
    """
    # NOTE: our own, where REPA-E's DDP would use torch.nn.SyncBatchNorm, which needs CUDA and keeps a gradient
    # path that is never used here.

    def forward(self, z):
        if not self.training:
            return super().forward(z)
        if torch.is_grad_enabled() and z.requires_grad:
            raise RuntimeError("SyncedLatentBatchNorm's batch statistics carry no gradient; feed it z.detach()")
        zf = z.float()
        count = torch.tensor(float(zf.numel() // zf.shape[1]), device=z.device)
        total = zf.sum(dim=(0, 2, 3))                                  # (C,)
        dist.all_reduce(count)
        dist.all_reduce(total)
        mean = total / count
        sq = (zf - mean.view(1, -1, 1, 1)).pow(2).sum(dim=(0, 2, 3))  # (C,), two passes: no cancellation
        dist.all_reduce(sq)
        var = sq / count
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(var * count / (count - 1), alpha=m)  # unbiased, as BatchNorm2d
        self.num_batches_tracked.add_(1)
        return ((zf - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)).to(z.dtype)


def synced_batchnorm(bn):
    synced = SyncedLatentBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False)
    synced.load_state_dict(bn.state_dict())
    return synced.to(bn.running_mean.device)
