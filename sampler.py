"""Samplers for CytoSyn's latent flow: Euler / Heun (ODE) and Euler-Maruyama (SDE).

CytoSyn §4.1, following SiT §2.3 and REPA-E's sampler settings.
One time convention for the whole repo: x_t = (1 - t) x + t eps, t = 0 is data, t = 1 is noise, and the
network predicts the velocity v = eps - x. Sampling integrates from t = 1 (noise) down to t = 0 (data):

    ODE (probability flow):  dx = v(x, t) dt
    SDE (same marginals):    dx = [v - w(t)/2 s(x, t)] dt + sqrt(w(t)) dW,    w(t) = 2t,
                             score of the linear path  s = -((1 - t) v + x) / t     (SiT §2; derived below)

with dt < 0. A sampler is a plain loop next to its equation. Classifier-free guidance lives in one
function, `cfg_velocity`, which is the only place the unconditional pass can happen.

Both samplers can also start at t_start < 1, from an image noised along the same path,
x_{t_start} = (1 - t_start) x + t_start eps: SDEdit (Meng et al., 2022, §3), which sample.py --restain uses.
The grid keeps its N steps, squeezed onto [0, t_start]; t_start = 1 is the paper's sampler, bit for bit.

A latent larger than the network's window (sample.py --region) is sampled as one with MultiDiffusion
(Bar-Tal et al., 2023, §3): `multidiffusion_velocity` wraps the network so that each step's velocity is the mean of
the velocities of the overlapping windows that cover a position; the samplers below run on it unchanged.

The state is float64; the network gets x and the conditioning in `dtype` (cast inside `cfg_velocity`), so
bf16 networks do not accumulate rounding error over 250 steps, and t in float32 (bf16 would merge steps).
The time grid is a Python list of floats: the guidance window
and the step sizes are decided on the host, so the loop never waits on the device.

Left out: other paths (VP, cosine), other diffusion coefficients, adaptive ODE solvers, SiT's "last step"
variants other than REPA-E's default (a plain Euler step from SDE_T_END to 0); MultiDiffusion's weighted
(non-uniform) averages and its region-based text prompts.
"""
import math

import torch

SDE_T_END = 0.04  # the stochastic steps stop here (the score blows up as t -> 0); one Euler step goes on to 0


def ode_time_grid(num_steps):
    """N Euler steps on linspace(1, 0, N + 1) (CytoSyn §4.1; REPA-E's sampler)."""
    return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()


def sde_time_grid(num_steps):
    """N - 1 stochastic steps on linspace(1, SDE_T_END, N), then one deterministic step to 0
    (CytoSyn §4.1; REPA-E's sampler)."""
    return torch.linspace(1, SDE_T_END, num_steps, dtype=torch.float64).tolist() + [0.0]


def start_at(grid, t_start, t_end):
    """Times from 1 down to t_end, mapped linearly onto [t_end, t_start]: linspace(1, t_end, N) becomes
    linspace(t_start, t_end, N) (SDEdit). Written s t + (1 - s) t_end so that t_start = 1 (s = 1) leaves every
    time as it is, bit for bit."""
    s = (t_start - t_end) / (1 - t_end)
    return [s * t + (1 - s) * t_end for t in grid]


def diffusion_coefficient(t):
    """w(t) = 2t: SiT's default ("sigma") diffusion for the linear path."""
    return 2 * t


def score_from_velocity(v, x, t):
    """Score of p_t from the velocity, linear path: s = -((1 - t) v + x) / t.

    From x_t = (1 - t) x0 + t eps:  E[eps | x_t] = -t s  and  v = E[eps | x_t] - E[x0 | x_t];
    eliminating E[x0 | x_t] = (x_t - t E[eps | x_t]) / (1 - t) gives the formula. Undefined at t = 0,
    hence SDE_T_END.
    """
    return -((1 - t) * v + x) / t


