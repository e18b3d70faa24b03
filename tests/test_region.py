"""sample.py --region: a synthetic twin of a slide region, on the CPU with tiny random checkpoints.

What must hold: a region one window large is sample.py's first image, pixel for pixel; the MultiDiffusion
velocity is, at every latent position, the mean over exactly the windows that cover it (edges, corners, the
guided pass); a large latent decodes in blended tiles that agree with a whole decode where the decoder is
local; the TIFF opens in OpenSlide at 0.5 µm/px with the twin's pixels; the seam numbers are the FD and cosines
of the tiles they name; a bad --at / --size / --cond-grid is one line before anything is sampled or written.
"""
import json
import os
import re

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

import sample
import sampler
from conftest import perturbed
from features import encoder_features, load_encoder
from sit import build_sit
from support import region
from support.slides import open_slide, read_tile_at, resolve_mpp, slide_geometry
from support.tiles import RESIZE_KERNELS
from vae import build_vae

torch.set_num_threads(1)
SLIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cmu_small_region.svs")  # 2220 x 2967
FAST = ["--num-sampling-steps", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt64(tmp_path_factory):
    """64 px tiles (an 8 x 8 latent window): a twin of a few hundred pixels has many windows."""
    torch.manual_seed(0)
    encoder = load_encoder("tiny", pretrained=False)
    sit = perturbed(build_sit("SiT-T/2", input_size=8, cond_dim=encoder.embed_dim, z_dim=encoder.embed_dim), 1)
    sit.y_embedder = perturbed(sit.y_embedder, 5, std=0.5)
    vae = perturbed(build_vae("tiny"), 2)
    config = {"model": "SiT-T/2", "vae": "tiny", "encoder": "tiny", "image_size": 64, "seed": 0, **sit.config}
    path = str(tmp_path_factory.mktemp("ckpt64") / "0000100.pt")
    torch.save({"config": config, "step": 100, "sit": sit.state_dict(), "sit_ema": sit.state_dict(),
                "vae": vae.state_dict(), "vae_ema": vae.state_dict()}, path)
    return path


def png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# -------- A one-window region is plain sampling --------------------------------------------------------------------
def test_a_one_window_region_is_sample_pys_image(ckpt, tmp_path):
    """The tile tiling.py reads at (1120, 1568), given to sample.py --cond, and the 224 px region there: the same
    pixels (same CLS, same noise stream, guided SDE)."""
    slide = open_slide(SLIDE)
    geo = slide_geometry(slide, resolve_mpp(slide)[0], 0.5, 224)
    (tmp_path / "in").mkdir()
    Image.fromarray(read_tile_at(slide, geo, 1120, 1568, 0, RESIZE_KERNELS["lanczos"])).save(tmp_path / "in" / "t.png")
    sample.main(["--ckpt", ckpt, "--cond", str(tmp_path / "in" / "t.png"), "--n", "1", "--seed", "7",
                 "--out", str(tmp_path / "tile"), *FAST])
    sample.main(["--ckpt", ckpt, "--region", SLIDE, "--at", "1120,1568", "--size", "224", "--seed", "7",
                 "--out", str(tmp_path / "twin"), *FAST])
    twin = png(tmp_path / "twin.png")
    assert np.array_equal(twin, png(tmp_path / "tile" / "t_00.png"))
    assert np.array_equal(png(tmp_path / "twin_side_by_side.png")[:, :224], png(tmp_path / "in" / "t.png"))
    assert np.array_equal(png(tmp_path / "twin_side_by_side.png")[:, -224:], twin)


# -------- The MultiDiffusion average ------------------------------------------------------------------------------
# A 12 x 16 latent, windows of 8 every 4: rows start at 0, 4; columns at 0, 4, 8. Which windows cover a cell,
# written out by hand per axis: rows [0, 4) -> {0}, [4, 8) -> {0, 1}, [8, 12) -> {1}; columns [0, 4) -> {0},
# [4, 8) -> {0, 1}, [8, 12) -> {1, 2}, [12, 16) -> {2}.
ROWS = {range(0, 4): (0,), range(4, 8): (0, 1), range(8, 12): (1,)}
COLS = {range(0, 4): (0,), range(4, 8): (0, 1), range(8, 12): (1, 2), range(12, 16): (2,)}
VALUES = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])  # window (r, c) -> 2 ** (3 r + c): each mean is unique


