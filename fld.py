"""FLD, the Feature Likelihood Divergence (Jiralerspong et al. 2023), fit as the authors' code fits it.

CytoSyn §4.1 reports FLD beside FD. The density is an equal-weight mixture of isotropic Gaussians
centred on (at most 10k) generated samples; its per-component variances are fit on training features;
the score is the NLL of test features per dimension, minus a baseline MoG centred on half of the
training set and fit on the other half, x 100. All sets are standardised with the test mean and std.

The fit (marcojira/fld): Adam, lr 0.5, batches of 10k, at most 50 epochs; an extra "origin" component
at the training mean (squared distances scaled by 0.81) during the fit only; log-variances clamped to
[-40, 40] after every step; early stop from the 7th epoch on, once the mean epoch loss is within 5e-4
of each of the 4 epochs before it (the authors' "largest change over the last 5 epochs").

Left out: the authors' AuthPct and C_T test, and their cache of the training distances (recomputed per
batch here: cheap on a GPU, no N x M matrix in memory).
"""
import math

import numpy as np
import torch

FLD_GEN_SIZE = 10_000  # generated samples FLD uses (Jiralerspong et al.'s default)
FLD_EPOCHS, FLD_LR, FLD_BATCH = 50, 0.5, 10_000  # Adam on the per-component log-variances
FLD_ORIGIN_SCALE = 0.9  # the fit-time origin component sees distances shrunk by (1 - 0.1), squared: 0.81
FLD_LOGVAR_RANGE = (-40.0, 40.0)  # clamp after each step (components on duplicated points cannot reach NaN)
FLD_PATIENCE, FLD_TOLERANCE = 5, 5e-4  # early stop: the last 5 epoch losses within 5e-4 of the last one
DIST_BUDGET = 2**28  # bytes of float32 distances held at once


