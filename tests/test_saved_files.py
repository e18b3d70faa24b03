"""Every saved file holds what its keys say, and an interrupted run resumes to the same weights, so that a
file can be checked against what it claims to hold.

One short run with the demo's training settings (demo.TRAIN: SiT-T/2, the tiny VAE and encoder, 64 px
crops, EMA decay 0.995) on a tiling.py manifest of the bundled slide. Its checkpoint is compared entry by
entry with the networks and optimizers the run holds, its export file by file with the checkpoint, and
a run interrupted after its first checkpoint and continued with --resume with the straight run.
"""
import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import demo
import tiling
import train
from support import checkpoints, weights

torch.set_num_threads(1)
SLIDES = Path(__file__).resolve().parent / "data"
STEPS = 4


def same(a, b):
    """Bitwise equality of nested tensors and plain values (state dicts, optimizer states)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """tiling.py on the bundled slide, a dozen tiles, 20 % of them val-in, as demo.py tiles it."""
    out = tmp_path_factory.mktemp("tiles")
    assert tiling.main(["--slides", str(SLIDES), "--out", str(out), "--max-tiles-per-slide", "12", "--val-in", "0.2",
                        "--seed", "0"]) == 0
    return out / "manifest.csv"


def demo_argv(manifest, out, *extra, gan=False):
    """demo.py's training settings (with gan=True, its GAN turned back on, so that every entry is there)."""
    settings = {k: v for k, v in demo.TRAIN.items() if not (gan and k == "no_gan")}
    return ["--tiles", str(manifest), "--out", str(out), "--max-steps", str(STEPS), "--ckpt-every", "2",
            "--sample-every", "2", "--num-sampling-steps", "2", "--grid-tiles", "2", "--no-lpips",
            *demo.flags(settings), *extra]


def straight_run(manifest, out, gan):
    """A straight run: its folder, and its networks and optimizers as they are after the last step."""
    held, build = {}, train.build_optimizers
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_optimizers", lambda args, nets: held.setdefault("opts", build(args, nets)))
        held["nets"] = train.train(train.parse_args(demo_argv(manifest, out, gan=gan)))
    return out, held["nets"], held["opts"]


@pytest.fixture(scope="module")
def straight(manifest, tmp_path_factory):
    """demo.py's settings exactly (no GAN)."""
    return straight_run(manifest, tmp_path_factory.mktemp("straight"), gan=False)


@pytest.fixture(scope="module")
def straight_gan(manifest, tmp_path_factory):
    """demo.py's settings with the GAN on: a checkpoint with every entry, the discriminator's included."""
    return straight_run(manifest, tmp_path_factory.mktemp("straight_gan"), gan=True)


def test_the_manifest_has_train_and_val_in_rows(manifest):
    with open(manifest, newline="") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    assert splits.count("train") >= 8 and splits.count("val_in") >= 1  # one global batch of 8, and a val set


def test_each_checkpoint_entry_is_the_tensor_it_names(straight_gan):
    out, nets, opts = straight_gan
    ckpt = torch.load(checkpoints.checkpoint_path(out, STEPS), weights_only=True)
    assert not same(nets.sit.state_dict(), nets.sit_ema.state_dict())  # EMA and raw differ: the test can tell
    assert not same(nets.vae.state_dict(), nets.vae_ema.state_dict())
    for key in ("sit", "sit_ema", "vae", "vae_ema", "disc"):
        assert same(ckpt[key], getattr(nets, key).state_dict()), key
    for key in ("sit", "vae", "disc"):
        assert same(ckpt[f"opt_{key}"], opts[key].state_dict()), f"opt_{key}"
    assert ckpt["step"] == STEPS and ckpt["config"]["ema_decay"] == demo.TRAIN["ema_decay"]
    assert {k: ckpt["config"][k] for k in ("model", "vae", "encoder", "image_size")} == \
        {k: demo.TRAIN[k] for k in ("model", "vae", "encoder", "image_size")}


def test_a_checkpoint_loads_each_entry_into_the_network_it_names(straight_gan, tmp_path):
    out, trained, _ = straight_gan
    ckpt = torch.load(checkpoints.checkpoint_path(out, STEPS), weights_only=True)
    args = train.parse_args(demo_argv(SLIDES, tmp_path, gan=True))
    nets = train.build_models(args, torch.device("cpu"), 1)
    opts = train.build_optimizers(args, nets)
    checkpoints.load_checkpoint(ckpt, nets, opts)
    for key in ("sit", "sit_ema", "vae", "vae_ema", "disc"):
        assert same(getattr(nets, key).state_dict(), getattr(trained, key).state_dict()), key
    for key in ("sit", "vae", "disc"):
        assert same(opts[key].state_dict(), ckpt[f"opt_{key}"]), key


def test_each_export_file_is_the_checkpoint_tensor_it_names(straight_gan, tmp_path):
    out, _, _ = straight_gan
    path = checkpoints.checkpoint_path(out, STEPS)
    ckpt = torch.load(path, weights_only=True)
    weights.main(["export", path, str(tmp_path / "export"), "--sit-weights", "ema,raw", "--vae-weights", "ema,raw"])
    files = sorted((tmp_path / "export").glob("*.safetensors"))
    assert [f.stem for f in files] == ["sit", "sit_ema", "vae", "vae_ema"]
    for f in files:
        assert same(load_file(f), ckpt[f.stem]), f.name
    models = weights.load_models(str(tmp_path / "export"))  # the default: both EMAs
    assert same(models.sit.state_dict(), ckpt["sit_ema"]) and same(models.vae.state_dict(), ckpt["vae_ema"])


def test_a_run_interrupted_after_a_checkpoint_resumes_to_the_straight_runs_weights(straight, manifest, tmp_path,
                                                                                   monkeypatch):
    out, _, _ = straight
    step, calls = train.train_step, []

    def killed_at_step_3(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the checkpoint of step 2 and its sample grid
        calls.append(1)
        return step(*args)
    monkeypatch.setattr(train, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args(demo_argv(manifest, tmp_path)))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000002.pt", "0000002.pt.sha256"]
    monkeypatch.setattr(train, "train_step", step)
    train.train(train.parse_args(demo_argv(manifest, tmp_path, "--resume")))  # as demo.py continues a run
    a = torch.load(checkpoints.checkpoint_path(out, STEPS), weights_only=True)
    b = torch.load(checkpoints.checkpoint_path(tmp_path, STEPS), weights_only=True)
    assert a["disc"] is None and b["disc"] is None  # demo.py trains without the GAN
    for key in ("sit", "sit_ema", "vae", "vae_ema", "opt_sit", "opt_vae", "rng"):
        assert same(a[key], b[key]), key
