"""Every option reaches the code it names, the frozen encoder's preprocessing is pinned by hand, and each
constant is read from its one owner, so that a reader finds one place to check it against its source.

Each option test changes one flag (or one keyword of the Python API) against a baseline and checks that the
one thing it names changed, and nothing else: which tensors each network loads (EMA or raw), which sampler
runs with which steps, guidance window and seed, which preprocessing each set of tiles gets, which split,
extractor and encoder are used. The samplers, extractors and encoders are replaced by recorders where
running them would only cost time. The encoder's input normalisation, its token slicing and the 16 -> 14
token resize are checked against values computed here from H0-mini's model card and torch's bicubic.
"""
import ast
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import features
import metrics as M
import sample
import sit as sit_module
import train
import vae as vae_module
from extractors import EXTRACTORS
from support import tile_features, weights

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TILES = ROOT / "tests" / "data" / "tiles"


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------- weights: each network's EMA / raw choice loads that network's tensors ------------------------
@pytest.mark.parametrize("sit_weights", ["ema", "raw"])
@pytest.mark.parametrize("vae_weights", ["ema", "raw"])
def test_each_network_loads_the_weights_its_own_keyword_names(ckpt, sit_weights, vae_weights):
    ck = torch.load(ckpt, weights_only=True)
    assert not state_equal(ck["sit"], ck["sit_ema"]) and not state_equal(ck["vae"], ck["vae_ema"])
    pipe = sample.load_pipeline(ckpt, "cpu", sit_weights=sit_weights, vae_weights=vae_weights)
    key = {"ema": "_ema", "raw": ""}
    assert state_equal(pipe.sit.state_dict(), ck["sit" + key[sit_weights]])
    assert state_equal(pipe.vae.state_dict(), ck["vae" + key[vae_weights]])


class Stop(Exception):
    """Raised by a recorder once it has seen what a test needs: nothing more has to run."""


@pytest.mark.parametrize("flags, sit_key, vae_key", [([], "sit_ema", "vae_ema"),
                                                     (["--sit-weights", "raw"], "sit", "vae_ema"),
                                                     (["--vae-weights", "raw"], "sit_ema", "vae")])
def test_sample_weight_flags_reach_their_own_network(ckpt, tmp_path, monkeypatch, flags, sit_key, vae_key):
    seen = {}

    def record(pipe, cond, noise_ids, settings, *restain):
        seen.update(sit=pipe.sit.state_dict(), vae=pipe.vae.state_dict())
        raise Stop
    monkeypatch.setattr(sample.Pipeline, "generate", record)
    with pytest.raises(Stop):
        sample.main(["--ckpt", ckpt, "--num-samples", "1", "--device", "cpu", "--out", str(tmp_path / "o"), *flags])
    ck = torch.load(ckpt, weights_only=True)
    assert state_equal(seen["sit"], ck[sit_key]) and state_equal(seen["vae"], ck[vae_key])


@pytest.mark.parametrize("sit_kinds, vae_kinds", [("raw", "ema"), ("ema", "raw"), ("ema,raw", "raw")])
def test_export_writes_the_tensors_each_flag_names(ckpt, tmp_path, sit_kinds, vae_kinds):
    out = tmp_path / "export"
    weights.main(["export", ckpt, str(out), "--sit-weights", sit_kinds, "--vae-weights", vae_kinds])
    ck = torch.load(ckpt, weights_only=True)
    names = {f"{net}{'_ema' if kind == 'ema' else ''}" for net, kinds in (("sit", sit_kinds), ("vae", vae_kinds))
             for kind in kinds.split(",")}
    assert {p.stem for p in out.glob("*.safetensors")} == names
    _, _, get = weights.read_export(str(out))
    for name in names:
        assert state_equal(get(name), ck[name]), name
    if "sit" in names and "vae" in names:  # and the export loads them back into the networks they name
        models = weights.load_models(str(out), sit_ema=False, vae_ema=False)
        assert state_equal(models.sit.state_dict(), ck["sit"]) and state_equal(models.vae.state_dict(), ck["vae"])


