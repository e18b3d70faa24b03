"""The interpolant and the two training losses of CytoSyn (CytoSyn §3.3; REPA §3; REPA-E §3; SiT §2).

One time convention for the whole repo, defined here and used by train.py and sampler.py alike:

    x_t = (1 - t) x + t eps,   t ~ U[0, 1),   t = 0 is data, t = 1 is noise,
    the SiT predicts the velocity  v = d x_t / d t = eps - x.

This is REPA-E's convention; the original SiT code runs time the other way (t = 1 data).

The REPA target is the frozen encoder's patch tokens (features.py: H0-mini, resized to the SiT's token
grid); the loss aligns them with the SiT's projected tokens after block `encoder_depth`.

Left out: the cosine and EDM paths, and non-uniform time sampling (REPA-E's "lognormal" option);
CytoSyn uses none of them.
"""
import torch
import torch.nn.functional as F


# -- the interpolant (SiT §2, linear path; REPA-E's time direction) --------------------------------
def sample_t(batch, device=None, generator=None):
    """t ~ U[0, 1), one per sample."""
    return torch.rand(batch, device=device, generator=generator)


def interpolate(x, eps, t):
    """x_t = (1 - t) x + t eps: t = 0 data, t = 1 noise."""
    # NOTE: REPA-E's time direction; SiT §2 writes the path the other way, with t = 1 the data.
    t = t.view(-1, *([1] * (x.ndim - 1)))
    return (1 - t) * x + t * eps


def velocity_target(x, eps):
    """v = d x_t / dt = eps - x: what the SiT learns to predict."""
    return eps - x


# -- the losses -----------------------------------------------------------------------------------
def diffusion_loss(v_pred, v_target):
    """Flow-matching loss: mean squared error of the velocity (Eq. 7 of SiT, REPA-E's 'v' prediction)."""
    return (v_pred.float() - v_target.float()).pow(2).mean()


def repa_loss(proj, target):
    """REPA alignment: minus the cosine similarity between projected SiT tokens (B, T, D) and the
    encoder's patch tokens (B, T, D), averaged over batch and tokens (Eq. 8 of REPA). 1.0 when
    they agree, 0.0 when orthogonal, before the sign; normalised in float32 since fp16 NaNs."""
    if proj.shape != target.shape:
        raise ValueError(f"REPA loss: projected tokens {tuple(proj.shape)} and target {tuple(target.shape)} "
                         f"differ; the target grid must follow the SiT's token grid")
    proj = F.normalize(proj.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(proj * target).sum(dim=-1).mean()
