"""metrics.py against answers known in closed form or by construction.

FD is checked against an independent float64 formula (eigenvalues of the non-symmetric S1 S2), against
Gaussians whose FD is known exactly, and for its invariants (self = 0, symmetry, N < d). Precision and
recall run on point sets whose answer is fixed by construction, including a point exactly on a radius
(`<=` counts it). FLD must punish a generator that copies its training set. What a user publishes is pinned on cases
worked out by hand: the bootstrap's FD values are those of subsets of the generated set, the shuffled
cosine is that of a derangement, and each row of the command line's report equals its definition.
"""
import json
import re
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image

import extractors as F
import metrics as M
from conftest import write_tiles

torch.set_num_threads(1)


def correlated(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ (scale * mix + np.eye(d)) + shift


def reference_fd(x, y):
    """Independent of metrics.py: np.cov and the eigenvalues of the non-symmetric product S1 S2."""
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()


# ---------------------------------------------------------------------------------- FD
def test_fd_matches_independent_reference_and_streaming_is_exact():
    rng = np.random.default_rng(0)
    x, y = correlated(rng, 600, 32, 3.0), correlated(rng, 500, 32, 3.2, scale=1.5)
    chunked = M.feature_stats(x, chunk=7)  # 86 chunks with a remainder
    np.testing.assert_allclose(chunked.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(chunked.cov, np.cov(x, rowvar=False), rtol=1e-11, atol=1e-13)
    ours = M.fd(chunked, M.feature_stats(y))
    assert ours == pytest.approx(reference_fd(x, y), rel=1e-8)


def test_fd_of_a_set_with_itself_is_zero():
    x = correlated(np.random.default_rng(1), 400, 48, 5.0)
    s = M.feature_stats(x)
    assert abs(M.fd(s, s)) < 1e-10 * np.trace(s.cov)


def test_fd_of_gaussians_in_closed_form():
    rng = np.random.default_rng(2)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)  # diagonal: sum (sqrt a - sqrt b)^2
    expected = (mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    q = rng.standard_normal((d, d))  # c I against a full SPD matrix: Tr (c S)^1/2 = sqrt(c) sum sqrt eig S
    s2, c = q @ q.T + 0.1 * np.eye(d), 2.5
    expected = d * c + np.trace(s2) - 2 * np.sqrt(c) * np.sqrt(np.linalg.eigvalsh(s2)).sum()
    assert M.frechet_distance(mu1, c * np.eye(d), mu1, s2) == pytest.approx(expected, rel=1e-10)


def test_fd_is_symmetric():
    rng = np.random.default_rng(3)
    s1, s2 = M.feature_stats(correlated(rng, 300, 24)), M.feature_stats(correlated(rng, 300, 24, 1, 2))
    assert M.fd(s1, s2) == pytest.approx(M.fd(s2, s1), rel=1e-10)


def test_fd_with_fewer_samples_than_dims_is_finite_non_negative_and_warns():
    rng = np.random.default_rng(4)
    x, y = correlated(rng, 20, 64), correlated(rng, 30, 64, 0.5)
    with pytest.warns(UserWarning, match="rank-deficient"):
        value, self_value = M.fd(M.feature_stats(x), M.feature_stats(y)), M.fd(M.feature_stats(x), M.feature_stats(x))
    assert np.isfinite(value) and value > 0
    assert abs(self_value) < 1e-9 * np.trace(np.cov(x, rowvar=False))  # rank 19 of 64: no sqrt-noise


def test_bootstrap_draws_distinct_subsets():
    rng = np.random.default_rng(6)
    real, fake = M.feature_stats(correlated(rng, 500, 8)), correlated(rng, 400, 8, 0.2)
    mean, std, values, drawn = M.bootstrap_fd(real, fake, draws=5, size=200, seed=0)
    assert len(set(values)) == 5 and std > 0 and mean == pytest.approx(np.mean(values))
    assert drawn.shape == (5, 400) and (drawn.sum(1) == 200).all() and len({d.tobytes() for d in drawn}) == 5
    with pytest.raises(ValueError, match="bootstrap size"):
        M.bootstrap_fd(real, fake, draws=2, size=401)


# ---------------------------------------------------------------------------------- P / R, cosine
def test_precision_recall_identical_sets():
    x = np.random.default_rng(7).standard_normal((200, 8))
    assert M.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_disjoint_far_clusters():
    rng = np.random.default_rng(8)
    assert M.precision_recall(rng.standard_normal((100, 8)), 100 + rng.standard_normal((100, 8))) == (0.0, 0.0)


def test_precision_recall_subset_is_precise_but_misses_a_mode():
    rng = np.random.default_rng(9)
    mode_a, mode_b = rng.standard_normal((100, 8)), 50 + rng.standard_normal((100, 8))
    precision, recall = M.precision_recall(np.concatenate([mode_a, mode_b]), mode_a[:60])
    assert precision == 1.0 and recall < 1.0
    assert recall <= 0.5  # no point of mode B can be covered


def test_precision_counts_a_point_exactly_on_the_radius():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k = 3: the radius of 0 is 3
    fake = np.array([[-3.0], [50.0], [51.0], [52.0]])  # -3: distance 3 from 0, outside every other ball
    assert M.precision_recall(real, fake, k=3)[0] == 0.25  # `<` would give 0


def test_paired_cosine_pairs_by_stem():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((3, 5))
    mean, std, n = M.paired_cosine(["a", "b", "c"], real, ["c", "x", "a"], real[[2, 0, 0]])
    assert (n, mean, std) == (2, pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))  # x has no partner
    with pytest.raises(ValueError, match="stem"):
        M.paired_cosine(["a"], real[:1], ["z"], real[:1])
    # sample.py's names: every sample x_kk of x pairs with x; an exact stem wins over the stripped one
    mean, _, n = M.paired_cosine(["a", "a_01", "b"], real, ["a_00", "a_01", "b_07", "b_7"], real[[0, 1, 2, 0]])
    assert (n, mean) == (3, pytest.approx(1.0))


# ---------------------------------------------------------------------------------- FLD
def test_fld_punishes_memorisation():
    rng = np.random.default_rng(11)
    train, test, fresh = (rng.standard_normal((n, 16)) for n in (1000, 500, 500))
    honest = M.fld(train, test, fresh, epochs=20)  # 20 of the 50 Adam epochs: the ranking is settled
    copycat = M.fld(train, test, train[:500], epochs=20)  # a generator that returns training tiles
    assert honest["fld"] < copycat["fld"]
    assert copycat["fld_gap"] < -100 < honest["fld_gap"]  # copies: train NLL far below test NLL


def reference_mog_fit(train, centres, perm, max_epochs=50):
    """The authors' fit written out again from its description (not from fld.py): one cached distance
    matrix, Adam lr 0.5, an origin component at 0.81 x the squared distance to the training mean, clamp to
    [-40, 40], and the early stop of their code: after epoch index 5, once the mean loss is within 5e-4 of
    each of the last 5 epoch means (itself included)."""
    x = train[perm]
    d = x.shape[1]
    sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # (N, M), exact, no cdist
    origin_sq = 0.81 * ((x - x.mean(0)) ** 2).sum(1, keepdim=True)
    logvar = ((sq.min(0).values + 1e-3) / d).log().requires_grad_()
    origin_logvar = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([logvar, origin_logvar], lr=0.5)

    def log_normal(s, lv):
        return -0.5 * s / lv.exp() - 0.5 * d * lv - 0.5 * d * np.log(2 * np.pi)

    means = []
    for epoch in range(max_epochs):
        lp = torch.cat([log_normal(sq, logvar) - np.log(len(centres)), log_normal(origin_sq, origin_logvar)], 1)
        loss = -torch.logsumexp(lp, 1).mean() / d  # one batch: the set is smaller than 10k
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logvar.clamp_(-40, 40)
        means.append(loss.item())
        if epoch > 5 and max(abs(means[-1] - m) for m in means[-5:]) < 5e-4:
            break
    return logvar.detach(), len(means)


def test_fld_fit_equals_a_reference_of_the_early_stopped_fit():
    from fld import IsotropicMoG
    rng = np.random.default_rng(3)
    train = torch.tensor(rng.standard_normal((300, 16)), dtype=torch.float32)
    centres = torch.tensor(rng.standard_normal((40, 16)), dtype=torch.float32)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    for copies in (False, True):
        if copies:  # a generated sample that copies a training point: its variance collapses (-34 in 50 epochs)
            centres[0] = train[5]
        mog = IsotropicMoG(centres).fit(train, 50, torch.Generator().manual_seed(0))
        ref_logvar, ref_epochs = reference_mog_fit(train, centres, perm)
        assert len(mog.epoch_losses) == ref_epochs
        assert torch.allclose(mog.logvar, ref_logvar, atol=1e-3, rtol=1e-4)
        assert (ref_epochs == 50) if copies else (5 < ref_epochs < 50)  # stopped early, at the same epoch
    assert -40 <= mog.logvar.min() < -20


def test_fld_early_stop_rule():
    """Jiralerspong et al.'s rule: from the 7th epoch on, stop once the last mean loss is within 5e-4 of
    each of the 4 before it; steady small steps that add up to more do not stop the fit."""
    from fld import converged
    flat = [1.0, 0.5, 0.4, 0.3] + [0.2] * 6
    assert not converged(flat[:8]) and converged(flat[:9])
    assert not converged([1.0] * 6) and converged([1.0] * 7)  # never before the 7th epoch
    assert not converged([0.2] * 6 + [0.2 + 6e-4])
    assert not converged([1.0 - 2e-4 * i for i in range(12)])  # each change 2e-4, 8e-4 over the window


def test_fld_ignores_dims_that_are_constant_on_the_test_set():
    rng = np.random.default_rng(12)
    train, test, gen = (rng.standard_normal((n, 8)) for n in (300, 200, 200))
    test[:, 3], train[:, 3] = 0.0, 1e11  # a dead channel: no test variance, huge elsewhere
    out = M.fld(train, test, gen, epochs=5)
    assert out["n_dims"] == 7 and np.isfinite([out["fld"], out["fld_gap"]]).all()


def test_fld_is_a_function_of_its_seed_alone():
    """Every random choice (the generated rows kept when there are more than gen_size, the fit's batch order,
    the baseline's split) comes from the seed: the same seed twice gives the same number and rows, another
    seed other rows; the global random state plays no part. The translation and scale of the features do not
    matter either (FLD standardises on the test set)."""
    rng = np.random.default_rng(13)
    train, test, gen = (rng.standard_normal((n, 6)) * s + m for n, s, m in ((120, 1, 0), (80, 1.5, 1), (90, 2, -1)))
    torch.manual_seed(0)
    first = M.fld(train, test, gen, gen_size=50, epochs=3, seed=4)
    torch.manual_seed(1)
    again = M.fld(train, test, gen, gen_size=50, epochs=3, seed=4)
    moved = M.fld(train * 3 + 7, test * 3 + 7, gen * 3 + 7, gen_size=50, epochs=3, seed=4)
    other = M.fld(train, test, gen, gen_size=50, epochs=3, seed=5)
    assert first["fld"] == again["fld"] and first["fld_gap"] == again["fld_gap"]
    assert first["fld"] == pytest.approx(moved["fld"], rel=1e-3, abs=1e-3)
    for key, rows in first["subsets"].items():
        assert np.array_equal(rows, again["subsets"][key]), key
    assert len(first["subsets"]["generated"]) == 50 == len(set(first["subsets"]["generated"]))
    assert not np.array_equal(first["subsets"]["generated"], other["subsets"]["generated"])
    assert not np.array_equal(first["subsets"]["fit_order"], other["subsets"]["fit_order"])


# ---------------------------------------------------------------------------------- tiles, cache, CLI
@pytest.mark.filterwarnings("ignore:FD from 6 samples")  # 6 tiles, 48 dims: expected here
def test_command_line_writes_every_setting_next_to_each_number(tmp_path):
    real = write_tiles(tmp_path / "real", ["t0", "t1", "t2", "t3", "t4", "t5"], seed=0)
    fake = write_tiles(tmp_path / "fake", [f"t{i}_00" for i in range(6)], seed=1)  # sample.py's names
    out = tmp_path / "report"
    rc = M.main(["--val", str(real), "--generated", str(fake), "--extractors", "tiny,conch-v1", "--random-weights",
                 "--metrics", "fd,pr,cosine", "--crop", "224", "--jpeg-generated", "70", "--k", "2", "--device", "cpu",
                 "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    report = json.loads((out / "metrics.json").read_text())
    assert rc == 1 and report["skipped"][0]["extractor"] == "conch-v1"  # unavailable: reported, not fatal
    assert [r["metric"] for r in report["results"]] == ["fd", "precision", "recall", "cosine"]
    for row in report["results"]:
        s = row["settings"]
        assert np.isfinite(row["value"]) and s["weights"] == "random(seed=0)" and s["n_val"] == 6
        assert s["preprocess"]["generated"] == {"jpeg": 70, "crop": 224, "kernel": "bicubic",  # tiny's own kernel
                                           "resize_to_input": False}
        assert s["resize"] == {"val": "none (224 px tiles)", "generated": "none (224 px tiles)"} and not s["degenerate"]
        assert s["preprocess"]["val"]["jpeg"] is None and s["extractor"]["dim"] == 48


def test_command_line_bad_input_is_one_line(tmp_path, one_line_error):
    real = write_tiles(tmp_path / "real", ["t0", "t1"], seed=0)
    args = ["--extractors", "tiny", "--random-weights", "--device", "cpu", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r")]
    assert re.search(r"error: .*nope: no such folder", one_line_error(M.main, ["--val", str(real), "--generated",
                                                                             str(tmp_path / "nope")] + args))
    Image.new("RGB", (224, 200)).save(tmp_path / "real" / "wide.png")
    assert re.search(r"error: .*real holds tiles of 2 sizes .*--resize-to-input",
                     one_line_error(M.main, ["--val", str(real), "--generated", str(real)] + args))
    assert re.search(r"error: .*wide.png is 224x200 px, not a square tile",
                     one_line_error(M.main, ["--val", str(real), "--generated", str(real), "--crop", "200"] + args))
    assert not (tmp_path / "r").exists()  # nothing written
    assert "argument --jpeg-generated: 0 is outside the allowed range [1, 100]" in one_line_error(
        M.main, ["--val", str(real), "--generated", str(real), "--jpeg-generated", "0"])  # checked when parsed


def test_mixed_sizes_need_an_explicit_resize_and_the_report_says_which(tmp_path, capsys):
    real = write_tiles(tmp_path / "real", ["a", "b", "c", "d"], size=256)
    write_tiles(real, ["e"], size=240, seed=3)
    fake = write_tiles(tmp_path / "fake", ["a_00", "b_00", "c_00", "d_00"], size=224, seed=1)
    out = tmp_path / "r"
    M.main(["--val", str(real), "--generated", str(fake), "--extractors", "tiny", "--random-weights", "--device",
            "cpu", "--num-workers", "0", "--no-cache", "--resize-to-input", "--out", str(out)])
    resize = json.loads((out / "metrics.json").read_text())["results"][0]["settings"]["resize"]
    assert resize == {"val": "mixed -> 224 px, PIL bicubic (antialiased when shrinking)",
                      "generated": "none (224 px tiles)"}


def test_worker_errors_come_back_as_one_line_naming_the_file(tmp_path, one_line_error):
    real = write_tiles(tmp_path / "real", ["a", "b", "c"], size=224)
    data = (real / "b.png").read_bytes()
    (real / "b.png").write_bytes(data[:len(data) // 2])  # truncated
    line = one_line_error(M.main, ["--val", str(real), "--generated", str(real), "--extractors", "tiny",
                                   "--random-weights", "--device", "cpu", "--num-workers", "1", "--no-cache", "--out",
                                   str(tmp_path / "r")])
    assert "b.png could not be decoded" in line


def test_same_tiles_are_a_degenerate_comparison_and_random_extractors_reproduce(tmp_path, capsys):
    real = write_tiles(tmp_path / "real", ["a", "b", "c", "d", "e"], size=224)
    copy = write_tiles(tmp_path / "copy", ["a", "b", "c", "d", "e"], size=224)  # byte-identical, other folder
    fake = write_tiles(tmp_path / "fake", ["a", "b", "c", "d", "e"], size=224, seed=1)
    args = ["--extractors", "tiny", "--random-weights", "--device", "cpu", "--num-workers", "0", "--seed", "3"]
    reports = []
    for n, (a, b) in enumerate(((real, copy), (real, fake), (real, fake))):
        out = tmp_path / f"r{n}"
        M.main(["--val", str(a), "--generated", str(b), "--cache-dir", str(tmp_path / f"cache{n}"),
                "--out", str(out)] + args)
        reports.append(json.loads((out / "metrics.json").read_text()))
    assert reports[0]["degenerate"] and reports[0]["results"][0]["settings"]["degenerate"]
    assert "degenerate comparison" in capsys.readouterr().err
    assert not reports[1]["degenerate"]
    values = [[r["value"] for r in rep["results"]] for rep in reports[1:]]
    assert values[0] == values[1] and values[0][0] > 0  # two runs, two caches: the same numbers


# ---------------------------------------------------------------------------------- known answers, boundaries
def test_precision_recall_and_cosine_known_values():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k = 1: every real radius is 1
    fake = np.array([[0.5], [10.0], [2.9], [20.0]])  # 0.5 and 2.9 fall inside a real ball; 10 and 20 do not
    assert M.precision_recall(real, fake, k=1) == (0.5, 1.0)
    mean, std, n = M.paired_cosine(["a", "b"], np.array([[1.0, 0.0], [0.0, 1.0]]), ["a_00", "b_00"],
                                   np.array([[1.0, 1.0], [0.0, -1.0]]))
    cosines = np.array([1 / np.sqrt(2), -1.0])
    assert n == 2 and mean == pytest.approx(cosines.mean()) and std == pytest.approx(cosines.std())


# ---------------------------------------------------------------------------------- pinned by hand
def test_bootstrap_fd_values_are_the_fds_of_generated_subsets_known_by_hand():
    """1-D: FD(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2. Real [0, 2]: mean 1, variance 2.
    Generated [0, 1, 4], subsets of 2: {0, 1} -> (1 - 0.5)^2 + (sqrt 2 - sqrt 0.5)^2 = 0.75;
    {0, 4} -> (1 - 2)^2 + (sqrt 2 - sqrt 8)^2 = 3; {1, 4} -> (1 - 2.5)^2 + (sqrt 2 - sqrt 4.5)^2 = 2.75."""
    real, generated = np.array([[0.0], [2.0]]), np.array([[0.0], [1.0], [4.0]])
    mean, std, values, drawn = M.bootstrap_fd(M.feature_stats(real), generated, draws=30, size=2, seed=0)
    by_hand = np.array([0.75, 3.0, 2.75])
    nearest = by_hand[np.abs(np.array(values)[:, None] - by_hand).argmin(1)]
    np.testing.assert_allclose(values, nearest, rtol=1e-9)  # each draw is a subset of the generated set
    assert set(nearest) == set(by_hand)  # 30 seeded draws meet all three subsets
    assert drawn.shape == (30, 3) and (drawn.sum(1) == 2).all()  # the recorded draws: 2 of the 3 each
    np.testing.assert_allclose(values, by_hand[[{(0, 1): 0, (0, 2): 1, (1, 2): 2}[tuple(np.flatnonzero(d))]
                                                for d in drawn]], rtol=1e-9)  # each value is its draw's FD
    assert mean == pytest.approx(np.mean(values), rel=1e-12) and std == pytest.approx(np.std(values, ddof=1))
    assert M.bootstrap_fd(M.feature_stats(real), generated, draws=30, size=2, seed=0)[2] == values  # seeded
    assert M.bootstrap_fd(M.feature_stats(real), generated, draws=30, size=2, seed=1)[2] != values


def test_bootstrap_subsets_are_drawn_without_replacement_from_the_generated_set():
    """Every value is the FD of the full real set against one 3-subset of 6 generated points (all 20
    enumerated by hand with np.cov); draws with replacement or from the real set would give other values."""
    rng = np.random.default_rng(13)
    real, generated = rng.standard_normal((40, 2)) * [1.0, 3.0], rng.standard_normal((6, 2)) + [2.0, 0.0]
    subsets = {s: reference_fd(real, generated[list(s)]) for s in combinations(range(6), 3)}
    mean, std, values, _ = M.bootstrap_fd(M.feature_stats(real), generated, draws=60, size=3, seed=4)
    hits = [min(subsets, key=lambda s: abs(subsets[s] - v)) for v in values]
    np.testing.assert_allclose(values, [subsets[s] for s in hits], rtol=1e-8)
    assert len(set(hits)) >= 15  # uniform draws over the 20 subsets, not one subset again and again
    assert (mean, std) == (pytest.approx(np.mean([subsets[s] for s in hits]), rel=1e-9),
                           pytest.approx(np.std([subsets[s] for s in hits], ddof=1), rel=1e-9))


def test_shuffled_cosine_is_the_cosine_of_a_derangement_known_by_hand():
    import evaluate
    real = np.array([[1.0, 0.0], [0.0, 1.0]])
    gen = np.array([[1.0, 0.0], [1.0, 1.0]])
    paired = M.paired_cosine(["a", "b"], real, ["a_00", "b_00"], gen)
    assert paired == (pytest.approx((1 + 2 ** -0.5) / 2), pytest.approx((1 - 2 ** -0.5) / 2), 2)
    for seed in range(4):  # two tiles: the one derangement swaps them, whatever the seed
        shuffled = evaluate.shuffled_cosine(["a", "b"], real, ["a_00", "b_00"], gen, seed)
        assert shuffled[:3] == (pytest.approx(2 ** -0.5 / 2), pytest.approx(2 ** -0.5 / 2), 2)  # cos 0 and 45°
        assert list(shuffled[3]) == [1, 0]  # the order recorded: real row 0 stands in for row 1 and back
    real3 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    gen3 = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [4.0, 0.0, 1.0]])  # each near its own tile, unequally
    cos = lambda i, j: real3[i] @ gen3[j] / np.linalg.norm(gen3[j])  # noqa: E731 (real rows are unit)
    cycles = {round(np.mean([cos(1, 0), cos(2, 1), cos(0, 2)]), 12),  # real i paired with generated j
              round(np.mean([cos(2, 0), cos(0, 1), cos(1, 2)]), 12)}
    seen = set()
    for seed in range(8):  # three tiles: one of the two 3-cycles, never a tile against its own sample
        mean, _, n, _ = evaluate.shuffled_cosine(["x", "y", "z"], real3, ["x_00", "y_00", "z_00"], gen3, seed)
        assert n == 3 and round(mean, 12) in cycles
        seen.add(round(mean, 12))
    assert seen == cycles  # drawn at random by the seed, not one fixed shift (neighbours are alike in a slide)
    assert M.paired_cosine(["x", "y", "z"], real3, ["x_00", "y_00", "z_00"], gen3)[0] == \
        pytest.approx(np.mean([cos(0, 0), cos(1, 1), cos(2, 2)]))


@pytest.mark.filterwarnings("ignore:FD from")
def test_command_line_rows_hold_precision_recall_fd_bootstrap_and_cosine_by_hand(tmp_path, monkeypatch):
    """The generated set copies (almost) 6 tiles of mode A of a two-mode real set: precision 1, recall
    below one half. Each report row must equal its definition computed here on the same features."""
    rng = np.random.default_rng(14)
    real = np.concatenate([rng.standard_normal((20, 2)), 50 + rng.standard_normal((20, 2))])
    gen = real[:6] + 0.01 * rng.standard_normal((6, 2))
    names = {"real": [f"t{i:02d}" for i in range(40)], "fake": [f"t{i:02d}_00" for i in range(6)]}
    feats = {"real": real, "fake": gen}
    for folder, stems in names.items():
        write_tiles(tmp_path / folder, stems, size=8)
    monkeypatch.setattr(M, "extract_features", lambda folder, **kw: (names[folder.name], feats[folder.name]))
    M.main(["--val", str(tmp_path / "real"), "--generated", str(tmp_path / "fake"), "--extractors", "tiny",
            "--random-weights", "--metrics", "fd,pr,bootstrap,cosine", "--bootstrap-draws", "20", "--device", "cpu",
            "--num-workers", "0", "--no-cache", "--out", str(tmp_path / "r")])
    rows = {r["metric"]: r for r in json.loads((tmp_path / "r" / "metrics.json").read_text())["results"]}
    assert rows["precision"]["value"] == 1.0 and rows["recall"]["value"] <= 0.5  # not swapped
    assert (rows["precision"]["value"], rows["recall"]["value"]) == M.precision_recall(real, gen, 3)
    assert rows["fd"]["value"] == pytest.approx(reference_fd(real, gen), rel=1e-8)
    boot = rows["fd_bootstrap"]
    subsets = [reference_fd(real, gen[list(s)]) for s in combinations(range(6), 3)]
    assert boot["settings"]["size"] == 3 and len(boot["settings"]["values"]) == 20
    assert all(min(abs(v - s) / s for s in subsets) < 1e-8 for v in boot["settings"]["values"])  # generated subsets
    assert (boot["value"], boot["std"]) == (pytest.approx(np.mean(boot["settings"]["values"])),
                                            pytest.approx(np.std(boot["settings"]["values"], ddof=1)))
    cos = (real[:6] * gen).sum(1) / np.linalg.norm(real[:6], axis=1) / np.linalg.norm(gen, axis=1)
    assert (rows["cosine"]["value"], rows["cosine"]["std"]) == (pytest.approx(cos.mean()), pytest.approx(cos.std()))
    assert rows["cosine"]["settings"]["n_pairs"] == 6


@pytest.mark.parametrize("random_weights", [True, False])
def test_the_command_line_builds_the_weights_it_records_and_batches_as_asked(tmp_path, monkeypatch, random_weights):
    """metrics.py's wiring: --random-weights reaches the extractor it builds (and the weights each row records),
    --seed its random weights, --batch-size the batches it sees, and --cache-dir the one cache: a rerun builds
    nothing, --no-cache writes none."""
    real, fake = write_tiles(tmp_path / "real", list("abcde")), write_tiles(tmp_path / "fake", list("vwxyz"))
    built, batches = [], []

    class Recorder:
        def embed(self, x, bf16=False):
            batches.append(len(x))
            return torch.randn(len(x), F.EXTRACTORS["tiny"].dim, generator=torch.Generator().manual_seed(len(batches)))

    def build(name, pretrained, device, seed):
        built.append((name, pretrained, seed))
        return Recorder()
    monkeypatch.setattr(M, "build_extractor", build)
    argv = ["--val", str(real), "--generated", str(fake), "--extractors", "tiny", "--metrics", "fd", "--seed", "7",
            "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"),
            *(["--random-weights"] if random_weights else [])]
    M.main(argv + ["--out", str(tmp_path / "a")])
    assert built == [("tiny", not random_weights, 7)] and batches == [2, 2, 1] * 2  # one build, both folders
    weights = json.loads((tmp_path / "a" / "metrics.json").read_text())["results"][0]["settings"]["weights"]
    assert weights == ("random(seed=7)" if random_weights else str(F.EXTRACTORS["tiny"].hub))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    M.main(argv + ["--out", str(tmp_path / "b")])  # the same folders again: both from the cache
    assert len(built) == 1
    M.main(argv + ["--no-cache", "--cache-dir", str(tmp_path / "none"), "--out", str(tmp_path / "c")])
    assert len(built) == 2 and not (tmp_path / "none").exists()