# -------- the sampler, its steps, its guidance window and the seed --------------------------------------
def sampler_recorder(monkeypatch):
    """Replace both samplers by recorders that return the starting noise (so decoding still runs)."""
    calls = []

    def euler(velocity, noise, heun=False, **guidance):
        calls.append(dict(sampler="heun" if heun else "euler", noise=noise.flatten()[:4].tolist(), **guidance))
        return noise

    def maruyama(velocity, noise, generator=None, **guidance):
        calls.append(dict(sampler="maruyama", noise=noise.flatten()[:4].tolist(), **guidance))
        return noise
    monkeypatch.setattr(sample, "euler_sampler", euler)
    monkeypatch.setattr(sample, "euler_maruyama_sampler", maruyama)
    return calls


def plain(call):
    return {k: (None if v is None else v.tolist()) if torch.is_tensor(v) or v is None else v for k, v in call.items()}


BASE = ["--sampler", "ode", "--num-sampling-steps", "3", "--cfg-scale", "2.5", "--guidance-low", "0.0",
        "--guidance-high", "0.75", "--seed", "0"]
ONE_FLAG = {  # flag -> value, and what it must change in the sampler's call
    "--sampler heun": {"sampler": "heun"},
    "--sampler sde": {"sampler": "maruyama"},
    "--num-sampling-steps 5": {"num_steps": 5},
    "--cfg-scale 1.5": {"cfg_scale": 1.5},
    "--guidance-low 0.25": {"guidance_low": 0.25},
    "--guidance-high 0.9": {"guidance_high": 0.9},
    "--seed 7": {"noise"},
}


def with_flag(argv, flag):
    name, value = flag.split()
    argv = list(argv)
    argv[argv.index(name) + 1] = value
    return argv


@pytest.mark.parametrize("flag", list(ONE_FLAG))
def test_each_sampling_flag_reaches_the_sampler_and_changes_only_its_setting(ckpt, tmp_path, monkeypatch, flag):
    calls = sampler_recorder(monkeypatch)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "f.npy", np.ones((1, 48), np.float32))
    common = ["--ckpt", ckpt, "--features", str(tmp_path / "in" / "f.npy"), "--n", "1", "--device", "cpu"]
    sample.main(common + BASE + ["--out", str(tmp_path / "a")])
    sample.main(common + with_flag(BASE, flag) + ["--out", str(tmp_path / "b")])
    base, changed = plain(calls[0]), plain(calls[1])
    assert base["sampler"] == "euler" and base["num_steps"] == 3 and base["cond"] == [[1.0] * 48]
    expected = ONE_FLAG[flag]
    assert {k for k in base if base[k] != changed[k]} == set(expected)
    if isinstance(expected, dict):
        assert all(changed[k] == v for k, v in expected.items())


def test_the_api_keywords_reach_the_sampler(ckpt, monkeypatch):
    calls = sampler_recorder(monkeypatch)
    pipe = sample.load_pipeline(ckpt, "cpu")
    embeds = np.ones((1, 48), np.float32)
    pipe(embeds, num_inference_steps=3, guidance_scale=1.5, guidance_low=0.25, guidance_high=0.9, seed=7,
         sampler="heun")
    pipe(embeds, num_inference_steps=3, guidance_scale=1.5, guidance_low=0.25, guidance_high=0.9, seed=0,
         sampler="sde")
    first, second = plain(calls[0]), plain(calls[1])
    assert {k: first[k] for k in ("sampler", "num_steps", "cfg_scale", "guidance_low", "guidance_high")} == \
        dict(sampler="heun", num_steps=3, cfg_scale=1.5, guidance_low=0.25, guidance_high=0.9)
    assert second["sampler"] == "maruyama" and first["noise"] != second["noise"]  # seed 7 vs seed 0


EVALUATE_FLAGS = {  # evaluate.py's flag -> the sample.py setting it must set (and no other)
    "--sit-weights raw": ("sit_weights", "raw"), "--vae-weights raw": ("vae_weights", "raw"),
    "--cfg-scale 1.5": ("cfg_scale", 1.5), "--guidance-low 0.25": ("guidance_low", 0.25),
    "--guidance-high 0.9": ("guidance_high", 0.9), "--seed 7": ("seed", 7),
    "--sample-batch-size 3": ("batch_size", 3), "--precision fp32": ("precision", "fp32"),
}