def expected_mean():
    out = torch.zeros(12, 16)
    for rows, rs in ROWS.items():
        for cols, cs in COLS.items():
            covering = [VALUES[3 * r + c] for r in rs for c in cs]
            out[rows.start:rows.stop, cols.start:cols.stop] = sum(covering) / len(covering)
    return out


def stub(x, t, cond, drop=None):
    """The window's own input plus its conditioning value (0 where dropped: the unconditional pass)."""
    c = cond[:, 0].clone()
    if drop is not None:
        c[drop] = 0
    return x + c[:, None, None, None]


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_the_velocity_is_the_mean_over_the_windows_that_cover_each_cell(batch_size):
    starts_y, starts_x = region.window_starts(12, 8, 4), region.window_starts(16, 8, 4)
    assert (starts_y, starts_x) == ([0, 4], [0, 4, 8])
    v = sampler.multidiffusion_velocity(stub, starts_y, starts_x, 8, batch_size)
    x = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    out = v(x, torch.zeros(1), VALUES.view(1, 6, 1))
    np.testing.assert_allclose(out - x, expected_mean().expand(1, 4, 12, 16), rtol=1e-6)
    assert out[0, 0, 0, 0] - x[0, 0, 0, 0] == 1.0  # the corner: window (0, 0) alone
    assert torch.isclose(out[0, 0, 11, 15] - x[0, 0, 11, 15], torch.tensor(32.0))  # the far corner: (1, 2)
    assert torch.isclose(out[0, 0, 0, 9] - x[0, 0, 0, 9], torch.tensor(3.0))  # top edge: (0, 1), (0, 2)
    assert torch.isclose(out[0, 0, 5, 9] - x[0, 0, 5, 9], torch.tensor((2 + 4 + 16 + 32) / 4))  # four windows


