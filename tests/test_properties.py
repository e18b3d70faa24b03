"""Properties the definitions imply, on random inputs of random sizes (hypothesis), for the metrics (metrics.py:
FD, precision / recall, the paired cosine, the bootstrap, the memorisation audit's distances), evaluate.py's
stratified draw of the guidance tiles, and the restaining scores (support/stain.py).

An example can agree with a buggy function by chance; a property holds for every input only if the definition
is implemented. Each test says which kind of bug it rules out. The sets are drawn with different means, scales
and sizes, so that a statistic taken from the wrong set cannot pass. hypothesis is seeded (derandomize), so CI
sees the same inputs every run.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance

import metrics as M
from support import stain

torch.set_num_threads(1)
# Pillow rounds, in 16-bit fixed point: (19595 R + 38470 G + 7471 B + 2^15) >> 16, weights within 4e-6 of BT.601's
PIL_ROUNDING = 0.5 + 3 * 255 * 4e-6
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
seeds = st.integers(0, 2**32 - 1)


def two_sets(seed, n1, n2, d):
    """Two feature sets that differ in size, mean and scale, with correlated dimensions."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d))
    x = rng.standard_normal((n1, d)) @ mix + rng.uniform(-3, 3, d)
    y = 2.5 * rng.standard_normal((n2, d)) @ mix + rng.uniform(-3, 3, d)
    return x, y


def fd_of(x, y):
    return M.fd(M.feature_stats(x), M.feature_stats(y))


# -------- Fréchet distance -------------------------------------------------------------------------------
@SETTINGS
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid's sqrtm(disp=False)
@given(seeds, st.integers(3, 60), st.integers(3, 60), st.integers(2, 6))
def test_fd_equals_pytorch_fids_formula(seed, n1, n2, d):
    """The closed form, as pytorch-fid computes it (mean and covariance with numpy, sqrtm with scipy): rules out
    a wrong term, a covariance normalised by n instead of n - 1, a mean of the wrong set. (d >= 2: pytorch-fid's
    sqrtm call fails on 1 x 1 matrices with this SciPy.)"""
    x, y = two_sets(seed, max(n1, d + 2), max(n2, d + 2), d)
    want = calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False, ddof=1).reshape(d, d),
                                      y.mean(0), np.cov(y, rowvar=False, ddof=1).reshape(d, d))
    assert fd_of(x, y) == pytest.approx(want, rel=1e-6, abs=1e-8)


@SETTINGS
@given(seeds, st.integers(3, 60), st.integers(3, 60), st.integers(1, 6), st.floats(-50, 50), st.floats(0.1, 10))
def test_fd_is_zero_on_one_set_symmetric_and_shift_and_order_invariant(seed, n1, n2, d, shift, scale):
    """FD(x, x) = 0 and FD(x, y) = FD(y, x) rule out a statistic read from the other set or the wrong argument;
    shifting both sets together changes nothing (covariances centred, means differenced); shuffling the samples
    changes nothing (no chunk or sample left out); scaling both by a scales FD by a^2 (no stray constant)."""
    x, y = two_sets(seed, n1, n2, d)
    rng = np.random.default_rng(seed + 1)
    base = fd_of(x, y)
    assert abs(fd_of(x, x)) <= 1e-9 * max(1.0, np.trace(np.atleast_2d(np.cov(x, rowvar=False))))
    assert fd_of(y, x) == pytest.approx(base, rel=1e-9, abs=1e-9)
    assert fd_of(x + shift, y + shift) == pytest.approx(base, rel=1e-7, abs=1e-7)
    assert fd_of(x[rng.permutation(n1)], y[rng.permutation(n2)]) == pytest.approx(base, rel=1e-9, abs=1e-9)
    assert fd_of(scale * x, scale * y) == pytest.approx(scale**2 * base, rel=1e-7, abs=1e-7)


