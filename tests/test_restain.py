"""sample.py --restain (SDEdit from t = --strength, guided by a style tile) and --cond-mean (the mean CLS of tiles or
of a feature array), end to end with conftest.py's tiny random checkpoint; and the restaining measures of
support/stain.py (SSIM, optical-density statistics) on hand-computed cases.
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from support import stain
from support.cli import InputError
from test_sample_cli import FAST, TILE_DIR, TILES, grid_of, png, pngs, run

torch.set_num_threads(1)
# Pillow rounds, in 16-bit fixed point: (19595 R + 38470 G + 7471 B + 2^15) >> 16, weights within 4e-6 of BT.601's
PIL_ROUNDING = 0.5 + 3 * 255 * 4e-6
CONTENT, STYLE = TILES[:2], TILES[2]
STEMS = [os.path.splitext(os.path.basename(p))[0] for p in CONTENT]


def restain(ckpt, out, strength, *extra):
    run("--ckpt", ckpt, "--restain", *CONTENT, "--style", STYLE, "--strength", strength, "--out", out, *FAST, *extra)
    return [png(out / f"{s}.png").astype(int) for s in STEMS]


def vae_reconstructions(ckpt):
    """decode(encode(x).mean) of the content tiles with the EMA VAE, as uint8 pixels: what strength -> 0 must give."""
    pipe = sample.load_pipeline(ckpt, device="cpu")
    x = torch.stack([torch.from_numpy(png(p).copy()).permute(2, 0, 1) for p in CONTENT]).float() / 127.5 - 1
    with torch.no_grad():
        images = pipe.vae.decode(pipe.vae.encode(x).mean)
    return [((im.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(int) for im in images]


def test_a_tiny_strength_gives_the_vae_reconstruction_and_a_larger_one_moves_away(ckpt, tmp_path):
    recon = vae_reconstructions(ckpt)
    distance = {s: np.mean([np.abs(a - b).mean() for a, b in zip(restain(ckpt, tmp_path / str(s), s), recon)])
                for s in (1e-4, 0.01, 0.1)}
    # The random tiny VAE's decoder magnifies a latent change: measured 0.09, 8.7 and 66 grey levels (two random
    # latents decode 78 apart).
    assert distance[1e-4] < 0.5, distance  # the content's reconstruction, within rounding
    assert 5 * distance[1e-4] < distance[0.01] < distance[0.1] / 3, distance


def test_restain_writes_a_tile_per_content_tile_a_grid_and_the_scores(ckpt, tmp_path, capsys):
    capsys.readouterr()
    results = restain(ckpt, tmp_path / "r", 0.5)
    assert pngs(tmp_path / "r") == sorted(f"{s}.png" for s in STEMS)
    grid = png(grid_of(tmp_path / "r"))
    assert grid.shape == (2 * 224, 3 * 224, 3)  # rows: content | style | result
    assert np.array_equal(grid[224:, :224], png(CONTENT[1])) and np.array_equal(grid[:224, 224:448], png(STYLE))
    assert np.array_equal(grid[224:, 448:], results[1])
    scores = json.loads((tmp_path / "r" / "restain.json").read_text())
    assert scores["strength"] == 0.5 and sorted(scores["tiles"]) == sorted(STEMS)
    expected = stain.restain_scores(results[0].astype(np.uint8), png(CONTENT[0]), png(STYLE))
    assert scores["tiles"][STEMS[0]] == pytest.approx(expected)
    assert scores["mean"]["content_kept"] == pytest.approx(np.mean([t["content_kept"]
                                                                    for t in scores["tiles"].values()]))
    out = capsys.readouterr().out
    assert f"{STEMS[0]}: content kept {expected['content_kept']:+.3f}" in out and "stain moved" in out


def test_restain_rerun_with_another_strength_is_refused(ckpt, tmp_path):
    restain(ckpt, tmp_path / "r", 0.5)
    with pytest.raises(ValueError, match=r"strength: 0.5 -> 0.25"):
        restain(ckpt, tmp_path / "r", 0.25)
    with pytest.raises(ValueError, match=r"style: \[.*\] -> \[.*\]"):
        run("--ckpt", ckpt, "--restain", *CONTENT, "--style", TILES[3], "--strength", 0.5, "--out", tmp_path / "r",
            *FAST)


def test_the_python_api_restains_as_the_cli(ckpt, tmp_path):
    results = restain(ckpt, tmp_path / "r", 0.5)
    pipe = sample.load_pipeline(ckpt, device="cpu")
    style = pipe.encode_tiles(torch.from_numpy(png(STYLE).copy()).permute(2, 0, 1)[None])
    images = pipe(h0_mini_embeds=style, restain_from=[Image.open(p) for p in CONTENT], strength=0.5,
                  num_inference_steps=4, batch_size=2)["images"]
    assert [np.asarray(im).astype(int).tolist() for im in images] == [r.tolist() for r in results]
    with pytest.raises(ValueError, match=r"strength=0: 0 is outside the allowed range \(0, 1\]"):
        pipe(h0_mini_embeds=style, restain_from=[png(CONTENT[0])], strength=0)
    with pytest.raises(ValueError, match=r"needs h0_mini_embeds, the style's CLS"):
        pipe(restain_from=[png(CONTENT[0])])
    with pytest.raises(ValueError, match=r"restain_from\[0\] .* shape \(200, 224, 3\)"):
        pipe(h0_mini_embeds=style, restain_from=[png(CONTENT[0])[:200]])


@pytest.mark.parametrize("argv, words", [
    (["--strength", "0"], "--strength: 0 is outside the allowed range (0, 1]"),
    (["--strength", "1.5"], "--strength: 1.5 is outside the allowed range (0, 1]"),
    (["--strength", "nan"], "--strength: nan is outside the allowed range (0, 1]")])
def test_strength_outside_zero_one_is_refused(argv, words, ckpt):
    with pytest.raises(InputError, match=re.escape(words)):
        sample.parse_args(["--ckpt", ckpt, "--restain", CONTENT[0], "--style", STYLE, *argv])


@pytest.mark.parametrize("argv, words", [
    (["--restain", TILES[0]], "takes --style STYLE_TILE"),
    (["--cond", TILES[0], "--style", STYLE], "go with --restain only"),
    (["--cond", TILES[0], "--strength", "0.5"], "go with --restain only"),
    (["--restain", TILES[0], "--style", STYLE, "--n", "2"], "one tile per content tile"),
    (["--restain", TILES[0], "--style", "tests/data/tiles"], "give one tile file"),
    (["--cond-mean", TILES[0], "x.npy"], "or one .npy feature array, not both")])
def test_restain_and_cond_mean_misuse_is_refused_in_one_line(argv, words, ckpt, tmp_path, one_line_error):
    assert words in one_line_error(sample.main, ["--ckpt", ckpt, *argv, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# -- --cond-mean ---------------------------------------------------------------------------------------
def test_cond_mean_of_one_tile_is_cond_of_that_tile(ckpt, tmp_path):
    run("--ckpt", ckpt, "--cond", TILES[0], "--n", 2, "--seed", 3, "--out", tmp_path / "cond", *FAST)
    run("--ckpt", ckpt, "--cond-mean", TILES[0], "--n", 2, "--seed", 3, "--out", tmp_path / "mean", *FAST)
    assert pngs(tmp_path / "mean") == ["mean_00.png", "mean_01.png"]
    for k in range(2):
        assert (tmp_path / "mean" / f"mean_{k:02d}.png").read_bytes() == \
            (tmp_path / "cond" / f"{STEMS[0]}_{k:02d}.png").read_bytes()


def test_cond_mean_of_a_feature_array_is_its_mean_row(ckpt, tmp_path):
    """Also LazySlide's (N, 2 D) CLS + mean-patch layout: the mean of the CLS half."""
    (tmp_path / "in").mkdir()
    feats = np.random.default_rng(0).normal(size=(3, 48)).astype(np.float32) * 3
    np.save(tmp_path / "in" / "slide.npy", np.concatenate([feats, np.full_like(feats, 100.0)], axis=1))
    np.save(tmp_path / "in" / "mean.npy", feats.astype(np.float64).mean(0).astype(np.float32)[None])
    np.save(tmp_path / "in" / "first.npy", feats[:1])
    for name, flag in (("slide", "--cond-mean"), ("mean", "--features"), ("first", "--features")):
        run("--ckpt", ckpt, flag, tmp_path / "in" / f"{name}.npy", "--n", 1, "--out", tmp_path / name, *FAST)
    mean, slide = png(tmp_path / "mean" / "000000_00.png"), png(tmp_path / "slide" / "mean_00.png")
    assert np.array_equal(mean, slide)
    assert np.abs(slide.astype(int) - png(tmp_path / "first" / "000000_00.png")).mean() > 2  # not one row's
    pipe = sample.load_pipeline(ckpt, device="cpu")  # the Python API: the mean row as h0_mini_embeds
    api = pipe(h0_mini_embeds=feats.mean(0, keepdims=True), num_inference_steps=4)["images"][0]
    assert np.abs(np.asarray(api).astype(int) - slide).max() <= 1  # float32 vs float64 sums: a rounding flip