@pytest.mark.parametrize("flag", list(EVALUATE_FLAGS))
def test_evaluate_passes_each_sampling_flag_to_sample_py(tmp_path, monkeypatch, flag):
    seen = []
    monkeypatch.setattr(sample, "main", lambda argv: seen.append(vars(sample.parse_args(argv))))
    base = ["--ckpt", "c.pt", "--tiles", "t", "--out", str(tmp_path), "--cfg-scale", "2.5", "--guidance-low", "0.0",
            "--guidance-high", "0.75", "--seed", "0", "--sit-weights", "ema", "--vae-weights", "ema",
            "--sample-batch-size", "32", "--precision", "auto"]
    for argv in (base, with_flag(base, flag)):
        evaluate.generate_tiles(evaluate.parse_args(argv), tmp_path / "cls.npy", tmp_path / "generated", "ode", 4)
    assert (seen[0]["sampler"], seen[0]["num_sampling_steps"], seen[0]["n"]) == ("ode", 4, 1)
    key, value = EVALUATE_FLAGS[flag]
    assert {k for k in seen[0] if seen[0][k] != seen[1][k]} == {key} and seen[1][key] == value


# -------- preprocessing, extractor, split, encoder ------------------------------------------------------
def write_tiles(folder, names, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(map(ord, str(folder))))
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def feature_recorder(monkeypatch, module, stop_at=None):
    """metrics.extract_features replaced: records (folder name, extractor, preprocessing), builds the
    extractor (recorded by the build_extractor stand-in), returns 2-d features."""
    calls, built = [], []

    def extract(folder, spec, prep, get_extractor, identity, **kw):
        get_extractor()
        calls.append((Path(folder).name, identity["extractor"], prep))
        if Path(folder).name == stop_at:
            raise Stop
        stems = sorted(p.stem for p in Path(folder).glob("*.png"))
        return stems, np.random.default_rng(len(calls)).standard_normal((len(stems), 2))
    monkeypatch.setattr(module, "extract_features", extract)
    monkeypatch.setattr(module, "build_extractor", lambda name, *a, **k: built.append(name))
    return calls, built


METRICS_FLAGS = {  # flag -> {set: what its Preprocess must hold}
    "--crop 6": {"val": dict(crop=6), "generated": dict(crop=6)},
    "--jpeg-val 70": {"val": dict(jpeg=70)},
    "--jpeg-generated 70": {"generated": dict(jpeg=70)},
    "--resize-kernel nearest": {"val": dict(kernel="nearest"), "generated": dict(kernel="nearest")},
    "--resize-to-input": {"val": dict(resize_to_input=True), "generated": dict(resize_to_input=True)},
    "--extractors fid-inception": {},
}


@pytest.mark.filterwarnings("ignore:FD from")
@pytest.mark.parametrize("flag", list(METRICS_FLAGS))
def test_metrics_preprocessing_and_extractor_flags_reach_each_set(tmp_path, monkeypatch, flag):
    real, fake = write_tiles(tmp_path / "real", list("abcde")), write_tiles(tmp_path / "fake", list("vwxyz"))
    calls, built = feature_recorder(monkeypatch, M)
    base = ["--val", str(real), "--generated", str(fake), "--extractors", "tiny", "--random-weights", "--metrics",
            "fd", "--device", "cpu", "--num-workers", "0", "--no-cache"]
    M.main(base + ["--out", str(tmp_path / "a")])
    M.main(base + flag.split() + ["--out", str(tmp_path / "b")])
    folder_of = {"real": "val", "fake": "generated"}
    before = {folder_of[f]: (name, prep) for f, name, prep in calls[:2]}
    after = {folder_of[f]: (name, prep) for f, name, prep in calls[2:]}
    extractor = "fid-inception" if "extractors" in flag else "tiny"
    assert built == ["tiny", extractor] and {n for n, _ in after.values()} == {extractor}
    for s in ("val", "generated"):
        changed = {k: v for k, v in vars(after[s][1]).items() if vars(before[s][1])[k] != v}
        assert changed == METRICS_FLAGS[flag].get(s, {}), s


