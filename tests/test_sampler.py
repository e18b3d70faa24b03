"""sampler.py against an exact answer: Gaussian data, whose velocity field is known in closed form.

For x ~ N(mu, S), eps ~ N(0, I) and x_t = (1 - t) x + t eps, the pair (v = eps - x, x_t) is jointly Gaussian:
    E[x_t] = (1 - t) mu,   C_t = Cov(x_t) = (1 - t)^2 S + t^2 I,   Cov(v, x_t) = t I - (1 - t) S,
so the exact (optimal) velocity is the regression
    v*(x_t, t) = E[eps - x | x_t] = -mu + (t I - (1 - t) S) C_t^{-1} (x_t - (1 - t) mu).
A correct sampler driven by v* must turn N(0, I) noise into N(mu, S). The ODE map is affine, so with
noise whitened to exactly zero mean and identity covariance its only error is discretisation; the SDE adds
Brownian sampling error (~ sqrt(d^2 / n)). Wrong variants (time reversed, score sign flipped, score
dropped) are injected into the real module by monkeypatching and must miss by orders of magnitude.
"""
import pytest
import torch

import sampler

torch.set_num_threads(1)
N_SAMPLES = 20_000
MEAN_TOL = 0.06  # whitened mean error |S^-1/2 (m - mu)|; sampling std ~ sqrt(d / n) = 0.014 in 4-D
COV_TOL = 0.1  # whitened covariance error |S^-1/2 C S^-1/2 - I|_F; measured 0.03-0.04 (SDE), <0.03 (ODE)
F64 = torch.float64


def gaussian_velocity(mu_uncond, S):
    """The exact velocity v* of N(mu, S); mu is cond's row (B, d), or mu_uncond when dropped / cond is None."""
    d = S.shape[0]
    identity = torch.eye(d, dtype=F64)

    def model(x, t, cond, drop=None):
        t = float(t[0])  # every sampler call uses one t for the whole batch
        mu = mu_uncond.expand(x.shape[0], d) if cond is None else cond.to(F64).clone()
        if drop is not None:
            mu[drop] = mu_uncond
        C = (1 - t) ** 2 * S + t ** 2 * identity
        K = (t * identity - (1 - t) * S) @ torch.linalg.inv(C)
        return (-mu + (x.to(F64) - (1 - t) * mu) @ K.T).to(x.dtype)
    return model


def gaussian(d):
    """A fixed N(mu, S): correlated in 2-D, a rotated spectrum 0.25..2 in 4-D."""
    if d == 2:
        return torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    spectrum = torch.diag(torch.tensor([0.25, 0.5, 1, 2], dtype=F64))
    return torch.tensor([0.5, -1.0, 1.5, 0.0], dtype=F64), Q @ spectrum @ Q.T


def whitened_noise(n, d, seed=0):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    L = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(L, z.T, upper=False).T  # sample mean 0, sample covariance I


def moment_errors(x, mu, S):
    """(|S^-1/2 (mean - mu)|, |S^-1/2 cov S^-1/2 - I|_F): 0 for a perfect sample, scale-free."""
    L = torch.linalg.cholesky(S)
    y = torch.linalg.solve_triangular(L, (x - mu).T, upper=False).T
    return y.mean(0).norm().item(), (torch.cov(y.T) - torch.eye(len(mu), dtype=F64)).norm().item()


SAMPLERS = {
    "euler": lambda m, z, **kw: sampler.euler_sampler(m, z, num_steps=250, **kw),
    "heun": lambda m, z, **kw: sampler.euler_sampler(m, z, num_steps=50, heun=True, **kw),
    "sde": lambda m, z, **kw: sampler.euler_maruyama_sampler(
        m, z, num_steps=250, generator=torch.Generator().manual_seed(1), **kw),
}


@pytest.mark.parametrize("d", [2, 4])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_gaussian(name, d):
    mu, S = gaussian(d)
    x = SAMPLERS[name](gaussian_velocity(mu, S), whitened_noise(N_SAMPLES, d))
    assert x.dtype == F64
    mean_err, cov_err = moment_errors(x, mu, S)
    assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)