@SETTINGS
@given(seeds, st.integers(2, 80), st.integers(1, 5), st.integers(1, 40), st.floats(-1e4, 1e4))
def test_the_chunked_statistics_equal_numpys_for_any_chunk_and_offset(seed, n, d, chunk, offset):
    """The mean and covariance summed chunk by chunk equal numpy's on the whole array: rules out a chunk
    dropped or counted twice, and cancellation when |mean| >> std."""
    x = np.random.default_rng(seed).standard_normal((n, d)) + offset
    stats = M.feature_stats(x, chunk=chunk)
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(stats.cov, np.atleast_2d(np.cov(x, rowvar=False)), rtol=1e-8, atol=1e-8)


@SETTINGS
@given(seeds, st.integers(4, 40), st.integers(4, 40), st.integers(1, 4), st.integers(1, 5))
def test_the_bootstrap_over_the_whole_set_is_fd(seed, n1, n2, d, draws):
    """Every draw of all the generated samples is the set itself: mean FD, std 0. Rules out draws taken from
    the real set, or the real set's statistics refitted on a draw."""
    x, y = two_sets(seed, n1, n2, d)
    mean, std, values, _ = M.bootstrap_fd(M.feature_stats(x), y, draws, size=len(y), seed=seed % 1000)
    assert values == pytest.approx([fd_of(x, y)] * draws, rel=1e-9) and std == pytest.approx(0, abs=1e-9)


