"""Weights in and out (support/weights.py, sample.load_pipeline): no load path runs a pickle's code, an export
samples the very images of its checkpoint, the Python API with the released pipeline's keywords gives the
images of `sample.py --features`, and corrupt or non-finite weights are refused in one line.

The tiny random train.py-format checkpoint is conftest.py's.
"""
import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import sample
import train
from support import checkpoints, weights
from test_sample_cli import FAST, REPO, pngs, run
from test_train import tiny_args


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do, made visible."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture
def crafted(ckpt, tmp_path):
    """A train.py-looking checkpoint with a payload inside its config."""
    ck = torch.load(ckpt, weights_only=True)
    ck.update(step=5, opt_sit={}, opt_vae={}, rng=[], config={**ck["config"], "hidden": Payload(tmp_path / "ran")})
    torch.save(ck, tmp_path / "evil.pt")
    return tmp_path / "evil.pt", tmp_path / "ran"


def one_line(text):
    return "\n" not in text and "could run code" in text and "support.weights convert" in text


def test_no_load_path_runs_a_crafted_pickle(crafted, tmp_path):
    evil, marker = crafted
    with pytest.raises(weights.UnsafeCheckpoint) as err:  # sample.py --ckpt FILE
        run("--ckpt", evil, "--num-samples", 1, "--out", tmp_path / "out", *FAST)
    assert one_line(str(err.value)) and not (tmp_path / "out").exists()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "0000005.pt").write_bytes(evil.read_bytes())
    calls = [lambda: weights.load_models(str(evil)),
             lambda: train.train(tiny_args(tmp_path / "a", "--resume", str(evil))),      # --resume FILE
             lambda: train.train(tiny_args(tmp_path / "run", "--resume")),               # the latest in results_dir
             lambda: train.train(tiny_args(tmp_path / "b", "--init-from", str(evil)))]   # --init-from FILE
    for call in calls:
        with pytest.raises(weights.UnsafeCheckpoint) as err:
            call()
        assert one_line(str(err.value)), err.value
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