def test_sde_is_invariant_to_diffusion_coefficient(monkeypatch):
    """Any w(t) gives the same marginals when drift and noise agree: a check on the score formula."""
    monkeypatch.setattr(sampler, "diffusion_coefficient", lambda t: 0.5 * t)
    mu, S = gaussian(2)
    mean_err, cov_err = moment_errors(SAMPLERS["sde"](gaussian_velocity(mu, S), whitened_noise(N_SAMPLES, 2)), mu, S)
    assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)


_ode_grid, _sde_grid, _score = sampler.ode_time_grid, sampler.sde_time_grid, sampler.score_from_velocity
BROKEN = {  # (sampler, attribute of sampler.py, wrong replacement)
    "euler-time-reversed": ("euler", "ode_time_grid", lambda n: _ode_grid(n)[::-1]),
    "heun-time-reversed": ("heun", "ode_time_grid", lambda n: _ode_grid(n)[::-1]),
    "sde-time-reversed": ("sde", "sde_time_grid", lambda n: _sde_grid(n)[::-1]),
    "sde-drift-sign": ("sde", "score_from_velocity", lambda v, x, t: -_score(v, x, t)),  # v + w s / 2
    "sde-no-score": ("sde", "score_from_velocity", lambda v, x, t: torch.zeros_like(x)),  # noise, no correction
    "sde-double-score": ("sde", "score_from_velocity", lambda v, x, t: 2 * _score(v, x, t)),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_sampler_misses_gaussian(case, monkeypatch):
    """The moment test has teeth: each deliberately wrong variant of the real sampler fails it."""
    name, attr, wrong = BROKEN[case]
    monkeypatch.setattr(sampler, attr, wrong)
    mu, S = gaussian(4)
    x = SAMPLERS[name](gaussian_velocity(mu, S), whitened_noise(N_SAMPLES, 4))
    mean_err, cov_err = moment_errors(x, mu, S)
    assert not (mean_err < 10 * MEAN_TOL and cov_err < 5 * COV_TOL), (mean_err, cov_err)  # nan also misses


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_guidance_reaches_guided_gaussian(name):
    """With the same S, uncond + s (cond - uncond) is the exact velocity of N(mu_u + s (mu_c - mu_u), S)."""
    mu_u, S = gaussian(2)
    mu_c, s = torch.tensor([0.0, 1.0], dtype=F64), 2.5
    z = whitened_noise(N_SAMPLES, 2)
    cond = mu_c.expand(N_SAMPLES, 2)
    x = SAMPLERS[name](gaussian_velocity(mu_u, S), z, cond=cond, cfg_scale=s, guidance_low=0.0, guidance_high=1.0)
    mean_err, cov_err = moment_errors(x, mu_u + s * (mu_c - mu_u), S)
    assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)