def test_metrics_jpeg_guidance_reaches_the_fld_training_set(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(M, "score_extractors", lambda names, score: ([], []))  # main's preprocessing only
    original = M.Preprocess
    monkeypatch.setattr(M, "Preprocess", lambda *a: made.append(a) or original(*a))
    real = write_tiles(tmp_path / "real", list("ab"))
    M.main(["--val", str(real), "--generated", str(real), "--guidance", str(real), "--metrics", "fld",
            "--jpeg-guidance", "60", "--jpeg-val", "80", "--out", str(tmp_path / "o")])
    assert [a[0] for a in made] == [80, None, 60]  # val, generated, guidance, in that order


EVALUATE_PREP = {  # flag -> {folder: what its Preprocess must hold}
    "--jpeg-val 70": {"val_in": dict(jpeg=70), "val_out": dict(jpeg=70)},
    "--jpeg-guidance 70": {"guidance": dict(jpeg=70)},
    "--jpeg-generated 70": {"ode-4": dict(jpeg=70)},
    "--crop 6": {k: dict(crop=6) for k in ("guidance", "val_in", "val_out", "ode-4")},
    "--resize-kernel box": {k: dict(kernel="box") for k in ("guidance", "val_in", "val_out", "ode-4")},
}


@pytest.mark.filterwarnings("ignore:FD from")
@pytest.mark.parametrize("flag", list(EVALUATE_PREP))
def test_evaluate_preprocessing_flags_reach_each_set(tmp_path, monkeypatch, flag):
    for folder in ("guidance", "val_in", "val_out"):
        write_tiles(tmp_path / folder, [f"{folder}{i}" for i in range(6)])
    generated = write_tiles(tmp_path / "generated" / "ode-4", [f"{i:06d}_00" for i in range(6)])
    preps = []
    for argv in ([], flag.split()):
        calls, _ = feature_recorder(monkeypatch, evaluate, stop_at="ode-4")
        args = evaluate.parse_args(["--ckpt", "c", "--tiles", "t", "--out", str(tmp_path), "--extractors", "tiny",
                                    "--random-weights", "--bootstrap-draws", "0", "--k", "2", *argv])
        run = evaluate.Generated(generated, {}, None, True)
        cohort = evaluate.Cohort(None, "t", tmp_path / "guidance", {v: tmp_path / v for v in ("val_in", "val_out")},
                                 {"ode-4": run})
        with pytest.raises(Stop):
            evaluate.score_extractor("tiny", args, [cohort], torch.device("cpu"))
        preps.append({folder: vars(prep) for folder, _, prep in calls})
    assert set(preps[0]) == {"guidance", "val_in", "val_out", "ode-4"}
    for folder in preps[0]:
        changed = {k: v for k, v in preps[1][folder].items() if preps[0][folder][k] != v}
        assert changed == EVALUATE_PREP[flag].get(folder, {}), folder


def test_the_resize_kernel_crop_and_jpeg_reach_the_pixels_the_extractor_sees(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "t.png")
    seen = []

    class Recorder:
        def embed(self, x, bf16=False):
            seen.append((x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
            return torch.zeros(len(x), 48)

    def sees(prep):
        tile_features.extract_features(tmp_path, EXTRACTORS["tiny"], prep, lambda: Recorder(),
                                       identity=dict(extractor="tiny", weights="test"))
        return seen[-1]
    image = Image.fromarray(pixels)
    kernels = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX, None: Image.Resampling.BICUBIC}
    for kernel, pil in kernels.items():  # None: the extractor's own (tiny: bicubic)
        assert np.array_equal(sees(tile_features.Preprocess(kernel=kernel)),
                              np.asarray(image.resize((224, 224), pil))), kernel
    assert np.array_equal(sees(tile_features.Preprocess(crop=224)), pixels[16:240, 16:240])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=30)
    jpeg = np.asarray(Image.open(buffer).convert("RGB"))
    assert np.array_equal(sees(tile_features.Preprocess(jpeg=30, crop=224)), jpeg[16:240, 16:240])


def test_evaluate_val_sets_selects_the_splits_linked_and_guidance_comes_from_train(tmp_path):
    tiles = tmp_path / "tiles"
    rows = [dict(file=f"tiles/{split}{i}.png", split=split, tss="") for split in ("train", "val_in", "val_out")
            for i in range(4)]
    write_tiles(tiles / "tiles", [Path(r["file"]).stem for r in rows])
    with open(tiles / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "split", "tss"])
        writer.writeheader()
        writer.writerows(rows)
    args = evaluate.parse_args(["--ckpt", "c", "--tiles", str(tiles), "--out", str(tmp_path / "o"), "--num-guidance",
                                "3", "--val-sets", "val_out"])
    guidance, _, vals = evaluate.select_tiles(args)
    evaluate.link_tiles(args, guidance, vals)
    assert sorted(p.stem for p in (tmp_path / "o" / "val_out").iterdir()) == [f"val_out{i}" for i in range(4)]
    assert not (tmp_path / "o" / "val_in").exists()
    assert len(guidance) == 3 and all(Path(r["path"]).stem.startswith("train") for r in guidance)