def test_train_py_refuses_a_crafted_pickle_in_one_line(crafted, tmp_path):
    evil, marker = crafted
    proc = subprocess.run([sys.executable, f"{REPO}/train.py", "--tiles", f"{REPO}/tests/data/tiles", "--resume",
                           str(evil), "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not marker.exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and one_line(proc.stderr.strip()), proc.stderr
    assert proc.stderr.startswith("train.py: error: ")


def test_a_trusted_pickle_converts_and_then_loads(crafted, ckpt, tmp_path):
    """convert is the one explicit full unpickle: it runs the payload (that is why it must be asked for),
    and its output is weights-only; an old numpy RNG state still restores the same stream."""
    old = torch.load(ckpt, weights_only=True)
    np.random.seed(3)
    old.update(step=1, opt_sit={}, opt_vae={}, rng=[{"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                                      "python": __import__("random").getstate(), "cuda": None}])
    torch.save(old, tmp_path / "old.pt")
    expected = np.random.random(3)
    with pytest.raises(weights.UnsafeCheckpoint, match=r"numpy.*could run code"):
        checkpoints.read_for_resume(str(tmp_path / "old.pt"))
    weights.main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")])
    assert (tmp_path / "new.pt.sha256").read_text().split()[0] == weights.sha256(tmp_path / "new.pt")  # summed too
    new = checkpoints.read_for_resume(str(tmp_path / "new.pt"))
    checkpoints.set_rng_state(new["rng"][0], torch.device("cpu"))
    assert np.array_equal(np.random.random(3), expected)


def test_rng_state_is_weights_only_and_restores_every_stream(tmp_path):
    state = checkpoints.rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(2), np.random.random(2), __import__("random").random())
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    got = (torch.rand(2), np.random.random(2), __import__("random").random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# -- export ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "cytosyn"
    weights.main(["export", ckpt, str(out), "--sit-weights", "ema,raw", "--vae-weights", "ema,raw"])
    return out


def test_export_holds_safetensors_and_a_config_with_checksums(exported, ckpt):
    meta = json.loads((exported / "config.json").read_text())
    assert sorted(meta["files"]) == ["sit", "sit_ema", "vae", "vae_ema"] and meta["step"] == 100
    assert meta["config"]["model"] == "SiT-T/2" and meta["config"]["vae"] == "tiny" and meta["source"] == ckpt
    for entry in meta["files"].values():
        assert weights.sha256(exported / entry["file"]) == entry["sha256"]


@pytest.mark.parametrize("weights", [[], ["--sit-weights", "raw", "--vae-weights", "raw"]])
def test_export_samples_the_same_png_bytes_as_its_checkpoint(weights, exported, ckpt, tmp_path):
    run("--ckpt", ckpt, "--num-samples", 2, "--out", tmp_path / "pt", *FAST, *weights)
    run("--ckpt", exported, "--num-samples", 2, "--out", tmp_path / "export", *FAST, *weights)
    assert pngs(tmp_path / "pt") == ["000000.png", "000001.png"] == pngs(tmp_path / "export")
    for f in pngs(tmp_path / "pt"):
        assert (tmp_path / "pt" / f).read_bytes() == (tmp_path / "export" / f).read_bytes()


def test_a_flipped_byte_is_refused_naming_the_file(exported, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in exported.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "sit_ema.safetensors").read_bytes())
    data[-10] ^= 1
    (bad / "sit_ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sit_ema.safetensors is missing or does not match the sha256"):
        run("--ckpt", bad, "--num-samples", 1, "--out", tmp_path / "out", *FAST)
    assert not (tmp_path / "out").exists()


def flip_a_bit(path):
    """Flip the lowest bit of one float32 of the largest record of a torch.save zip: the file stays valid and
    loads, with one weight changed, as a bit flipped on a disk or in a copy leaves it."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    header = record.header_offset  # the local header: 30 bytes, the name, the extra field, then the data
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + \
        int.from_bytes(data[header + 28:header + 30], "little")
    data[start + record.file_size // 8 * 4] ^= 1
    path.write_bytes(data)


def test_a_flipped_bit_in_a_checkpoint_is_refused_by_every_reader(ckpt, tmp_path, one_line_error):
    """Resume, sampling, export and --init-from check a checkpoint against its .sha256 before they read it:
    a flipped bit no longer samples silently, nor gets fresh sums stamped on it by export."""
    good = tmp_path / "run" / "checkpoints" / "0000100.pt"
    good.parent.mkdir(parents=True)
    good.write_bytes(pathlib.Path(ckpt).read_bytes())
    weights.write_checksum(str(good), str(good))
    assert weights.load_models(str(good)).step == 100  # its sum fits
    flip_a_bit(good)
    before, after = torch.load(ckpt, weights_only=True), torch.load(good, weights_only=True)
    changed = [(net, k) for net in ("sit", "sit_ema", "vae", "vae_ema") for k in before[net]
               if not torch.equal(before[net][k], after[net][k])]
    assert len(changed) == 1  # a valid file with one weight changed: without its sum, nothing would notice
    corrupt = f"{good} does not match its checksum {good}.sha256"
    calls = [lambda: weights.load_models(str(good)),
             lambda: train.train(tiny_args(tmp_path / "a", "--resume", str(good))),      # --resume FILE
             lambda: train.train(tiny_args(tmp_path / "run", "--resume")),               # the latest in --out
             lambda: train.train(tiny_args(tmp_path / "b", "--init-from", str(good)))]   # --init-from FILE
    for call in calls:
        with pytest.raises(weights.InputError) as err:
            call()
        assert corrupt in str(err.value)
    assert corrupt in one_line_error(sample.main, ["--ckpt", str(good), "--num-samples", "1", "--out",
                                                   str(tmp_path / "samples"), "--device", "cpu", *FAST])
    assert corrupt in one_line_error(weights.main, ["export", str(good), str(tmp_path / "export")])
    assert not (tmp_path / "samples").exists() and not (tmp_path / "export").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(ckpt, exported, tmp_path):
    ck = torch.load(ckpt, weights_only=True)
    ck["sit_ema"]["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    with pytest.raises(FloatingPointError, match=r"tensor blocks.1.attn.qkv.weight holds non-finite values"):
        run("--ckpt", tmp_path / "nan.pt", "--num-samples", 1, "--out", tmp_path / "a", *FAST)
    with pytest.raises(FloatingPointError, match=r"sit_ema: tensor blocks.1.attn.qkv.weight holds non-finite"):
        weights.export(str(tmp_path / "nan.pt"), str(tmp_path / "e"))
    from safetensors.torch import save_file  # an export whose checksum is right but whose VAE holds an inf
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((exported / "config.json").read_text())
    for f in exported.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    vae = {k: v.clone() for k, v in ck["vae_ema"].items()}
    vae["decoder.conv_out.bias"][1] = float("inf")
    save_file(vae, bad / "vae_ema.safetensors")
    meta["files"]["vae_ema"]["sha256"] = weights.sha256(bad / "vae_ema.safetensors")
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FloatingPointError, match=r"tensor decoder.conv_out.bias holds non-finite"):
        weights.load_models(str(bad))


# -- the Python API --------------------------------------------------------------------------------------
def test_api_with_the_released_keywords_gives_the_cli_images(exported, tmp_path):
    feats = np.random.default_rng(0).normal(size=(2, 48)).astype(np.float32)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "f.npy", feats)
    run("--ckpt", exported, "--features", tmp_path / "in" / "f.npy", "--n", 2, "--out", tmp_path / "cli",
        "--num-sampling-steps", 4, "--batch-size", 32)
    pipe = sample.load_pipeline(str(exported), device="cpu")
    images = pipe(h0_mini_embeds=feats, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.5,
                  guidance_low=0.0, guidance_high=0.75, seed=0)["images"]
    assert len(images) == 4 and images[0].size == (224, 224)
    for image, f in zip(images, pngs(tmp_path / "cli")):  # 000000_00, 000000_01, 000001_00, 000001_01
        assert np.array_equal(np.asarray(image), np.asarray(sample.Image.open(tmp_path / "cli" / f)))
    # LazySlide's / TRIDENT's (N, 1536) "CLS + mean patch" layout: the first half is the CLS
    lazyslide = np.concatenate([feats, np.ones_like(feats)], axis=1)
    again = pipe(h0_mini_embeds=torch.from_numpy(lazyslide), num_images_per_prompt=2, num_inference_steps=4, seed=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again["images"], images))


def test_api_unconditional_and_bad_keywords(exported, tmp_path):
    run("--ckpt", exported, "--num-samples", 2, "--out", tmp_path / "cli", "--num-sampling-steps", 4)
    pipe = sample.load_pipeline(str(exported), device="cpu")
    images = pipe(num_images_per_prompt=2, num_inference_steps=4)["images"]
    for image, f in zip(images, pngs(tmp_path / "cli")):
        assert np.array_equal(np.asarray(image), np.asarray(sample.Image.open(tmp_path / "cli" / f)))
    with pytest.raises(ValueError, match=r"guidance_scale=nan: nan is outside the allowed range \[0.0, 100.0\]"):
        pipe(h0_mini_embeds=np.zeros((1, 48)), guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"h0_mini_embeds has shape \(1, 7\)"):
        pipe(h0_mini_embeds=np.zeros((1, 7)))
    embeds = np.zeros((3, 48))
    embeds[2, 5] = np.nan  # refused before any sampling, naming the row
    with pytest.raises(FloatingPointError, match=r"^h0_mini_embeds: 1 of its 3 rows hold NaN or inf \(rows 2,"):
        pipe(h0_mini_embeds=embeds, num_inference_steps=2)