def test_guidance_is_per_window_with_the_guidance_interval():
    """Through cfg_velocity: inside [low, high] each cell gets x + s * mean(c) (the unconditional pass drops c);
    outside, x + mean(c)."""
    v = sampler.multidiffusion_velocity(stub, [0, 4], [0, 4, 8], 8, batch_size=5)
    x = torch.randn(1, 4, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cond = VALUES.view(1, 6, 1)
    guided = sampler.cfg_velocity(v, x, 0.5, cond, 2.5, 0.0, 0.75, torch.float32)
    np.testing.assert_allclose(guided - x, 2.5 * expected_mean().expand(1, 4, 12, 16), rtol=1e-5, atol=1e-5)
    outside = sampler.cfg_velocity(v, x, 0.9, cond, 2.5, 0.0, 0.75, torch.float32)
    np.testing.assert_allclose(outside - x, expected_mean().expand(1, 4, 12, 16), rtol=1e-5, atol=1e-5)


def test_windows_cover_the_latent_and_end_flush():
    assert region.window_starts(28, 28, 14) == [0]
    assert region.window_starts(30, 28, 14) == [0, 2]  # the last window moves back to end at the edge
    assert region.window_starts(128, 8, 4) == list(range(0, 121, 4))


# -------- Decoding in tiles ---------------------------------------------------------------------------------------
def local_decode(z):
    """A decoder whose every pixel depends on its own latent cell only: tiled and whole decoding must agree."""
    pixels = (z[:, :3] * 40 + 128).clamp(0, 255).round().to(torch.uint8)  # (1, 3, h, w)
    return pixels.repeat_interleave(8, 2).repeat_interleave(8, 3).permute(0, 2, 3, 1).numpy()


def test_tiled_decoding_of_a_local_decoder_is_the_whole_decoding():
    z = torch.randn(1, 4, 150, 90, generator=torch.Generator().manual_seed(0))
    tiled = region.decode_tiled(local_decode, z, 8, tile=64, overlap=16)
    assert tiled.shape == (1200, 720, 3) and np.array_equal(tiled, local_decode(z)[0])


def test_tiles_blend_with_linear_ramps_over_their_overlap():
    """Two tiles along x (latent 64 + 48 cells, overlap 16 = 128 px): tile 0 decodes to 0, tile 1 to 200. In the
    overlap, pixels [384, 512), pixel p is (w1 * 200) / (w0 + w1) with w0 = (512 - p - 0.5) / 128 and
    w1 = (p - 384 + 0.5) / 128; outside it, each tile's own value."""
    calls = []

    def decode(z):
        calls.append(z.shape[-1])
        return np.full((1, z.shape[-2] * 8, z.shape[-1] * 8, 3), 0 if len(calls) == 1 else 200, np.uint8)
    out = region.decode_tiled(decode, torch.zeros(1, 4, 8, 112), 8, tile=64, overlap=16)
    assert calls == [64, 64]  # starts 0 and 48: the second tile flush with the end
    p = np.arange(384, 512)
    w0, w1 = (512 - p - 0.5) / 128, (p - 384 + 0.5) / 128
    np.testing.assert_array_equal(out[0, 384:512, 0], np.round(200 * w1 / (w0 + w1)))
    assert (out[:, :384] == 0).all() and (out[:, 512:] == 200).all()


# -------- What a twin writes --------------------------------------------------------------------------------------
def test_the_tiff_opens_in_openslide_at_half_a_micron_with_the_twins_pixels(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    region.write_pyramid_tiff(image, tmp_path / "t.tiff", 0.5)
    with openslide.OpenSlide(str(tmp_path / "t.tiff")) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5, rel=1e-6)
        assert slide.dimensions == (1000, 700)
        assert slide.level_dimensions == ((1000, 700), (500, 350), (250, 175))  # down to one 256 px tile
        level0 = np.asarray(slide.read_region((0, 0), 0, (1000, 700)).convert("RGB"))
        level1 = np.asarray(slide.read_region((0, 0), 1, (500, 350)).convert("RGB"))
    assert np.array_equal(level0, image)  # lossless
    assert np.array_equal(level1, np.asarray(Image.fromarray(image).reduce(2)))


def reference_fd(x, y):
    """Independent of metrics.py: np.cov and the eigenvalues of the product S1 S2."""
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()


def cosines(a, b):
    return [float(np.dot(u, v) / np.sqrt(np.dot(u, u) * np.dot(v, v))) for u, v in zip(a, b)]


@pytest.mark.filterwarnings("ignore:FD from")
def test_a_twin_run_writes_its_files_and_the_seams_of_the_tiles_it_names(ckpt64, tmp_path):
    """A 160 x 96 px twin of 64 px windows (latent 20 x 12; windows every 4 cells: columns at 0, 4, 8, 12, rows at
    0, 4): the TIFF holds OUT.png's pixels at 0.5 µm/px, and seams.json's numbers are those of the tiles at the
    windows' corners (0 or 32 down, 0, 32, 64, 96 across) and half-way between neighbours (16 down, 16, 48, 80
    across), recomputed here with the tiny encoder."""
    out = tmp_path / "twin"
    sample.main(["--ckpt", ckpt64, "--region", SLIDE, "--at", "1000,1500", "--size", "160,96", "--out", str(out),
                 *FAST])
    twin, both = png(f"{out}.png"), png(f"{out}_side_by_side.png")
    real = both[:, :160]
    assert twin.shape == (96, 160, 3) and np.array_equal(both[:, -160:], twin)
    with openslide.OpenSlide(str(out / "twin.tiff")) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")), twin)
    torch.manual_seed(0)
    encoder = load_encoder("tiny", pretrained=False)  # seed 0: the checkpoint's encoder

    def feats(image, corners):
        tiles = np.stack([image[y:y + 64, x:x + 64] for y, x in corners]).transpose(0, 3, 1, 2)
        return encoder_features(encoder, torch.from_numpy(tiles.copy()))[0].double().numpy()
    centres = [(y, x) for y in (0, 32) for x in (0, 32, 64, 96)]
    boundaries = ([(16, x) for x in (0, 32, 64, 96)] + [(y, x) for y in (0, 32) for x in (16, 48, 80)]
                  + [(16, x) for x in (16, 48, 80)])
    seams = json.loads((out / "seams.json").read_text())
    assert (seams["n_centre"], seams["n_boundary"], seams["tile"], seams["window_stride"]) == (8, 13, 64, 32)
    assert seams["fd_synthetic"] == pytest.approx(reference_fd(feats(twin, boundaries), feats(twin, centres)),
                                                  rel=1e-4, abs=1e-8)
    assert seams["fd_real"] == pytest.approx(reference_fd(feats(real, boundaries), feats(real, centres)),
                                             rel=1e-4, abs=1e-8)
    assert seams["cosine_centre"] == pytest.approx(np.mean(cosines(feats(twin, centres), feats(real, centres))),
                                                   rel=1e-5)
    assert seams["cosine_boundary"] == pytest.approx(np.mean(cosines(feats(twin, boundaries),
                                                                     feats(real, boundaries))), rel=1e-5)


@pytest.mark.filterwarnings("ignore:FD from")
def test_a_cond_grid_conditions_each_window_on_its_row(ckpt64, tmp_path):
    """--cond-grid with the CLS of the region's own windows gives the --region twin, without a real picture."""
    torch.manual_seed(0)
    encoder = load_encoder("tiny", pretrained=False)
    slide = open_slide(SLIDE)
    geo = slide_geometry(slide, resolve_mpp(slide)[0], 0.5, 64)
    tiles = [read_tile_at(slide, geo, 1000 + x, 1500 + y, 0, RESIZE_KERNELS["lanczos"])
             for y in (0, 32) for x in (0, 32)]  # the 2 x 2 windows of a 96 px region (the slide is at 0.499)
    grid = encoder_features(encoder, torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2))[0].reshape(2, 2, -1)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "grid.npy", grid.numpy())
    sample.main(["--ckpt", ckpt64, "--region", SLIDE, "--at", "1000,1500", "--size", "96", "--out",
                 str(tmp_path / "a"), *FAST])
    sample.main(["--ckpt", ckpt64, "--cond-grid", str(tmp_path / "in" / "grid.npy"), "--size", "96", "--out",
                 str(tmp_path / "b"), *FAST])
    assert np.abs(png(tmp_path / "a.png").astype(int) - png(tmp_path / "b.png")).max() <= 1
    assert not (tmp_path / "b_side_by_side.png").exists()
    np.save(tmp_path / "in" / "grid.npy", grid.numpy()[:, ::-1].copy())  # the columns swapped: another twin
    sample.main(["--ckpt", ckpt64, "--cond-grid", str(tmp_path / "in" / "grid.npy"), "--size", "96", "--out",
                 str(tmp_path / "c"), *FAST])
    assert np.abs(png(tmp_path / "c.png").astype(int) - png(tmp_path / "a.png")).mean() > 1