class CountingModel:
    """Fake velocity model recording (batch size, drop, dtypes) of every call; returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, drop=None):
        self.calls.append(dict(B=x.shape[0], t=float(t[0]), drop=drop, x_dtype=x.dtype, t_dtype=t.dtype,
                               cond=cond))
        return torch.zeros_like(x)

    def guided(self):
        return sum(c["drop"] is not None for c in self.calls)


def run(name, model, cond, num_steps=10, cfg_scale=2.5, low=0.25, high=0.65, **kw):
    x = torch.randn(3, 4, 2, 2)
    if name == "sde":
        return sampler.euler_maruyama_sampler(model, x, cond, num_steps, cfg_scale, low, high, **kw)
    return sampler.euler_sampler(model, x, cond, num_steps, cfg_scale, low, high, heun=name == "heun", **kw)


# 10 steps; window [0.25, 0.65] (edges away from grid points). ODE grid 1, .9, ..., .1 -> .6 .5 .4 .3;
# SDE grid linspace(1, .04, 10) = 1, .893, .787, .68, .573, .467, .36, .253, .147, .04 -> 4;
# Heun also evaluates at t_next for the first 9 steps: .9 ... .1 -> 4 more.
@pytest.mark.parametrize("name,total,guided", [("euler", 10, 4), ("heun", 19, 8), ("sde", 10, 4)])
def test_guidance_only_inside_window(name, total, guided):
    model = CountingModel()
    run(name, model, torch.randn(3, 8))
    assert len(model.calls) == total and model.guided() == guided
    for c in model.calls:  # guided calls: one batched forward, cond rows then null rows
        inside = 0.25 <= c["t"] <= 0.65
        assert (c["drop"] is not None) == inside
        if inside:
            assert c["B"] == 6 and c["drop"].tolist() == [False] * 3 + [True] * 3
            assert torch.equal(c["cond"][:3], c["cond"][3:])
        else:
            assert c["B"] == 3


@pytest.mark.parametrize("low,high,guided", [(0.0, 0.75, 3), (0.25, 0.5, 2), (0.3, 0.4, 0)])
def test_guidance_window_is_closed(low, high, guided):
    """Both window ends are inclusive: Euler on the grid 1, .75, .5, .25 (exact floats)."""
    model = CountingModel()
    run("euler", model, torch.randn(3, 8), num_steps=4, low=low, high=high)
    assert model.guided() == guided


@pytest.mark.parametrize("name", ["euler", "heun", "sde"])
@pytest.mark.parametrize("cfg_scale,cond", [(1.0, torch.randn(3, 8)), (2.5, None)])
def test_no_guidance_at_scale_one_or_without_cond(name, cfg_scale, cond):
    model = CountingModel()
    run(name, model, cond, cfg_scale=cfg_scale, low=0.0, high=1.0)
    assert model.guided() == 0 and all(c["B"] == 3 for c in model.calls)
    assert all((c["cond"] is None) == (cond is None) for c in model.calls)


def test_cfg_arithmetic():
    """uncond + s (cond - uncond), with the cond half first in the batched forward."""
    def model(x, t, cond, drop=None):
        v = torch.ones_like(x) * cond[:, :1, None, None]  # conditional rows: cond value
        return torch.where(drop[:, None, None, None], torch.full_like(x, 10.0), v)  # null rows: 10
    x, cond = torch.zeros(2, 4, 2, 2, dtype=F64), torch.tensor([[3.0], [-1.0]])
    v = sampler.cfg_velocity(model, x, 0.5, cond, 2.5, 0.0, 1.0, torch.float32)
    expected = 10 + 2.5 * (torch.tensor([3.0, -1.0]) - 10)
    assert v.dtype == F64 and torch.allclose(v, expected.to(F64)[:, None, None, None].expand_as(v))


def test_network_dtype_and_float64_state():
    """The model sees x and cond in `dtype` (here bf16) and t in float32 (bf16 would round the 250-step
    grid onto 248 values); the returned state is float64."""
    model = CountingModel()
    x = run("sde", model, torch.randn(3, 8), dtype=torch.bfloat16)
    assert x.dtype == F64
    assert all(c["x_dtype"] == c["cond"].dtype == torch.bfloat16 for c in model.calls)
    assert all(c["t_dtype"] == torch.float32 for c in model.calls)


def test_sde_is_deterministic_given_generator():
    mu, S = gaussian(2)
    m, z = gaussian_velocity(mu, S), torch.randn(64, 2, dtype=F64)
    a, b, c = (sampler.euler_maruyama_sampler(m, z, num_steps=20, generator=torch.Generator().manual_seed(s))
               for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sde_last_step_is_noise_free_drift_step():
    """Near-point-mass data: the ODE lands on the point, the SDE keeps a residual std of SDE_T_END.

    With y the noise left at t = SDE_T_END, REPA-E's last step x + dt (v - w s / 2) maps y to -y instead of
    removing it (a probability-flow step would remove it); a noisy last step would give ~1.7x that std.
    """
    mu, S = torch.tensor([1.0, -1.0], dtype=F64), 1e-6 * torch.eye(2, dtype=F64)
    m, z = gaussian_velocity(mu, S), torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x_sde = SAMPLERS["sde"](m, z)
    assert torch.allclose(x_sde.mean(0), mu, atol=0.002)
    assert torch.allclose(x_sde.std(0), torch.full((2,), sampler.SDE_T_END, dtype=F64), rtol=0.1)
    assert x_sde.std(0).max() < 0.05 and SAMPLERS["euler"](m, z).std(0).max() < 0.002


def test_sde_per_row_generators_make_rows_independent_of_the_batch():
    """One generator per row: a row's sample depends on its seed, not on which rows share its batch."""
    mu, S = gaussian(2)
    m, z = gaussian_velocity(mu, S), torch.randn(4, 2, dtype=F64)

    def rows(idx):
        gens = [torch.Generator().manual_seed(100 + i) for i in idx]
        return sampler.euler_maruyama_sampler(m, z[idx], num_steps=20, generator=gens)
    assert torch.allclose(rows([0, 1, 2, 3])[2:], rows([2, 3]), rtol=0, atol=1e-6)
    assert not torch.allclose(rows([0, 1, 2, 3])[2:], rows([3, 2]), atol=1e-3)