def test_the_encoder_flag_and_seed_reach_the_encoder_train_and_features_load(tmp_path, monkeypatch):
    loaded = []
    tiny = features.load_encoder("tiny", pretrained=False)

    def record(name, pretrained=True, seed=0):
        loaded.append((name, seed))
        return tiny
    monkeypatch.setattr(train, "load_encoder", record)
    monkeypatch.setattr(features, "load_encoder", record)
    for argv in (["--encoder", "tiny", "--seed", "0"], ["--encoder", "h0-mini", "--seed", "0"],
                 ["--encoder", "tiny", "--seed", "3"]):
        args = train.parse_args(["--tiles", "x", "--model", "SiT-T/2", "--vae", "tiny", "--image-size", "32",
                                 "--no-lpips", "--no-gan", "--random-weights", *argv])
        train.build_models(args, torch.device("cpu"), 1)
    monkeypatch.setattr(features, "write_tokens", lambda *a: (_ for _ in ()).throw(Stop))
    with pytest.raises(Stop):
        features.main(["--tiles", str(TILES), "--out", str(tmp_path / "f"), "--encoder", "h0-mini", "--seed", "5",
                       "--device", "cpu", "--num-workers", "0"])
    assert loaded == [("tiny", 0), ("h0-mini", 0), ("tiny", 3), ("h0-mini", 5)]


def test_sampling_encodes_with_the_checkpoints_encoder(ckpt, tmp_path, monkeypatch):
    ck = torch.load(ckpt, weights_only=True)
    ck["config"] = {**ck["config"], "encoder": "other", "seed": 9}  # as if trained with another encoder
    torch.save(ck, tmp_path / "other.pt")
    loaded = []
    monkeypatch.setattr(sample, "load_encoder", lambda name, seed=0: loaded.append((name, seed)) or
                        features.load_encoder("tiny", pretrained=False))
    tile = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    sample.load_pipeline(str(tmp_path / "other.pt"), "cpu").encode_tiles(tile)
    sample.load_pipeline(ckpt, "cpu").encode_tiles(tile)
    assert loaded == [("other", 9), ("tiny", 0)]


# -------- H0-mini's preprocessing, by hand -----------------------------------------------------------
MODEL_CARD_MEAN = (0.707223, 0.578729, 0.703617)  # bioptimus/H0-mini's model card
MODEL_CARD_STD = (0.211883, 0.230117, 0.177517)


class FakeEncoder:
    """forward_features returns a known token tensor and keeps what it was given."""
    num_prefix_tokens = 5  # CLS + 4 registers

    def __init__(self, tokens):
        self.tokens, self.seen = tokens, None

    def forward_features(self, x):
        self.seen = x
        return self.tokens.expand(len(x), -1, -1)


def known_tokens(side=16):
    """(1, 5 + side^2, 2): prefix token i holds (-i, i); patch (r, c) holds (100 r + c, r - 7 c)."""
    r, c = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    patches = torch.stack([100 * r + c, r - 7 * c], -1).reshape(1, side * side, 2)  # row-major tokens
    prefix = torch.stack([-torch.arange(5.0), torch.arange(5.0)], -1)[None]
    return torch.cat([prefix, patches], 1), patches