def test_cond_mean_folder_averages_its_tiles(ckpt, tmp_path, monkeypatch):
    """A folder of tiles conditions on the mean of their CLS features, encoded a chunk at a time."""
    f = {os.path.basename(p): np.random.default_rng(i).normal(size=48).astype(np.float32) * 3
         for i, p in enumerate(TILES)}
    monkeypatch.setattr(sample.TileSource, "features", lambda self, idx, pipe: torch.from_numpy(
        np.stack([f[os.path.basename(self.paths[i])] for i in idx])))
    monkeypatch.setattr("support.sampling.MEAN_CHUNK", 3)  # several chunks, the last one short
    run("--ckpt", ckpt, "--cond-mean", TILE_DIR, "--n", 1, "--out", tmp_path / "folder", *FAST)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "mean.npy", np.mean([v.astype(np.float64) for v in f.values()], 0).astype(np.float32))
    run("--ckpt", ckpt, "--features", tmp_path / "in" / "mean.npy", "--n", 1, "--out", tmp_path / "mean", *FAST)
    assert np.abs(png(tmp_path / "folder" / "mean_00.png").astype(int)
                  - png(tmp_path / "mean" / "000000_00.png")).max() <= 1


# -- the measures (support/stain.py) -----------------------------------------------------------------
def texture(seed, size=32):
    return np.random.default_rng(seed).uniform(40, 200, size=(size, size))


