"""The release's format (support/diffusers_format.py): an export in diffusers' layout loads in diffusers as LazySlide
loads CytoSyn and samples the very pixels of sample.py; its VAE is a plain diffusers AutoencoderKL; it holds no
pickle and its code needs nothing of this repository; this project's tools read it back.

The tiny random train.py-format checkpoint is conftest.py's (its EMA BatchNorm statistics are not the identity,
so a denormalisation that did not travel with the transformer would show).
"""
import ast
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sample
import vae
from support import diffusers_format, weights
from test_sample_cli import pngs, run

diffusers = pytest.importorskip("diffusers")
STEPS = 3  # SDE times 1, 0.52, 0.04, then 0: the guidance window [0, 0.75] holds some of them and not others


@pytest.fixture(scope="module")
def release(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "cytosyn"
    weights.main(["export", ckpt, str(out), "--format", "diffusers"])
    return out


def load_in_diffusers(release, tmp_path, monkeypatch):
    """DiffusionPipeline.from_pretrained as LazySlide calls it; diffusers copies the custom code into its modules
    cache, here a folder of this test's own."""
    from diffusers.utils import dynamic_modules_utils
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return diffusers.DiffusionPipeline.from_pretrained(str(release), custom_pipeline=str(release),
                                                       trust_remote_code=True)


def pixels(images):
    return [np.asarray(image) for image in images]


def test_diffusers_loads_the_export_and_samples_sample_pys_pixels(release, ckpt, tmp_path, monkeypatch):
    feats = np.random.default_rng(1).normal(size=(2, 48)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    settings = ["--n", 2, "--num-sampling-steps", STEPS, "--seed", 3, "--batch-size", 32]
    run("--ckpt", ckpt, "--features", tmp_path / "f.npy", "--out", tmp_path / "ckpt", *settings)
    run("--ckpt", release, "--features", tmp_path / "f.npy", "--out", tmp_path / "release", *settings)
    cli = [sample.Image.open(tmp_path / "ckpt" / f) for f in pngs(tmp_path / "ckpt")]  # 000000_00, _01, 000001_00 ...
    assert len(cli) == 4
    assert all(np.array_equal(a, b) for a, b in zip(pixels(cli), pixels(
        sample.Image.open(tmp_path / "release" / f) for f in pngs(tmp_path / "release"))))  # sample.py --ckpt OUT

    pipe = load_in_diffusers(release, tmp_path, monkeypatch)
    assert type(pipe).__name__ == "CytoSynPipeline" and type(pipe.vae) is diffusers.AutoencoderKL
    keywords = dict(h0_mini_embeds=feats, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=2.5,
                    guidance_low=0.0, guidance_high=0.75, seed=3)
    images = pipe(**keywords)["images"]
    assert len(images) == 4 and images[0].size == (224, 224)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(images), pixels(cli)))
    ours = sample.load_pipeline(str(release), device="cpu")(**keywords)["images"]  # load_pipeline(OUT)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(ours), pixels(cli)))
    # unconditional: the null embedding, image k's noise from (seed, k)
    unconditional = dict(num_images_per_prompt=2, num_inference_steps=2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(
        pixels(pipe(**unconditional)["images"]), pixels(sample.load_pipeline(ckpt, device="cpu")(**unconditional)
                                                        ["images"])))


def test_the_export_is_the_checkpoints_ema_weights_in_diffusers_layout(release, ckpt):
    ck = torch.load(ckpt, weights_only=True)
    plain = diffusers.AutoencoderKL.from_pretrained(str(release / "vae"))  # no custom code: other diffusers code can
    assert plain.config.scaling_factor == 1.0  # CytoSyn's latents are normalised by the SiT's BatchNorm instead
    ours = vae.build_vae("tiny").eval()
    ours.load_state_dict(ck["vae_ema"])
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same network; its attention rounds otherwise, so close and not bit for bit
        assert torch.allclose(plain.decode(z).sample, ours.decode(z), atol=1e-4, rtol=0)
    with safe_open(str(release / "transformer" / diffusers_format.WEIGHTS_FILE), "pt") as f:
        shipped = {k: f.get_tensor(k) for k in f.keys()}
    assert shipped.keys() == {f"sit.{k}" for k in ck["sit_ema"]}  # REPA-E's names under sit.
    assert all(torch.equal(shipped[f"sit.{k}"], v) for k, v in ck["sit_ema"].items())
    assert torch.equal(shipped["sit.bn.running_var"], torch.full((4,), 4.0))  # the EMA's statistics travel
    config = json.loads((release / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "CytoSynTransformer" and config["depth"] == 4 and config["cond_dim"] == 48
    index = json.loads((release / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["transformer"][1] == "CytoSynTransformer"


def test_the_export_holds_no_pickle_and_code_that_needs_nothing_of_this_repo(release):
    files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    assert {p.rsplit(".", 1)[1] for p in files} == {"json", "py", "safetensors"}, files
    for path in files:
        head = (release / path).read_bytes()[:4]
        assert head[:2] != b"\x80\x02" and head[:2] != b"PK", path  # neither a pickle nor torch.save's zip
    allowed = {"math", "contextlib", "numpy", "torch", "PIL", "diffusers"}
    needed = {"pipeline.py": {"CytoSynPipeline", "euler_maruyama_sampler", "noise_seed", "AutoencoderKL", "to_pixels"},
              "transformer/cytosyn_transformer.py": {"CytoSynTransformer", "SiT"}}
    for path, names in needed.items():
        tree = ast.parse((release / path).read_text())
        imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                    for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        assert imported <= allowed, (path, imported - allowed)
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert names <= defined, (path, names - defined)


def test_the_vae_name_table_reads_both_ways():
    """to_diffusers_state_dict gives diffusers' own names and shapes, and convert_diffusers_state_dict undoes it."""
    for preset, widths, layers in (("tiny", [32] * 4, 1), ("f8d4", [128, 256, 512, 512], 2)):
        with torch.device("meta"):
            ours = vae.build_vae(preset).state_dict()
            theirs = diffusers.AutoencoderKL(**diffusers_format.vae_config(preset, 224)).state_dict()
        assert [widths, layers] == [diffusers_format.vae_config(preset, 224)[k] for k in ("block_out_channels",
                                                                                            "layers_per_block")]
        converted = vae.to_diffusers_state_dict(ours)
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}
        back = vae.convert_diffusers_state_dict(converted)
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}
    ours = vae.build_vae("tiny").state_dict()  # and the values go back where they came from
    back = vae.convert_diffusers_state_dict(vae.to_diffusers_state_dict(ours))
    assert all(torch.equal(back[k], v) for k, v in ours.items())


def test_diffusers_layout_takes_one_sit_and_one_vae(ckpt, tmp_path, one_line_error):
    line = one_line_error(weights.main, ["export", ckpt, str(tmp_path / "o"), "--format", "diffusers",
                                         "--sit-weights", "ema,raw"])
    assert "--format diffusers holds one SiT and one VAE" in line and not (tmp_path / "o").exists()
    weights.main(["export", ckpt, str(tmp_path / "raw"), "--format", "diffusers", "--sit-weights", "raw"])
    ck = torch.load(ckpt, weights_only=True)
    models = weights.load_models(str(tmp_path / "raw"), sit_ema=False)
    assert all(torch.equal(v, ck["sit"][k]) for k, v in models.sit.state_dict().items())
    assert all(torch.equal(v, ck["vae_ema"][k]) for k, v in models.vae.state_dict().items())
    with pytest.raises(weights.InputError, match="has no EMA SIT weights: pass --sit-weights raw"):
        weights.load_models(str(tmp_path / "raw"))
