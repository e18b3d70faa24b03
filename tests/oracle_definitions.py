"""The benchmark's numbers from their definitions, sharing no code with the project (tests/test_oracle.py).

FD as pytorch-fid computes it, precision and recall as prdc computes them (Kynkäänniemi et al. 2019), the paired
cosine with numpy, the bootstrap of FD (CytoSyn §5) over recorded draws, and FLD (Jiralerspong et al. 2023)
written again in float64 from the authors' definition, with its gradient by hand. Nothing here imports the
code under test.
"""
import numpy as np
import prdc
from pytorch_fid.fid_score import calculate_frechet_distance


def fid_fd(real, gen):
    """pytorch-fid's FD of the two sets' Gaussians (float64 means and np.cov covariances, as pytorch-fid takes them)."""
    real, gen = real.astype(np.float64), gen.astype(np.float64)
    return float(calculate_frechet_distance(real.mean(0), np.cov(real, rowvar=False), gen.mean(0),
                                            np.cov(gen, rowvar=False)))


def prdc_pr(real, gen, k):
    """prdc's improved precision and recall (Kynkäänniemi et al. 2019). prdc counts a sample inside a k-NN ball
    with `<` (prdc/prdc.py, compute_prdc), the paper and the code under test with `<=`: the two differ only
    where a distance equals a radius exactly, which continuous features never give."""
    scores = prdc.compute_prdc(real_features=real, fake_features=gen, nearest_k=k)
    return float(scores["precision"]), float(scores["recall"])


def numpy_cosines(real, gen):
    """Cosine of each row of gen with the same row of real -> (mean, std (ddof 0), n)."""
    a, b = real.astype(np.float64), gen.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean()), float(cos.std()), len(cos)


def bootstrap_by_definition(real, gen, drawn, draws):
    """Table 5 (§5): FD of the full real set against each drawn half of the generated set -> mean, std (ddof 1).
    The draws are the run's, recorded as a (draws, N) mask; each must be a half of the generated set."""
    assert drawn.shape == (draws, len(gen)) and drawn.dtype == bool and (drawn.sum(1) == len(gen) // 2).all()
    values = [fid_fd(real, gen[row]) for row in drawn]
    return float(np.mean(values)), float(np.std(values, ddof=1)), values


def log_normal(sq, logvar, dim):
    """log N(x | c, exp(logvar) I) from the squared distance |x - c|^2."""
    return -0.5 * sq * np.exp(-logvar) - 0.5 * dim * (logvar + np.log(2 * np.pi))


def logsumexp(a):
    top = a.max(1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(1, keepdims=True)))[:, 0]


def mog_nll(x, centres, logvar):
    """Mean NLL per dimension of x under the equal-weight isotropic MoG on the centres."""
    sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # (N, M)
    return float(-logsumexp(log_normal(sq, logvar, x.shape[1]) - np.log(len(centres))).mean() / x.shape[1])


def fit_logvars(x, centres):
    """Jiralerspong et al.'s fit of the per-component log-variances to x, rows in the recorded order, written from
    their definition in float64 with the gradient by hand: Adam (lr 0.5, betas 0.9 / 0.999, eps 1e-8), batches
    of 10k, at most 50 epochs; initial log((min squared distance to a training point + 1e-3) / D); an extra
    origin component (unweighted, its own log-variance from 0) at the training mean, its squared distances
    x 0.81, during the fit only; log-variances clamped to [-40, 40] after each step; stop after epoch index 5
    once the epoch's mean loss is within 5e-4 of each of the last 5 epoch means."""
    (n, dim), m = x.shape, len(centres)
    sq = np.concatenate([((x[:, None, :] - centres[None]) ** 2).sum(-1),
                         0.81 * ((x - x.mean(0)) ** 2).sum(1, keepdims=True)], 1)  # (N, M + 1), origin last
    params = np.append(np.log((sq[:, :m].min(0) + 1e-3) / dim), 0.0)
    first, second, step, losses = np.zeros(m + 1), np.zeros(m + 1), 0, []
    weights = np.append(np.full(m, -np.log(m)), 0.0)
    for epoch in range(50):
        batch_losses = []
        for i in range(0, n, 10_000):
            batch = sq[i:i + 10_000]
            a = log_normal(batch, params, dim) + weights  # (b, M + 1)
            lse = logsumexp(a)
            batch_losses.append(-lse.mean() / dim)
            resp = np.exp(a - lse[:, None])
            grad = -(resp * (0.5 * batch * np.exp(-params) - 0.5 * dim)).sum(0) / (len(batch) * dim)
            step += 1
            first, second = 0.9 * first + 0.1 * grad, 0.999 * second + 0.001 * grad**2
            params = params - 0.5 * (first / (1 - 0.9**step)) / (np.sqrt(second / (1 - 0.999**step)) + 1e-8)
            params[:m] = np.clip(params[:m], -40, 40)
        losses.append(float(np.mean(batch_losses)))
        if epoch > 5 and max(abs(losses[-1] - past) for past in losses[-5:]) < 5e-4:
            break
    return params[:m], len(losses)


def fld_by_definition(train, test, gen, subsets, max_generated):
    """FLD (Jiralerspong et al. 2023) from the rows the run recorded, each checked against the definition: every
    set standardised with the test set's mean and std; the MoG centred on <= max_generated generated
    samples, fit on the training set; the baseline centred on min(n_gen, n_train / 2) training samples and fit
    on the others; FLD = 100 (NLL_test - NLL_baseline), gap = 100 (NLL_train - NLL_test)."""
    picked, order = subsets["generated"], subsets["fit_order"]
    centres_b, order_b = subsets["baseline_centres"], subsets["baseline_fit_order"]
    assert len(set(picked)) == len(picked) == min(len(gen), max_generated) and set(picked) <= set(range(len(gen)))
    assert sorted(order) == list(range(len(train)))
    assert len(set(centres_b)) == len(centres_b) == min(len(picked), len(train) // 2)
    assert sorted([*centres_b, *order_b]) == list(range(len(train)))  # the baseline fits on all the other rows
    mean, std = test.astype(np.float64).mean(0), test.astype(np.float64).std(0, ddof=1)
    keep = std > 0  # the code's NOTE: dims constant on the test set are dropped (none are here)
    train, test, gen = ((x.astype(np.float64)[:, keep] - mean[keep]) / std[keep] for x in (train, test, gen))
    logvar, epochs = fit_logvars(train[order], gen[picked])
    logvar_b, epochs_b = fit_logvars(train[order_b], train[centres_b])
    nll_test, nll_train = mog_nll(test, gen[picked], logvar), mog_nll(train, gen[picked], logvar)
    nll_baseline = mog_nll(test, train[centres_b], logvar_b)
    return dict(fld=100 * (nll_test - nll_baseline), fld_gap=100 * (nll_train - nll_test), nll_test=nll_test,
                nll_train=nll_train, nll_baseline=nll_baseline, n_gen=len(picked), n_dims=int(keep.sum()),
                fit_epochs=epochs, baseline_fit_epochs=epochs_b)