@SETTINGS
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:FD from", "ignore:Matrix is singular")
@given(seeds, st.integers(3, 40), st.integers(4, 40), st.integers(2, 4), st.integers(2, 5))
def test_each_bootstrap_draw_is_pytorch_fids_fd_of_its_recorded_half(seed, n1, n2, d, draws):
    """Without a size, a draw is half the generated samples (rounded down); each value is pytorch-fid's FD of
    the real set against the draw's rows, and the std is numpy's sample std of those values. Rules out another
    default size, draws with replacement, and a std that is 0 or the population std for a few draws."""
    x, y = two_sets(seed, n1, n2, d)
    mean, std, values, subsets = M.bootstrap_fd(M.feature_stats(x), y, draws, seed=seed % 1000)
    assert subsets.shape == (draws, n2) and (subsets.sum(1) == n2 // 2).all()
    stats = lambda a: (a.mean(0), np.atleast_2d(np.cov(a, rowvar=False)))  # noqa: E731
    want = [calculate_frechet_distance(*stats(x), *stats(y[row])) for row in subsets]
    assert values == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert mean == pytest.approx(np.mean(want), rel=1e-6, abs=1e-6)
    assert std == pytest.approx(np.std(want, ddof=1), rel=1e-6, abs=1e-6)


# -------- Precision and recall (Kynkäänniemi et al. 2019) -----------------------------------------------------
@SETTINGS
@given(seeds, st.integers(5, 40), st.integers(5, 40), st.integers(1, 5), st.integers(1, 4))
def test_precision_of_real_against_generated_is_recall_with_the_roles_swapped(seed, n1, n2, d, k):
    """precision(real, gen) = recall(gen, real): rules out the radii taken from the wrong set."""
    x, y = two_sets(seed, n1, n2, d)
    precision, recall = M.precision_recall(x, y, k)
    assert M.precision_recall(y, x, k) == (recall, precision)


@SETTINGS
@given(seeds, st.integers(5, 40), st.integers(5, 40), st.integers(1, 5), st.integers(1, 4))
def test_far_outliers_lower_precision_and_leave_recall(seed, n1, n2, d, k):
    """k + 1 copies of one far point added to the generated set: none lies in a real sample's ball, so precision
    falls to exactly p n / (n + k + 1), and their own balls (radius 0) cover no real sample, so recall stays.
    Rules out precision and recall swapped, or radii computed on the other set. (A single far point would have
    a huge k-NN radius and could cover the real set: k-NN recall's known weakness, Naeem et al. 2020.)"""
    x, y = two_sets(seed, n1, n2, d)
    precision, recall = M.precision_recall(x, y, k)
    far = np.full((k + 1, d), 1e4)
    precision_out, recall_out = M.precision_recall(x, np.concatenate([y, far]), k)
    assert precision_out == pytest.approx(precision * n2 / (n2 + k + 1)) and recall_out == recall


# -------- The paired cosine ------------------------------------------------------------------------------------
@SETTINGS
@given(seeds, st.integers(2, 30), st.integers(1, 8))
def test_the_paired_cosine_follows_names_not_positions(seed, n, d):
    """Permuting both sets' rows and names together changes nothing; the value is numpy's mean cosine of the
    pairs named alike; each generated tile x_KK pairs with x. Rules out pairing by row position."""
    rng = np.random.default_rng(seed)
    real, gen = rng.standard_normal((n, d)) + 0.5, rng.standard_normal((n, d)) - 0.2
    names = [f"t{i}" for i in range(n)]
    gen_names = [f"t{i}_00" for i in range(n)]
    base = M.paired_cosine(names, real, gen_names, gen)
    want = np.sum(real * gen, 1) / (np.linalg.norm(real, axis=1) * np.linalg.norm(gen, axis=1))
    assert base[0] == pytest.approx(want.mean(), rel=1e-9, abs=1e-12) and base[2] == n
    p, q = rng.permutation(n), rng.permutation(n)
    moved = M.paired_cosine([names[i] for i in p], real[p], [gen_names[i] for i in q], gen[q])
    assert moved[0] == pytest.approx(base[0], rel=1e-9, abs=1e-12) and moved[1] == pytest.approx(base[1], abs=1e-12)


# -------- Restaining's scores ----------------------------------------------------------------------------------
images = st.tuples(seeds, st.integers(11, 40), st.integers(11, 40))


def image_of(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@SETTINGS
@given(images)
def test_the_grey_level_is_pillows_for_any_image(image):
    """Within PIL's rounding of the same weights: rules out the channels weighted in another order."""
    rgb = image_of(*image)
    pil = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)
    assert np.abs(stain.grey(rgb).numpy() - pil).max() <= PIL_ROUNDING


@SETTINGS
@given(images, seeds)
def test_ssim_is_symmetric_one_on_itself_bounded_and_scikit_images(image, other):
    """SSIM(a, a) = 1, SSIM(a, b) = SSIM(b, a), |SSIM| <= 1, and scikit-image's Gaussian SSIM on the same
    grey levels: rules out a variance of the wrong image, a wrong constant or window, padding."""
    from skimage.metrics import structural_similarity
    a = stain.grey(image_of(*image)).numpy()
    b = stain.grey(image_of(other, *image[1:])).numpy()
    assert stain.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert stain.ssim(a, b) == pytest.approx(stain.ssim(b, a), rel=1e-12, abs=1e-12) and abs(stain.ssim(a, b)) <= 1
    want = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert stain.ssim(a, b) == pytest.approx(want, rel=1e-9, abs=1e-12)


@SETTINGS
@given(images)
def test_the_optical_density_statistics_ignore_where_pixels_are(image):
    """The mean and spread of each channel's OD do not depend on pixel order, and white has OD 0: rules out a
    statistic of part of the tile, or another channel order."""
    rgb = image_of(*image)
    shuffled = rgb.reshape(-1, 3)[np.random.default_rng(image[0]).permutation(rgb.shape[0] * rgb.shape[1])]
    stats = stain.optical_density_stats(rgb)
    assert torch.allclose(stats, stain.optical_density_stats(shuffled.reshape(rgb.shape)), rtol=1e-12, atol=1e-12)
    od = -np.log10(np.maximum(rgb.reshape(-1, 3) / 255, 1e-6))
    np.testing.assert_allclose(stats.numpy(), np.concatenate([od.mean(0), od.std(0)]), rtol=1e-10, atol=1e-12)


@SETTINGS
@given(seeds, st.integers(5, 40), st.integers(5, 40), st.integers(1, 5), st.integers(1, 4), st.integers(1, 7))
def test_precision_and_recall_in_chunks_are_prdcs(seed, n1, n2, d, k, rows_per_chunk):
    """However few rows a chunk of the distance matrix holds, precision and recall are prdc's (the k-NN balls
    counted with `<=` as in the paper; prdc's `<` differs only on a tie, which random data does not make).
    Rules out a chunk whose count replaces the ones before it, or a chunk left out."""
    from unittest import mock

    from oracle_definitions import prdc_pr

    x, y = two_sets(seed, n1, n2, d)
    with mock.patch("fld.DIST_BUDGET", 4 * max(n1, n2) * rows_per_chunk):
        got = M.precision_recall(x, y, k)
    assert got == pytest.approx(prdc_pr(x, y, k), abs=1e-12)


# -------- The guidance tiles' draw, stratified by site (evaluate.py) ---------------------------------------------
@SETTINGS
@given(seeds, st.lists(st.integers(1, 30), min_size=1, max_size=6), st.floats(0, 1))
def test_each_site_gets_its_largest_remainder_share(seed, sizes, fraction):
    """Hamilton's apportionment, written again: each site gets the floor of its share n x size / total, and the
    sites with the largest remainders one more, until n; the rows are the site's own, drawn without
    replacement. Rules out a remainder given to the smallest remainders, or counted twice, or not at all."""
    import evaluate

    rows = [dict(tss=f"site{k}", path=f"site{k}/{i:03d}") for k, size in enumerate(sizes) for i in range(size)]
    n = round(fraction * len(rows))
    picked = evaluate.stratified(rows, n, seed % 1000)
    got = {f"site{k}": sum(r["tss"] == f"site{k}" for r in picked) for k in range(len(sizes))}
    shares = {f"site{k}": n * size / len(rows) for k, size in enumerate(sizes)}
    assert sum(got.values()) == n and len({r["path"] for r in picked}) == n
    assert all(r["path"].startswith(r["tss"] + "/") for r in picked)
    for site, share in shares.items():
        assert got[site] in (np.floor(share), np.floor(share) + 1)
    for a in shares:  # a site rounded up has a remainder at least that of every site rounded down
        for b in shares:
            if got[a] > np.floor(shares[a]) and got[b] == np.floor(shares[b]):
                assert shares[a] % 1 >= shares[b] % 1 - 1e-9


# -------- The memorisation audit's distances (metrics.copy_distances) ---------------------------------------------
@SETTINGS
@given(seeds, st.integers(1, 30), st.integers(1, 60), st.integers(1, 5), st.integers(1, 8), st.booleans())
def test_copy_distances_are_scipys_sorted_distances(seed, n_queries, n_train, d, n, duplicated):
    """d1, d2 and the ratio d1 / (scale x mean of the n nearest) from scipy's distance matrix, sorted; with one
    training row d2 is nan; a query whose n nearest are all at distance 0 (a duplicated training tile) has
    ratio 0. Rules out a neighbour dropped or counted twice, another scale, and a 0 / 0 left as nan."""
    import scipy.spatial

    rng = np.random.default_rng(seed)
    train = rng.normal(size=(n_train, d)) * 3 + 1
    if duplicated and n_train >= n:  # n copies of training row 0 (the query below sits on it)
        train[-n:] = train[0]
    queries = np.concatenate([train[:1], rng.normal(size=(n_queries, d)) * 2])
    out = M.copy_distances(queries, train, n=n, scale=0.5)
    dists = np.sort(scipy.spatial.distance.cdist(queries, train), axis=1)
    np.testing.assert_allclose(out["d1"], dists[:, 0], rtol=1e-6, atol=1e-6)  # the search runs in float32
    assert out["d1"][0] == 0 and (out["nearest"][0] == 0 or (train[out["nearest"][0]] == train[0]).all())
    if n_train == 1:
        assert np.isnan(out["d2"]).all()
    else:
        np.testing.assert_allclose(out["d2"], dists[:, 1], rtol=1e-6, atol=1e-6)
    local = 0.5 * dists[:, :n].mean(1)
    want = np.where(local > 1e-12, dists[:, 0] / np.where(local > 1e-12, local, 1), 0.0)
    np.testing.assert_allclose(out["ratio"], want, rtol=1e-5, atol=1e-6)
    assert not np.isnan(out["ratio"]).any()