def test_ssim_of_identical_images_is_one_and_of_constants_is_the_luminance_term():
    x = texture(0)
    assert stain.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    c1 = (0.01 * 255) ** 2
    a, b = np.full((16, 16), 100.0), np.full((16, 16), 150.0)
    assert stain.ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-12)
    assert stain.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def naive_ssim(x, y):
    """Eq. 13-16 of Wang et al. (2004) window by window: 11 x 11 Gaussian weights (sigma 1.5), K = 0.01, 0.03."""
    r = np.arange(11) - 5
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    c1, c2, values = (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            p, q = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mp, mq = (w * p).sum(), (w * q).sum()
            vp, vq, cov = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum(), (w * (p - mp) * (q - mq)).sum()
            values.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    return np.mean(values)


def test_ssim_matches_the_equations_window_by_window():
    x, noise = texture(1), texture(2) - 120
    for y in (x + 30, x + 0.5 * noise, 255 - x, texture(3)):  # an offset, noise, the negative, another image
        assert stain.ssim(x, y) == pytest.approx(naive_ssim(x, y), rel=1e-9)
        assert stain.ssim(y, x) == pytest.approx(stain.ssim(x, y), rel=1e-12)
    assert stain.ssim(x, 255 - x) < 0 < stain.ssim(x, x + 0.5 * noise) < stain.ssim(x, x + 30) < 1


def test_optical_density_statistics_by_hand():
    white, black = np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)
    assert stain.optical_density_stats(white).tolist() == [0.0] * 6
    assert stain.optical_density_stats(black).tolist() == pytest.approx([6.0] * 3 + [0.0] * 3)  # floored at 1e-6
    half = white.copy()
    half[:2, :, 0] = 0  # red: half 0, half 255 -> mean and (population) std 6 / 2
    assert stain.optical_density_stats(half).tolist() == pytest.approx([3.0, 0, 0, 3.0, 0, 0])
    chw = torch.from_numpy(half).permute(2, 0, 1)  # a tile as support.sampling reads it
    assert torch.equal(stain.optical_density_stats(chw), stain.optical_density_stats(half))


def test_restain_scores_of_the_content_and_of_the_style_themselves():
    content, style = png(TILES[0]), png(TILES[5])
    kept = stain.restain_scores(content, content, style)  # nothing moved
    assert kept["ssim_to_content"] == pytest.approx(1.0) and kept["od_distance_to_content"] == 0.0
    assert kept["content_kept"] > 0 > kept["stain_moved"]
    swapped = stain.restain_scores(style, content, style)  # the style tile itself: all moved
    assert swapped["content_kept"] < 0 < swapped["stain_moved"]
    assert swapped["stain_moved"] == pytest.approx(-kept["stain_moved"])