# -------- Bad input: one line, before anything is sampled or written ----------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--region", SLIDE, "--at", "2100,100", "--size", "256"], r"outside the slide \(2220 x 2967"),
    (["--region", SLIDE, "--at=-8,100", "--size", "128"], "outside the slide"),
    (["--region", SLIDE, "--at", "0,0", "--size", "100,128"], "width 100 is not a multiple of the VAE's factor 8"),
    (["--region", SLIDE, "--at", "0,0", "--size", "128,56"], "height 56 is smaller than one window"),
    (["--region", SLIDE, "--at", "0,0", "--size", "2048"], r"needs about 0.3 GiB of memory and 0.2 GiB is av"),
    (["--region", SLIDE, "--size", "128"], "--region SLIDE goes with --at X,Y"),
    (["--region", SLIDE, "--at", "10", "--size", "128"], "--at '10': give X,Y"),
    (["--at", "0,0", "--size", "128"], "needs --size W"),
    (["--region", SLIDE, "--at", "0,0", "--size", "128", "--n", "2"], "--n does not go with --region"),
    (["--cond-grid", "GRID", "--size", "128"], r"--cond-grid has 2 x 3 windows but a 128 x 128 px region has 3 x 3"),
])
def test_bad_regions_are_one_line_before_any_sampling(ckpt64, tmp_path, monkeypatch, one_line_error, flags, message):
    np.save(tmp_path / "grid.npy", np.zeros((2, 3, 48), np.float32))
    monkeypatch.setattr(region, "available_bytes", lambda: 200 * 2 ** 20)  # 200 MiB free: 2048 px cannot fit
    monkeypatch.setattr(sample, "generate_region", lambda *a: pytest.fail("sampled despite a bad region"))
    flags = [str(tmp_path / "grid.npy") if f == "GRID" else f for f in flags]
    line = one_line_error(sample.main, ["--ckpt", ckpt64, "--out", str(tmp_path / "out"), *flags, *FAST])
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()
