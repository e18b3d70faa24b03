"""sample.py end to end on the CPU, with a tiny random checkpoint (conftest.py: SiT-T/2, VAE "tiny", encoder "tiny").

What must hold: PNGs of the tile size and a grid appear; a seed fixes the files; an interrupted run resumes
without regenerating finished images; the output equals the pipeline written out by hand with the EMA
weights (EMA SiT, its BatchNorm statistics for decoding, EMA VAE); a REPA-E-layout checkpoint gives the same
images; user errors end in one line on stderr, never a traceback.
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sampler
from features import encoder_features, load_encoder
from sit import build_sit
from support import weights
from vae import build_vae

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE_DIR = os.path.join(REPO, "tests", "data", "tiles")  # real H&E tiles, 224 px at 0.5 µm/px
TILES = sorted(os.path.join(TILE_DIR, f) for f in os.listdir(TILE_DIR) if f.endswith(".png"))
FAST = ["--num-sampling-steps", "4", "--batch-size", "2"]


def run(*argv):
    sample.main([str(a) for a in argv] + ["--device", "cpu"])  # CPU even where a GPU is


def png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def grid_of(out):
    return Path(str(out) + "_grid.png")  # sample.py writes the grid next to its output folder


def test_conditional_run_writes_tiles_and_grid(ckpt, tmp_path):
    run("--ckpt", ckpt, "--cond", TILES[0], TILES[1], "--n", 2, "--out", tmp_path, *FAST)
    stems = [os.path.splitext(os.path.basename(t))[0] for t in TILES[:2]]
    assert pngs(tmp_path) == [f"{s}_{k:02d}.png" for s in stems for k in range(2)]
    assert all(png(tmp_path / f).shape == (224, 224, 3) for f in pngs(tmp_path))
    grid = png(grid_of(tmp_path))
    assert grid.shape == (2 * 224, 3 * 224, 3)  # Figure 2: the reference tile, then its samples
    assert np.array_equal(grid[:224, :224], png(TILES[0]))  # tiles of 224 px are used as they are
    assert np.array_equal(grid[224:, 448:], png(tmp_path / f"{stems[1]}_01.png"))


def test_same_seed_same_files_other_seed_other_files(ckpt, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run("--ckpt", ckpt, "--cond", TILES[0], "--n", 2, "--seed", seed, "--out", tmp_path / name, *FAST)
    for f in pngs(tmp_path / "a"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert not np.array_equal(png(tmp_path / "a" / f), png(tmp_path / "c" / f))
    a0, a1 = (png(tmp_path / "a" / f) for f in pngs(tmp_path / "a"))
    assert not np.array_equal(a0, a1)  # two samples of one tile differ


def test_images_do_not_depend_on_batch_size(ckpt, tmp_path):
    run("--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path / "b1", "--num-sampling-steps", 4, "--batch-size", 1)
    run("--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path / "b3", "--num-sampling-steps", 4, "--batch-size", 3)
    for f in pngs(tmp_path / "b1"):
        diff = np.abs(png(tmp_path / "b1" / f).astype(int) - png(tmp_path / "b3" / f).astype(int))
        assert diff.max() <= 1  # per-image seeds; at most a rounding flip from batched kernels


def test_interrupted_run_resumes_without_redoing_finished_images(ckpt, tmp_path, monkeypatch):
    args = ("--ckpt", ckpt, "--num-samples", 5, *FAST)
    run(*args, "--out", tmp_path / "ref")
    real_generate, calls = sample.Pipeline.generate, []

    def generate_then_die(pipe, cond, noise_ids, settings, *restain):
        if calls:
            raise KeyboardInterrupt  # killed during the second batch
        calls.append(len(noise_ids))
        return real_generate(pipe, cond, noise_ids, settings, *restain)
    monkeypatch.setattr(sample.Pipeline, "generate", generate_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--out", tmp_path / "run")
    assert pngs(tmp_path / "run") == ["000000.png", "000001.png"]
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    mtimes = {f: os.stat(tmp_path / "run" / f).st_mtime_ns for f in pngs(tmp_path / "run")}

    generated = []

    def counting_generate(pipe, cond, noise_ids, settings, *restain):
        generated.extend(noise_ids)
        return real_generate(pipe, cond, noise_ids, settings, *restain)
    monkeypatch.setattr(sample.Pipeline, "generate", counting_generate)
    run(*args, "--out", tmp_path / "run")
    assert generated == [2, 3, 4]  # the images of 000002.png ... 000004.png
    assert all(os.stat(tmp_path / "run" / f).st_mtime_ns == t for f, t in mtimes.items())
    for f in pngs(tmp_path / "ref"):
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "run" / f).read_bytes()


def by_hand(ckpt_path, tile, noise_id, seed=0, steps=4):
    """The sampling pipeline written out from the contract, with the EMA weights, for one tile."""
    ck = torch.load(ckpt_path, weights_only=True)
    cfg = ck["config"]
    torch.manual_seed(cfg["seed"])
    encoder = load_encoder("tiny", pretrained=False)
    sit = build_sit("SiT-T/2", input_size=28, cond_dim=cfg["cond_dim"], z_dim=cfg["z_dim"]).eval()
    sit.load_state_dict(ck["sit_ema"])
    vae = build_vae("tiny").eval()
    vae.load_state_dict(ck["vae_ema"])
    cls = encoder_features(encoder, torch.from_numpy(png(tile).copy()).permute(2, 0, 1)[None])[0]
    g = torch.Generator().manual_seed(sample.noise_seed(seed, noise_id))
    noise = torch.randn(1, 4, 28, 28, generator=g, dtype=torch.float64)
    with torch.no_grad():
        x = sampler.euler_maruyama_sampler(lambda x, t, c, drop=None: sit(x, t, c, drop)[0], noise, cls, steps,
                                           2.5, 0.0, 0.75, generator=g)
        z = x.float() * sit.bn.running_var.sqrt().view(1, -1, 1, 1) + sit.bn.running_mean.view(1, -1, 1, 1)
        image = vae.decode(z)[0]
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_output_is_the_ema_pipeline(ckpt, tmp_path):
    run("--ckpt", ckpt, "--cond", TILES[2], "--n", 2, "--out", tmp_path / "ema", *FAST)
    run("--ckpt", ckpt, "--cond", TILES[2], "--n", 2, "--out", tmp_path / "raw", "--sit-weights", "raw",
        "--vae-weights", "raw", *FAST)
    stem = os.path.splitext(os.path.basename(TILES[2]))[0]
    ours = png(tmp_path / "ema" / f"{stem}_01.png").astype(int)
    assert np.abs(ours - by_hand(ckpt, TILES[2], noise_id=1).astype(int)).max() <= 1
    assert np.abs(ours - png(tmp_path / "raw" / f"{stem}_01.png").astype(int)).mean() > 5


def test_repae_layout_gives_the_same_images(ckpt, tmp_path, one_line_error):
    """REPA-E pickles its argparse.Namespace: refused as it is, it samples the same images once converted."""
    ck = torch.load(ckpt, weights_only=True)
    repae = {"model": ck["sit"], "ema": ck["sit_ema"], "vae": ck["vae_ema"], "opt": {},
             "args": argparse.Namespace(model="SiT-T/2", encoder_depth=2, seed=0)}
    torch.save(repae, tmp_path / "repae_pickle.pt")
    line = one_line_error(sample.main, ["--ckpt", str(tmp_path / "repae_pickle.pt"), "--num-samples", "1", "--out",
                                        str(tmp_path / "refused"), *FAST])
    assert re.search(r"could run code.*support.weights convert", line)
    weights.convert(str(tmp_path / "repae_pickle.pt"), str(tmp_path / "repae.pt"))
    (tmp_path / "in").mkdir()
    features = tmp_path / "in" / "f.npy"
    np.save(features, np.random.default_rng(0).normal(size=(2, ck["config"]["cond_dim"])).astype(np.float32))
    run("--ckpt", ckpt, "--features", features, "--n", 1, "--out", tmp_path / "ours", *FAST)
    run("--ckpt", tmp_path / "repae.pt", "--features", features, "--n", 1, "--out", tmp_path / "repae", *FAST)
    assert pngs(tmp_path / "ours") == ["000000_00.png", "000001_00.png"]
    for f in pngs(tmp_path / "ours"):
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "repae" / f).read_bytes()


def test_larger_tile_is_centre_cropped_and_resize_rescales(ckpt, tmp_path):
    """A 256 px tile around a 224 px one conditions exactly like it (the paper's ±16 px); with --cond-mpp
    0.25 a tile of twice the pixels is first brought back to 0.5 µm/px."""
    tile = png(TILES[0])
    big = np.zeros((256, 256, 3), np.uint8)
    big[16:240, 16:240] = tile  # a black border that a wrong crop would show
    (tmp_path / "big").mkdir()
    Image.fromarray(big).save(tmp_path / "big" / "t.png")
    Image.fromarray(tile).resize((448, 448), Image.BICUBIC).save(tmp_path / "big" / "x2.png")
    (tmp_path / "ref").mkdir()
    Image.fromarray(tile).save(tmp_path / "ref" / "t.png")
    run("--ckpt", ckpt, "--cond", tmp_path / "big" / "t.png", "--n", 1, "--out", tmp_path / "a", *FAST)
    run("--ckpt", ckpt, "--cond", tmp_path / "ref" / "t.png", "--n", 1, "--out", tmp_path / "b", *FAST)
    assert np.array_equal(png(grid_of(tmp_path / "a")), png(grid_of(tmp_path / "b")))
    run("--ckpt", ckpt, "--cond", tmp_path / "big" / "x2.png", "--cond-mpp", 0.25, "--n", 1, "--out", tmp_path / "c",
        *FAST)
    reference = png(grid_of(tmp_path / "c"))[:, :224].astype(int)
    assert reference.shape == (224, 224, 3) and np.abs(reference - tile).mean() < 4


def test_interpolation_row(ckpt, tmp_path):
    run("--ckpt", ckpt, "--interpolate", TILES[0], TILES[1], "--n", 1, "--out", tmp_path, *FAST)
    files = pngs(tmp_path)
    assert len(files) == 4 and [f[-8:-4] for f in files] == ["a0.2", "a0.4", "a0.6", "a0.8"]
    grid = png(grid_of(tmp_path))
    assert grid.shape == (224, 6 * 224, 3)  # Figure 3: tile A, four factors, tile B
    assert np.array_equal(grid[:, -224:], png(TILES[1]))



def test_interpolation_conditions_on_the_mixed_features(ckpt, tmp_path, monkeypatch):
    """Each factor a is the sample of (1 - a) f_A + a f_B with the row's noise (id 0). The tiles' features
    are replaced by two far-apart vectors (those of a random tiny encoder hardly differ between tiles)."""
    f = np.random.default_rng(0).standard_normal((2, 48)).astype(np.float32) * 3
    monkeypatch.setattr(sample.TileSource, "features", lambda self, idx, pipe: torch.from_numpy(f[idx]))
    run("--ckpt", ckpt, "--interpolate", TILES[0], TILES[1], "--n", 1, "--out", tmp_path / "i", *FAST)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "mix.npy", 0.8 * f[0] + 0.2 * f[1])
    run("--ckpt", ckpt, "--features", tmp_path / "in" / "mix.npy", "--n", 1, "--out", tmp_path / "mix", *FAST)
    mixed = png(tmp_path / "mix" / "000000_00.png").astype(int)
    files = pngs(tmp_path / "i")
    assert np.abs(mixed - png(tmp_path / "i" / files[0])).max() <= 1  # a = 0.2
    assert np.abs(mixed - png(tmp_path / "i" / files[3])).mean() > 2  # a = 0.8: another image


def test_unconditional_grid(ckpt, tmp_path):
    run("--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path, *FAST)
    assert pngs(tmp_path) == ["000000.png", "000001.png", "000002.png"]
    assert png(grid_of(tmp_path)).shape == (224, 3 * 224, 3)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, ckpt):
    d = tmp_path_factory.mktemp("bad")
    with Image.open(TILES[0]) as im:
        im.convert("L").save(d / "grey.png")
        rgba = im.convert("RGBA")
        rgba.putpixel((0, 0), (0, 0, 0, 0))  # one transparent pixel: its colour is undefined
        rgba.save(d / "rgba.png")
        im.crop((0, 0, 200, 224)).save(d / "small.png")
    (d / "notes.png").write_text("not an image")
    other = build_sit("SiT-T/2", input_size=28, cond_dim=48, z_dim=48, hidden_size=96)  # another width
    ck = torch.load(ckpt, weights_only=True)
    ck["sit_ema"] = other.state_dict()
    torch.save(ck, d / "other.pt")
    classes = dict(ck["sit"])
    del classes["y_embedder.mlp.0.weight"]
    classes["y_embedder.embedding_table.weight"] = torch.zeros(1001, 64)
    torch.save({"model": classes, "ema": classes, "vae": ck["vae"], "args": {}}, d / "imagenet.pt")
    np.save(d / "wrong.npy", np.zeros((3, 7), np.float32))
    np.save(d / "empty.npy", np.zeros((0, 48), np.float32))
    return d


BAD = {  # argv -> words the one-line message must contain
    "missing checkpoint": (["--ckpt", "{d}/nope.pt"], "not found"),
    "checkpoint of another size": (["--ckpt", "{d}/other.pt"], "pos_embed: expected (1, 196, 64), got (1, 196, 96)"),
    "class-conditional checkpoint": (["--ckpt", "{d}/imagenet.pt"], "class-conditional"),
    "not a checkpoint": (["--ckpt", "{d}/notes.png"], "not a readable PyTorch checkpoint"),
    "grey-scale tile": (["--ckpt", "{ckpt}", "--cond", "{d}/grey.png"], "grey-scale"),
    "RGBA tile": (["--ckpt", "{ckpt}", "--cond", "{d}/rgba.png"], "RGBA"),
    "small tile": (["--ckpt", "{ckpt}", "--cond", "{d}/small.png"], "200x224"),
    "not an image": (["--ckpt", "{ckpt}", "--cond", "{d}/notes.png"], "not an image"),
    "features of another size": (["--ckpt", "{ckpt}", "--features", "{d}/wrong.npy"], "(3, 7)"),
    "no features": (["--ckpt", "{ckpt}", "--features", "{d}/empty.npy"], "(0, 48)"),
}


def test_argument_errors(ckpt, tmp_path, capsys, one_line_error):
    assert "--seed: -1 is outside the allowed range [0, 2147483647]" in one_line_error(
        sample.main, ["--ckpt", ckpt, "--seed", "-1"])
    assert "two tile files (not folders" in one_line_error(sample.main, ["--ckpt", ckpt, "--interpolate", TILE_DIR,
                                                                          TILES[0]])
    (tmp_path / "file").write_text("")
    assert re.search("cannot create the output folder --out .*file", one_line_error(
        sample.main, ["--ckpt", ckpt, "--num-samples", "1", "--out", str(tmp_path / "file"), *FAST]))


def test_rerun_with_other_settings_is_refused_not_mixed_in(ckpt, tmp_path):
    run("--ckpt", ckpt, "--num-samples", 2, "--out", tmp_path / "o", *FAST)
    before = {f: png(tmp_path / "o" / f) for f in pngs(tmp_path / "o")}
    assert (tmp_path / "o" / "settings.json").exists()
    for argv, words in [(["--num-sampling-steps", "3", "--batch-size", "2"], "num_sampling_steps: 4 -> 3"),
                        (FAST + ["--seed", "1"], "seed: 0 -> 1"),
                        (FAST + ["--vae-weights", "raw"], "vae_weights: ema -> raw"),
                        (FAST + ["--sampler", "ode"], "sampler: sde -> ode")]:
        with pytest.raises(ValueError, match=words):
            run("--ckpt", ckpt, "--num-samples", 2, "--out", tmp_path / "o", *argv)
    run("--ckpt", ckpt, "--num-samples", 2, "--out", tmp_path / "o", "--num-sampling-steps", "4", "--batch-size", "1")
    assert {f: png(tmp_path / "o" / f) for f in pngs(tmp_path / "o")}.keys() == before.keys()


@pytest.mark.parametrize("case", list(BAD))
def test_user_errors_exit_with_one_line(case, bad_files, ckpt, tmp_path, one_line_error):
    argv, words = BAD[case]
    argv = [a.format(d=bad_files, ckpt=ckpt) for a in argv] + ["--out", str(tmp_path / "o"), "--device", "cpu"]
    assert words in one_line_error(sample.main, argv)
    assert not (tmp_path / "o").exists() or pngs(tmp_path / "o") == []  # no image written


@pytest.mark.parametrize("case", ["missing checkpoint", "grey-scale tile"])
def test_user_errors_show_no_traceback(case, bad_files, ckpt, tmp_path):
    argv, words = BAD[case]
    argv = [a.format(d=bad_files, ckpt=ckpt) for a in argv] + ["--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_torchrun_splits_the_work_and_writes_the_same_files(ckpt, tmp_path):
    """Two processes (gloo) write exactly the images of one process (within the +-1 of batched kernels,
    as for batch sizes): the work is split by image index and every image has its own seed."""
    run("--ckpt", ckpt, "--num-samples", 4, "--out", tmp_path / "one", *FAST)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "sample.py", "--ckpt",
                          ckpt, "--num-samples", "4", "--out", str(tmp_path / "two"), "--device", "cpu", *FAST],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one") == [f"{i:06d}.png" for i in range(4)]
    for f in pngs(tmp_path / "one"):
        assert np.abs(png(tmp_path / "one" / f).astype(int) - png(tmp_path / "two" / f)).max() <= 1


# -- nothing silently wrong: refused before anything is written ------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--cfg-scale", "nan"], "--cfg-scale: nan is outside the allowed range [0.0, 100.0]"),
    (["--cfg-scale", "-1"], "--cfg-scale: -1 is outside the allowed range [0.0, 100.0]"),
    (["--cfg-scale", "inf"], "--cfg-scale: inf is outside the allowed range [0.0, 100.0]"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps: 0 is outside the allowed range [1, 10000]"),
    (["--guidance-high", "1.5"], "--guidance-high: 1.5 is outside the allowed range [0.0, 1.0]"),
    (["--batch-size", "2.5"], "--batch-size: '2.5' is not an integer"),
    (["--cond-mpp", "0"], "--cond-mpp: 0 is outside the allowed range (0, 100]"),
    (["--sampler", "dpm"], "--sampler: invalid choice: 'dpm'")])
def test_numeric_settings_are_range_checked(argv, words, ckpt, one_line_error):
    assert words in one_line_error(sample.main, ["--ckpt", ckpt] + argv)


def test_an_empty_guidance_window_is_refused(ckpt, one_line_error):
    line = one_line_error(sample.main, ["--ckpt", ckpt, "--guidance-low", "0.8"])
    assert "--guidance-low 0.8 is above --guidance-high 0.75" in line


def test_output_inside_an_input_folder_is_refused_before_anything_is_written(ckpt, tmp_path):
    (tmp_path / "real").mkdir()
    Image.open(TILES[0]).save(tmp_path / "real" / "a.png")
    np.save(tmp_path / "real" / "f.npy", np.zeros((1, 48), np.float32))
    refused = [(["--cond", tmp_path / "real"], tmp_path / "real", "is inside the input folder .*real"),
               (["--cond", tmp_path / "real"], tmp_path / "real" / "fake", "is inside the input folder .*real"),
               (["--cond", tmp_path / "real" / "a.png"], tmp_path / "real", "holds the input file .*a.png"),
               (["--features", tmp_path / "real" / "f.npy"], tmp_path / "real", "holds the input file .*f.npy")]
    for argv, out, words in refused:
        with pytest.raises(ValueError, match=words):
            run("--ckpt", ckpt, *argv, "--n", 1, "--out", out, *FAST)
    assert sorted(os.listdir(tmp_path / "real")) == ["a.png", "f.npy"]


def test_the_cards_command_beside_its_tile_is_accepted(ckpt, tmp_path, monkeypatch):
    """`python sample.py --ckpt CKPT --cond tile.png --out samples/tile`, run where tile.png sits: one input
    file does not make its whole folder an input."""
    Image.open(TILES[0]).save(tmp_path / "tile.png")
    monkeypatch.chdir(tmp_path)
    run("--ckpt", ckpt, "--cond", "tile.png", "--n", 1, "--out", "samples/tile", *FAST)
    assert pngs(tmp_path / "samples" / "tile") == ["tile_00.png"]


def test_a_whole_slide_as_conditioning_points_to_tiling(ckpt, tmp_path, one_line_error):
    line = one_line_error(sample.main, ["--ckpt", ckpt, "--cond", os.path.join(REPO, "tests", "data",
                                        "cmu_small_region.svs"), "--out", str(tmp_path / "o"), *FAST])
    assert "whole-slide file" in line and "tiling.py" in line and not (tmp_path / "o").exists()


def test_no_non_finite_image_is_written(ckpt, tmp_path, one_line_error):
    """Image 000000 is finite and written; 000001's conditioning is finite but so large that the network overflows:
    sampling stops before writing it."""
    (tmp_path / "in").mkdir()
    feats = np.random.default_rng(0).normal(size=(2, 48)).astype(np.float32)
    feats[1] = 3e38
    np.save(tmp_path / "in" / "f.npy", feats)
    message = one_line_error(sample.main, ["--ckpt", ckpt, "--features", str(tmp_path / "in" / "f.npy"), "--n", "1",
                                           "--out", str(tmp_path / "o"), "--num-sampling-steps", "2", "--batch-size",
                                           "1", "--device", "cpu"])
    assert "non-finite" in message and "000001_00" in message and "guidance scale" in message
    assert pngs(tmp_path / "o") == ["000000_00.png"]