def test_encoder_input_is_normalised_with_the_model_cards_constants():
    image = torch.zeros(2, 3, 224, 224, dtype=torch.uint8)
    for c, value in enumerate((255, 0, 51)):
        image[:, c] = value
    image[1, :, :, 100:] = 128
    encoder = FakeEncoder(known_tokens()[0])
    features.encoder_features(encoder, image, token_grid=16)
    for b, col, values in ((0, 0, (255, 0, 51)), (1, 0, (255, 0, 51)), (1, 200, (128, 128, 128))):
        for c, v in enumerate(values):
            expected = (v / 255 - MODEL_CARD_MEAN[c]) / MODEL_CARD_STD[c]
            assert encoder.seen[b, c, :, col].sub(expected).abs().max() < 1e-5, (b, c, col)
    features.encoder_features(encoder, image.float() / 255, token_grid=16)  # floats in [0, 1]: the same input
    assert encoder.seen[0, 0, 0, 0].item() == pytest.approx((1 - MODEL_CARD_MEAN[0]) / MODEL_CARD_STD[0], abs=1e-5)


def test_tiles_of_another_size_are_resized_to_224_bicubic_antialiased_before_normalising():
    image = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    encoder = FakeEncoder(known_tokens()[0])
    features.encoder_features(encoder, image, token_grid=16)
    resized = F.interpolate(image.float() / 255, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    mean, std = torch.tensor(MODEL_CARD_MEAN).view(1, 3, 1, 1), torch.tensor(MODEL_CARD_STD).view(1, 3, 1, 1)
    expected = (resized - mean) / std
    assert encoder.seen.shape == (1, 3, 224, 224) and torch.allclose(encoder.seen, expected, atol=1e-5)


def test_cls_is_token_0_and_the_patches_follow_the_4_registers():
    tokens, patches = known_tokens()
    cls, out = features.encoder_features(FakeEncoder(tokens), torch.zeros(1, 3, 224, 224, dtype=torch.uint8), 16)
    assert cls.tolist() == [[0.0, 0.0]] and torch.equal(out, patches)


def test_the_16_to_14_token_resize_lands_where_bicubic_puts_it():
    """A pattern that differs along rows and columns, and between the two channels: each channel's 16 x 16
    grid (row r, column c = token 16 r + c) resized as an image by torch's antialiased bicubic, read back
    row-major."""
    tokens, patches = known_tokens()
    _, out = features.encoder_features(FakeEncoder(tokens), torch.zeros(1, 3, 224, 224, dtype=torch.uint8), 14)
    grids = patches[0].T.reshape(2, 16, 16)  # (D, rows, columns)
    assert grids[0, 1, 0] == 100 and grids[0, 0, 1] == 1 and grids[1, 0, 1] == -7  # the layout, by hand
    expected = F.interpolate(grids[None], size=(14, 14), mode="bicubic", antialias=True, align_corners=False)[0]
    assert out.shape == (1, 196, 2)
    assert torch.allclose(out[0].T.reshape(2, 14, 14), expected, atol=1e-4)
    rows = out[0, :, 0].reshape(14, 14)  # channel 0 grows by about 100 x 16/14 per row, 16/14 per column
    assert (rows[1:] - rows[:-1]).mean() == pytest.approx(100 * 16 / 14, rel=0.02)
    assert (rows[:, 1:] - rows[:, :-1]).mean() == pytest.approx(16 / 14, rel=0.02)


# -------- one owner per constant -----------------------------------------------------------------------
def features_grid(monkeypatch, tmp_path, model, vae, size):
    """The token grid features.py writes its tokens at (write_tokens' grid argument)."""
    seen = []

    def record(encoder, batches, out, grid, device, bar):
        seen.append(grid)
        raise Stop
    monkeypatch.setattr(features, "write_tokens", record)
    with pytest.raises(Stop):
        features.main(["--tiles", str(TILES), "--out", str(tmp_path / "f"), "--encoder", "tiny", "--random-weights",
                       "--model", model, "--vae", vae, "--image-size", str(size), "--resize", "scale", "--device",
                       "cpu", "--num-workers", "0"])
    return seen[0]


def test_features_writes_the_token_grid_train_builds_for_every_preset(monkeypatch, tmp_path):
    """Every SiT and VAE preset, and two more that change the patch and the VAE factor, so that a grid
    restated as image_size // 16 cannot pass."""
    monkeypatch.setitem(sit_module.SiT_models, "SiT-P4", dict(depth=2, hidden_size=64, patch_size=4, num_heads=4,
                                                             encoder_depth=1, projector_dim=32))
    monkeypatch.setitem(vae_module.vae_models, "f4", dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4))
    tiny = features.load_encoder("tiny", pretrained=False)
    monkeypatch.setattr(features, "load_encoder", lambda *a, **k: tiny)  # built once, not per preset
    grids = set()
    for model in sit_module.SiT_models:
        for vae in vae_module.vae_models:
            for size in (224, 256, 64):
                args = train.parse_args(["--tiles", "x", "--model", model, "--vae", vae, "--image-size", str(size),
                                         "--no-lpips"])
                with torch.device("meta"):
                    built = train.build_models(args, torch.device("meta"), 1, feature_dim_=48).sit.token_grid
                assert features_grid(monkeypatch, tmp_path, model, vae, size) == built, (model, vae, size)
                grids.add(built)
    assert {14, 16, 4, 7, 8} <= grids