def test_stain_balance_tells_eosin_from_haematoxylin():
    """Ruifrok and Johnston's deconvolution: a pure eosin-like pink leans to E, a haematoxylin-like purple to H,
    and the white share counts glass."""
    pink, purple = np.full((8, 8, 3), (230, 160, 200), np.uint8), np.full((8, 8, 3), (100, 50, 150), np.uint8)
    assert stain.stain_balance(pink)[0] < 0 < stain.stain_balance(purple)[0]
    half_white = np.concatenate([purple[:4], np.full((4, 8, 3), 250, np.uint8)])
    assert stain.stain_balance(half_white)[1] == 0.5 and stain.stain_balance(purple)[1] == 0.0


# -------- The scores against the libraries they claim to equal -------------------------------------------------
def test_the_grey_level_is_pillows_l_conversion_unrounded():
    """PIL's "L" is L = (299 R + 587 G + 114 B) / 1000, rounded: ours is the same sum before rounding. A saturated
    colour per channel makes a swapped weight (R <-> B) miss by tens of grey levels."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image[0, :3] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    pil = np.asarray(Image.fromarray(image).convert("L"), dtype=np.float64)
    assert np.abs(stain.grey(image).numpy() - pil).max() <= PIL_ROUNDING


def test_ssim_equals_scikit_images_gaussian_ssim():
    from skimage.metrics import structural_similarity
    x, noise = texture(1), texture(2) - 120
    for y in (x + 30, x + 0.5 * noise, 255 - x, texture(3)[:, ::-1]):
        want = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255)
        assert stain.ssim(x, y) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_optical_density_and_stains_equal_scikit_images_colour_deconvolution():
    """scikit-image's rgb2hed (Ruifrok and Johnston's H, E and DAB vectors) on the same pixels; its stain
    separation with the identity matrix is the optical density in its units (divided by the floor's, 6)."""
    from skimage.color import rgb2hed, separate_stains
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image[0, :4] = [(0, 0, 0), (255, 255, 255), (230, 160, 200), (100, 50, 150)]  # black, white, pink, purple
    od = separate_stains(image, np.eye(3)).reshape(-1, 3) * 6
    np.testing.assert_allclose(stain.optical_density(image).numpy(), od, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stain.stain_concentrations(image).numpy(), rgb2hed(image).reshape(-1, 3),
                               rtol=1e-10, atol=1e-12)
    h, e = rgb2hed(image)[..., 0].mean(), rgb2hed(image)[..., 1].mean()
    assert stain.stain_balance(image)[0] == pytest.approx(h - e, rel=1e-10)


def test_the_white_share_counts_pixels_by_their_mean_over_channels_above_the_glass_level():
    """Half the pixels white, side by side with purple ones (a column split, so a mean over another axis than the
    channels would mix them), and a pixel exactly at the glass level, which is not glass."""
    purple, white = np.full((8, 4, 3), (100, 50, 150), np.uint8), np.full((8, 4, 3), 250, np.uint8)
    assert stain.stain_balance(np.concatenate([purple, white], axis=1))[1] == 0.5
    at_level = np.full((2, 2, 3), stain.WHITE, np.uint8)
    assert stain.stain_balance(at_level)[1] == 0.0 and stain.stain_balance(at_level + 1)[1] == 1.0


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 4), (2, 8, 8)])
def test_an_image_that_is_not_rgb_is_refused_in_one_line(shape):
    with pytest.raises(stain.InputError, match="expected an RGB image"):
        stain.grey(np.zeros(shape, np.uint8))


def test_score_restained_prints_each_tile_and_the_mean_it_writes(tmp_path, capsys):
    content, style = png(TILES[0]), png(TILES[5])
    items = [("a", content, content, style), ("b", style, content, style)]
    mean = stain.score_restained(items, 0.5, tmp_path / "r.json")
    out = capsys.readouterr().out.splitlines()
    a, b = (stain.restain_scores(r, c, s) for _, r, c, s in items)
    assert out[0].startswith(f"a: content kept {a['content_kept']:+.3f}") and out[1].startswith("b: content kept")
    assert out[2] == (f"mean of 2 tiles: content kept {mean['content_kept']:+.3f}, stain moved "
                      f"{mean['stain_moved']:+.3f} (strength 0.5; {tmp_path / 'r.json'})")
    assert mean["content_kept"] == pytest.approx((a["content_kept"] + b["content_kept"]) / 2)
    assert json.loads((tmp_path / "r.json").read_text())["mean"] == pytest.approx(mean)