def standard_normal(shape, generator=None, device=None):
    """float64 N(0, I) noise. `generator`: one torch.Generator, or a list with one per row, so that a row's
    noise depends on its own seed only, not on the batch it is drawn in (sample.py's resumable runs)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float64, device=device) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=device)


def cfg_velocity(model, x, t, cond, cfg_scale, guidance_low, guidance_high, dtype):
    """Velocity at (x, t), guided when t lies in [guidance_low, guidance_high]: uncond + s (cond - uncond).

    The only place the unconditional pass runs: one batched forward on [x; x] with the second half's
    condition dropped to the null embedding. `t` is a Python float, so the window test costs no sync.
    """
    # NOTE: REPA-E guides only when cfg_scale > 1; we guide for any scale != 1 (s < 1 is a valid
    # interpolation towards the unconditional model, which REPA-E would silently ignore).
    B = x.shape[0]
    guided = cond is not None and cfg_scale != 1 and guidance_low <= t <= guidance_high
    if not guided:
        t_in = torch.full((B,), t, dtype=torch.float32, device=x.device)
        c_in = None if cond is None else cond.to(dtype)
        return model(x.to(dtype), t_in, c_in).to(torch.float64)
    x_in = torch.cat([x, x]).to(dtype)  # (2B, C, H, W)
    t_in = torch.full((2 * B,), t, dtype=torch.float32, device=x.device)
    c_in = torch.cat([cond, cond]).to(dtype)  # (2B, D)
    drop = torch.arange(2 * B, device=x.device) >= B  # rows B..2B-1 get the null embedding
    v_cond, v_uncond = model(x_in, t_in, c_in, drop=drop).to(torch.float64).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)  # Ho & Salimans Eq. 6 (s = 1 + w), on the velocity


@torch.no_grad()
def euler_sampler(model, noise, cond=None, num_steps=50, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                  heun=False, dtype=torch.float32, t_start=1.0):
    """ODE dx = v dt from t = t_start to 0 on linspace(t_start, 0, N + 1); Euler, or Heun's 2nd order (2N - 1
    evaluations). `noise` is x at t_start: pure noise at t_start = 1. Returns float64 x_0."""
    def velocity(x, t):
        return cfg_velocity(model, x, t, cond, cfg_scale, guidance_low, guidance_high, dtype)

    ts = start_at(ode_time_grid(num_steps), t_start, 0.0)
    x = noise.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t  # < 0: noise -> data
        v = velocity(x, t)
        x_next = x + v * dt  # Euler: x_{i+1} = x_i + v(x_i, t_i) dt
        if heun and i < num_steps - 1:  # Heun: mean of the slopes at both ends (not on the last step, as EDM)
            x_next = x + (v + velocity(x_next, t_next)) / 2 * dt
        x = x_next
    return x


@torch.no_grad()
def euler_maruyama_sampler(model, noise, cond=None, num_steps=250, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, generator=None, dtype=torch.float32, t_start=1.0):
    """SDE dx = [v - w s / 2] dt + sqrt(w) dW from t = t_start to SDE_T_END, then one Euler step to 0.

    As REPA-E's sampler, the last step uses the SDE drift without noise (the mean of an Euler-Maruyama step), not
    a probability-flow step: the noise y left at SDE_T_END becomes -y rather than 0, so the output keeps a
    residual std ~ SDE_T_END around each mode (4% of the unit-variance latent; tests pin this down).
    N network evaluations (unguided). `generator` (one, or one per row; on noise's device) drives the
    Brownian increments, so a seeded run is reproducible. `noise` is x at t_start: pure noise at t_start = 1;
    the stochastic steps lie on linspace(t_start, SDE_T_END, N). Returns float64 x_0.
    """
    if t_start <= SDE_T_END:  # no room for a stochastic step: N plain (deterministic) Euler steps to 0
        return euler_sampler(model, noise, cond, num_steps, cfg_scale, guidance_low, guidance_high, dtype=dtype,
                             t_start=t_start)
    ts = sde_time_grid(num_steps)
    ts = start_at(ts[:-1], t_start, SDE_T_END) + ts[-1:]  # the last step still goes from SDE_T_END to 0
    x = noise.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t  # < 0: noise -> data
        v = cfg_velocity(model, x, t, cond, cfg_scale, guidance_low, guidance_high, dtype)
        w = diffusion_coefficient(t)
        drift = v - w / 2 * score_from_velocity(v, x, t)  # reverse-time drift of the SDE above
        x = x + drift * dt
        if i < num_steps - 1:  # the last step (SDE_T_END -> 0) is the noise-free mean
            xi = standard_normal(x.shape, generator, x.device)
            x = x + math.sqrt(w * abs(dt)) * xi  # Euler-Maruyama: dW ~ N(0, |dt|)
    return x


def multidiffusion_velocity(model, starts_y, starts_x, window, batch_size=32):
    """MultiDiffusion (Bar-Tal et al., 2023) with uniform weights: the velocity of a latent larger than the
    network's window is, at each position, the mean of the velocities of the windows that cover it, each window's
    computed by `model` on its crop of the shared latent.

    MultiDiffusion averages the windows' denoised states after each step; every window starts the step from the
    same crop, so for an Euler step that is this mean velocity times dt.

    Returns a model for the samplers, v(x, t, cond, drop): x (B, C, H, W) whole latents, t (B,), cond (B, K, D)
    with one row of features per window, windows in the order (top, left) for top in starts_y for left in
    starts_x, and drop (B,) or None. The network sees at most `batch_size` windows per call. cfg_velocity calls
    it on [x; x] with the second half dropped: the mean is linear, so guiding the means equals the mean of the
    windows' guided velocities (guidance per window). With one window this is `model` itself, bit for bit."""
    # NOTE: the SDE's noise is then drawn once for the whole latent, where MultiDiffusion's windows would each
    # step with their own noise and average it (shrinking its variance where windows overlap).
    windows = [(top, left) for top in starts_y for left in starts_x]
    covered = {}  # (H, W) -> how many windows cover each position, computed once

    def velocity(x, t, cond, drop=None):
        B, (H, W) = x.shape[0], x.shape[-2:]
        if (H, W) not in covered:
            count = torch.zeros((H, W), dtype=torch.float32, device=x.device)
            for top, left in windows:
                count[top:top + window, left:left + window] += 1
            covered[(H, W)] = count
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        jobs = [(b, k) for b in range(B) for k in range(len(windows))]
        for i in range(0, len(jobs), batch_size):
            rows, ks = map(list, zip(*jobs[i:i + batch_size]))
            crops = torch.stack([x[b, :, windows[k][0]:windows[k][0] + window, windows[k][1]:windows[k][1] + window]
                                 for b, k in zip(rows, ks)])  # (n, C, window, window)
            v = model(crops, t[rows], None if cond is None else cond[rows, ks], None if drop is None else drop[rows])
            for b, k, v_k in zip(rows, ks, v):
                top, left = windows[k]
                out[b, :, top:top + window, left:left + window] += v_k
        return out / covered[(H, W)]  # (B, C, H, W): the mean over the windows at each position
    return velocity