def test_time_grids():
    assert sampler.ode_time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    grid = sampler.sde_time_grid(250)
    assert len(grid) == 251 and grid[0] == 1.0 and grid[-2] == pytest.approx(sampler.SDE_T_END) and grid[-1] == 0.0


# -- starting at t_start < 1 (SDEdit, sample.py --restain) ------------------------------------------------
def times_seen(monkeypatch, name, num_steps, **kw):
    """The Python-float times at which the sampler asks for a velocity (zero velocity, no guidance)."""
    seen, real = [], sampler.cfg_velocity

    def recording(model, x, t, *args):
        seen.append(t)
        return real(model, x, t, *args)
    monkeypatch.setattr(sampler, "cfg_velocity", recording)
    run(name, CountingModel(), None, num_steps=num_steps, **kw)
    return seen


@pytest.mark.parametrize("name", ["euler", "sde"])
def test_t_start_one_is_the_papers_grid_bit_for_bit(name, monkeypatch):
    grid = sampler.ode_time_grid(250) if name == "euler" else sampler.sde_time_grid(250)
    assert times_seen(monkeypatch, name, 250) == grid[:-1]  # exact float equality, every step
    assert times_seen(monkeypatch, name, 250, t_start=1.0)[-250:] == grid[:-1]


@pytest.mark.parametrize("name,t_start,start,end,count", [
    ("euler", 0.5, 0.5, 0.05, 10), ("sde", 0.5, 0.5, sampler.SDE_T_END, 10),
    ("sde", 0.03, 0.03, 0.003, 10)])  # below SDE_T_END: plain Euler steps on linspace(0.03, 0, 11)
def test_t_start_grids(name, t_start, start, end, count, monkeypatch):
    seen = times_seen(monkeypatch, name, 10, t_start=t_start)
    assert seen == pytest.approx(torch.linspace(start, end, count, dtype=F64).tolist(), abs=1e-12)


def noised_gaussian(mu, S, t, n):
    """Exact samples of x_t = (1 - t) x + t eps for x ~ N(mu, S): N((1 - t) mu, (1 - t)^2 S + t^2 I), whitened."""
    C = (1 - t) ** 2 * S + t ** 2 * torch.eye(len(mu), dtype=F64)
    return (1 - t) * mu + whitened_noise(n, len(mu), seed=3) @ torch.linalg.cholesky(C).T


@pytest.mark.parametrize("name,t_start", [("euler", 0.5), ("heun", 0.5), ("sde", 0.5), ("sde", 0.03)])
def test_sampler_from_t_start_reproduces_gaussian(name, t_start):
    """Started from the exact marginal at t_start, every sampler must land on N(mu, S)."""
    mu, S = gaussian(4)
    x = SAMPLERS[name](gaussian_velocity(mu, S), noised_gaussian(mu, S, t_start, N_SAMPLES), t_start=t_start)
    mean_err, cov_err = moment_errors(x, mu, S)
    assert mean_err < MEAN_TOL and cov_err < COV_TOL, (mean_err, cov_err)


@pytest.mark.parametrize("name", ["euler", "sde"])
def test_a_sampler_that_ignores_t_start_misses_gaussian(name, monkeypatch):
    monkeypatch.setattr(sampler, "start_at", lambda grid, t_start, t_end: grid)  # integrates from t = 1
    mu, S = gaussian(4)
    x = SAMPLERS[name](gaussian_velocity(mu, S), noised_gaussian(mu, S, 0.5, N_SAMPLES), t_start=0.5)
    mean_err, cov_err = moment_errors(x, mu, S)
    assert not (mean_err < 5 * MEAN_TOL and cov_err < 5 * COV_TOL), (mean_err, cov_err)  # measured >= 0.4, 0.18