def row_chunks(n_rows, n_cols):
    """Row ranges of an (n_rows, n_cols) float32 distance matrix that fit DIST_BUDGET bytes each."""
    step = max(1, DIST_BUDGET // (4 * n_cols))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def converged(epoch_losses, patience=FLD_PATIENCE, tolerance=FLD_TOLERANCE):
    """True once more than `patience` + 1 epochs have run and the last mean epoch loss lies within
    `tolerance` of each of the `patience` - 1 before it (Jiralerspong et al.'s code: after the epoch of
    index `patience` (from 0), the largest |L - L[-j]|, j = 1..patience, below 5e-4; its j = 1 term is L
    itself, so the window is the last `patience` epochs, the current one included)."""
    if len(epoch_losses) <= patience + 1:
        return False
    recent = np.asarray(epoch_losses[-patience:])
    return float(np.abs(recent[-1] - recent).max()) < tolerance


class IsotropicMoG:
    """Equal-weight mixture of N(c_j, exp(logvar_j) I) on fixed centres c_j (M, D): FLD's density."""

    def __init__(self, centres):
        self.centres, (self.m, self.d) = centres, centres.shape
        self.logvar = torch.zeros(self.m, device=centres.device)
        self.epoch_losses, self.order = [], None

    def _log_normal(self, sq_dist, logvar):  # log N(x | c, exp(logvar) I) from |x - c|^2
        return -0.5 * sq_dist / logvar.exp() - 0.5 * self.d * (logvar + math.log(2 * math.pi))

    def _sq_dist(self, x):
        return torch.cdist(x, self.centres).square()  # (N, M)

    def nll(self, x):
        """Mean negative log-likelihood of x (N, D), per dimension."""
        total = 0.0
        for i, j in row_chunks(len(x), self.m):
            log_p = self._log_normal(self._sq_dist(x[i:j]), self.logvar) - math.log(self.m)  # (n, M)
            total -= torch.logsumexp(log_p, dim=1).sum().item()
        return total / (len(x) * self.d)

    def fit(self, x, epochs=FLD_EPOCHS, generator=None):
        """Fit the log-variances to maximise the likelihood of x (the training features), in batches of x's
        rows in a seeded order (kept in self.order); stops early."""
        self.order = torch.randperm(len(x), generator=generator).to(x.device)
        x = x[self.order]
        nearest = torch.stack([self._sq_dist(x[i:j]).min(0).values for i, j in row_chunks(len(x), self.m)])
        logvar = ((nearest.min(0).values + 1e-3) / self.d).log().requires_grad_()  # at its nearest point
        # As in Jiralerspong et al.'s code, one extra wide component (unweighted, own variance) at the
        # data mean keeps every point's likelihood finite during the fit; it is not part of the density.
        origin_logvar = torch.zeros((), device=x.device, requires_grad=True)
        origin_sq = FLD_ORIGIN_SCALE**2 * (x - x.mean(0)).square().sum(1, keepdim=True)  # (N, 1)
        opt = torch.optim.Adam([logvar, origin_logvar], lr=FLD_LR)
        self.epoch_losses = []
        for _ in range(epochs):
            batch_losses = []
            for i in range(0, len(x), FLD_BATCH):
                sq = self._sq_dist(x[i:i + FLD_BATCH])  # (b, M)
                log_p = torch.cat([self._log_normal(sq, logvar) - math.log(self.m),  # (b, M + 1)
                                   self._log_normal(origin_sq[i:i + FLD_BATCH], origin_logvar)], 1)
                loss = -torch.logsumexp(log_p, dim=1).mean() / self.d
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    logvar.clamp_(*FLD_LOGVAR_RANGE)
                batch_losses.append(loss.item())
            self.epoch_losses.append(float(np.mean(batch_losses)))
            if converged(self.epoch_losses):
                break
        self.logvar = logvar.detach()
        return self


def fld(train, test, gen, gen_size=FLD_GEN_SIZE, epochs=FLD_EPOCHS, seed=0, device="cpu"):
    """FLD = 100 (NLL_test - NLL_baseline); gap = 100 (NLL_train - NLL_test), very negative = memorised.

    The MoG is centred on (at most gen_size) generated samples with its variances fit on train; the
    baseline MoG is centred on min(n_gen, n_train / 2) training samples and fit on the rest. "subsets"
    holds the rows each step used, so the number can be recomputed: the generated rows (the centres),
    the training rows in the order of the fit's batches, and the baseline's centres and fit rows (in
    that order), all as indices into gen and train."""
    g = torch.Generator().manual_seed(seed)
    train, test, gen = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)
                        for a in (train, test, gen))
    picked = torch.arange(len(gen))
    if len(gen) > gen_size:
        picked = torch.randperm(len(gen), generator=g)[:gen_size]
        gen = gen[picked.to(device)]
    # NOTE: dims constant on the test set (std 0: dead ReLU channels, tiny sets) are dropped; Jiralerspong
    # et al.'s code divides by that 0 and returns NaN.
    mean, std = test.mean(0), test.std(0)
    keep = std > 0
    train, test, gen = ((a[:, keep] - mean[keep]) / std[keep] for a in (train, test, gen))
    mog = IsotropicMoG(gen).fit(train, epochs, g)
    nll_test, nll_train = mog.nll(test), mog.nll(train)
    perm, split = torch.randperm(len(train), generator=g).to(device), min(len(gen), len(train) // 2)
    base = IsotropicMoG(train[perm[:split]]).fit(train[perm[split:]], epochs, g)
    baseline = base.nll(test)
    subsets = dict(generated=picked, fit_order=mog.order, baseline_centres=perm[:split],
                   baseline_fit_order=perm[split:][base.order.to(device)])
    return dict(fld=100 * (nll_test - baseline), fld_gap=100 * (nll_train - nll_test), nll_test=nll_test,
                nll_train=nll_train, nll_baseline=baseline, n_gen=len(gen), n_dims=int(keep.sum()),
                fit_epochs=len(mog.epoch_losses), baseline_fit_epochs=len(base.epoch_losses),
                subsets={k: v.cpu().numpy() for k, v in subsets.items()})