def restated_constants(source, allowed=()):
    """(line, text) of every place a source restates the tile size 224 or the MPP 0.5: a 224 anywhere,
    or a 0.5 as an argparse default, a parameter default, a .get() or `or` fallback, a *SIZE* / *MPP* constant."""
    tree, lines, found = ast.parse(source), source.splitlines(), []

    def flag(node):
        line = lines[node.lineno - 1].strip()
        if not any(a in line for a in allowed):
            found.append((node.lineno, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 224:
            flag(node)
        defaults = []
        if isinstance(node, ast.keyword) and node.arg == "default":
            defaults.append(node.value)
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            defaults += node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and len(node.args) == 2:
            defaults.append(node.args[1])
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):  # `args.mpp or 0.5`
            defaults.append(node.values[-1])
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and ("MPP" in t.id or "SIZE" in t.id)
                                                for t in node.targets):
            defaults.append(node.value)
        for d in defaults:
            for c in ast.walk(d):
                if isinstance(c, ast.Constant) and c.value == 0.5 and type(c.value) is float:
                    flag(c)
    return found


# Where 224 or 0.5 means something else, or is the owner itself.
ALLOWED = {
    "support/tiles.py": ["TILE_SIZE, TILE_MPP = 224, 0.5"],  # the owner
    "tiling.py": ["--min-tissue"],  # a tissue fraction
    "features.py": ["ENCODER_SIZE = 224", "img_size=224"],  # H0-mini's own input size (ViT/14, 16 x 16 patches)
    "extractors.py": ["img_size=224", "input_size: int = 224", "patch14_224", "patch16_224"],  # extractors'
    "train.py": ["--proj-sit-weight"],  # REPA's loss weight
    "sample.py": ["STRENGTH = 5, 0.5"],  # restaining's default strength, a time on the interpolant
}


def test_the_tile_size_and_mpp_are_read_from_their_one_owner_everywhere_else():
    found = {}
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "support").glob("*.py")):
        name = str(path.relative_to(ROOT))
        hits = restated_constants(path.read_text(), ALLOWED.get(name, ()))
        if hits:
            found[name] = hits
    assert not found, f"restated tile size / MPP (import TILE_SIZE / TILE_MPP from support/tiles.py): {found}"


def test_the_constant_checker_finds_restatements():
    planted = ('p.add_argument("--image-size", type=int, default=224)\n'
               'def tile(path, mpp=0.5):\n    return config.get("mpp", 0.5)\nSLIDE_MPP = 0.5\nx = 0.5 * y\n'
               'mpp = args.mpp or 0.5\n')
    assert sorted(line for line, _ in restated_constants(planted)) == [1, 2, 3, 4, 6]
    assert restated_constants(planted, ["--image-size", "def tile", "config.get", "SLIDE_MPP", "args.mpp"]) == []


def test_a_config_without_its_tile_size_is_refused_not_given_a_default(ckpt, tmp_path):
    ck = torch.load(ckpt, weights_only=True)
    ck["config"] = {k: v for k, v in ck["config"].items() if k not in ("input_size", "image_size")}
    torch.save(ck, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="neither input_size nor image_size"):
        weights.load_models(str(tmp_path / "bare.pt"))
    ck["config"]["image_size"] = 224  # the tile size alone gives the latent size
    torch.save(ck, tmp_path / "sized.pt")
    assert weights.load_models(str(tmp_path / "sized.pt")).sit.input_size == 28
