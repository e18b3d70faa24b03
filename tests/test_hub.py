"""Exports on the Hugging Face hub (support/hub.py, support/model_card.py): `--ckpt hf-hub:ORG/REPO[@REVISION]` reads
an export through huggingface_hub's cache, offline from the cache alone, and what the cache lacks fails in one
line; `python -m support.weights push` writes, as a dry run, the very folder it would upload, with a model card
that huggingface_hub parses. No network: the cache is laid out here as huggingface_hub lays it out.

The tiny random train.py-format checkpoint is conftest.py's.
"""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import sample
from support import hub, weights
from test_sample_cli import pngs, run

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "cytosyn-test/tiny-release"


def hub_cache(cache, repo, folder, commit=COMMIT):
    """$HF_HOME/hub as `hf download` leaves it: models--ORG--REPO/{blobs/<hash>, snapshots/<commit>/<file> (links
    into blobs), refs/main (the commit)}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / commit


@pytest.fixture
def offline_cache(ckpt, tmp_path, monkeypatch):
    """An export of the checkpoint in a local hub cache, HF_HUB_OFFLINE=1 (and any network probe a failure)."""
    weights.main(["export", ckpt, str(tmp_path / "export"), "--format", "diffusers"])
    hub_cache(tmp_path / "cache", REPO, tmp_path / "export")
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "reachable", lambda url: pytest.fail("HF_HUB_OFFLINE=1 must not reach the network"))
    return tmp_path / "export"


def test_an_export_in_the_hub_cache_samples_offline_by_name(offline_cache, ckpt, tmp_path, one_line_error):
    run("--ckpt", f"hf-hub:{REPO}", "--num-samples", 2, "--out", tmp_path / "hub", "--num-sampling-steps", 2)
    run("--ckpt", ckpt, "--num-samples", 2, "--out", tmp_path / "ckpt", "--num-sampling-steps", 2)
    assert pngs(tmp_path / "hub") == pngs(tmp_path / "ckpt") == ["000000.png", "000001.png"]
    for f in pngs(tmp_path / "ckpt"):
        assert (tmp_path / "hub" / f).read_bytes() == (tmp_path / "ckpt" / f).read_bytes()
    recorded = json.loads((tmp_path / "hub" / "settings.json").read_text())["ckpt"]
    assert recorded.endswith(f"snapshots/{COMMIT}")  # the very commit sampled, not the moving name
    at_commit = weights.load_models(f"hf-hub:{REPO}@{COMMIT}")  # a revision by its commit
    assert at_commit.step == 100 and at_commit.layout == "export"
    layout, found, _ = weights.init_sources(f"hf-hub:{REPO}")  # train.py --init-from
    ck = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(found["sit"][k], v) for k, v in ck["sit_ema"].items())
    line = one_line_error(sample.main, ["--ckpt", "hf-hub:cytosyn-test/absent", "--num-samples", "1",
                                                      "--out", str(tmp_path / "absent"), "--device", "cpu"])
    assert "hf-hub:cytosyn-test/absent: could not fetch cytosyn-test/absent (offline" in line
    assert str(tmp_path / "cache") in line and not (tmp_path / "absent").exists()
    with pytest.raises(weights.InputError, match="hf-hub:ORG/REPO"):
        weights.load_models("hf-hub:not a repo")


def test_lazyslides_call_loads_the_hub_export_offline(offline_cache, tmp_path, monkeypatch):
    """DiffusionPipeline.from_pretrained(REPO, custom_pipeline=REPO, trust_remote_code=True), from the cache."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.utils import dynamic_modules_utils
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 before the first import
    pipe = diffusers.DiffusionPipeline.from_pretrained(REPO, custom_pipeline=REPO, trust_remote_code=True,
                                                       cache_dir=str(tmp_path / "cache"))
    keywords = dict(num_images_per_prompt=1, num_inference_steps=2, seed=2)
    ours = sample.load_pipeline(f"hf-hub:{REPO}", device="cpu")(**keywords)["images"]
    assert np.array_equal(np.asarray(pipe(**keywords)["images"][0]), np.asarray(ours[0]))


def card_checkpoint(ckpt, tmp_path):
    """The checkpoint with the training settings train.py records, a local path among them."""
    ck = torch.load(ckpt, weights_only=True)
    ck["config"].update(lr=3e-4, global_batch_size=640, ema_decay=0.9999, world_size=64, tiles="/private/slides")
    torch.save(ck, tmp_path / "trained.pt")
    return tmp_path / "trained.pt"


def test_push_dry_run_writes_the_export_and_its_card_and_uploads_nothing(ckpt, tmp_path, monkeypatch):
    weights.main(["export", str(card_checkpoint(ckpt, tmp_path)), str(tmp_path / "ours")])
    weights.main(["export", str(tmp_path / "ours"), str(tmp_path / "export"), "--format", "diffusers"])  # kept on
    report = {"date": "2026-12-01", "results": [
        {"row": "CytoSyn (sde, 250 steps)", "extractor": "uni2-h", "val": "val_out", "metric": "fd", "value": 15.125,
         "std": None, "settings": {}},
        {"row": "CytoSyn (sde, 250 steps)", "extractor": "uni2-h", "val": "val_out", "metric": "fd_bootstrap",
         "value": 15.5, "std": 0.25, "settings": {}}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr(hub, "HfApi", lambda *a, **k: pytest.fail("a dry run uploads nothing"))
    weights.main(["push", str(tmp_path / "export"), "my-lab/cytosyn-tiny", "--report", str(tmp_path / "report.json"),
                  "--dry-run", str(tmp_path / "upload")])
    exported = sorted(p.relative_to(tmp_path / "export") for p in (tmp_path / "export").rglob("*") if p.is_file())
    uploaded = sorted(p.relative_to(tmp_path / "upload") for p in (tmp_path / "upload").rglob("*") if p.is_file())
    assert [str(p) for p in uploaded] == sorted(["README.md"] + [str(p) for p in exported])
    assert all((tmp_path / "upload" / p).read_bytes() == (tmp_path / "export" / p).read_bytes() for p in exported
               if p.name != "config.json" or p.parent.name)  # the weights, the code, the components' configs
    here, public = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("export", "upload"))
    assert public == {**here, "source": "ours"} and str(tmp_path) not in json.dumps(public)
    card = ModelCard.load(tmp_path / "upload" / "README.md")  # huggingface_hub's own parser of the front matter
    assert card.data.library_name == "diffusers" and "histopathology" in card.data.tags
    raw = (tmp_path / "upload" / "README.md").read_text()
    assert card.data.license is None and "# license: TO FILL" in raw.split("---")[1]  # left to the user, visibly
    text = card.text
    for expected in ("| lr | 0.0003 |", "| global_batch_size | 640 |", "| world_size | 64 |", "| step | 100 |",
                     "| CytoSyn (sde, 250 steps) | fd | val_out | 15.12 |", "| fd_bootstrap | val_out | 15.5 ± 0.25 |",
                     "Training data and provenance", "TO FILL", "eprint = {2603.18089}",
                     "CytoSyn: a Foundation Diffusion Model for Histopathology -- Tech Report",
                     'custom_pipeline="my-lab/cytosyn-tiny"', "--ckpt hf-hub:my-lab/cytosyn-tiny"):
        assert expected in text, expected
    assert "/private/slides" not in text  # paths of the user's machine stay there


def test_push_checks_the_export_before_writing_anything(ckpt, tmp_path, one_line_error):
    weights.main(["export", ckpt, str(tmp_path / "export")])
    data = bytearray((tmp_path / "export" / "sit_ema.safetensors").read_bytes())
    data[-3] ^= 1
    (tmp_path / "export" / "sit_ema.safetensors").write_bytes(bytes(data))
    line = one_line_error(weights.main, ["push", str(tmp_path / "export"), "my-lab/x", "--dry-run",
                                         str(tmp_path / "upload")])
    assert "sit_ema.safetensors is missing or does not match the sha256" in line
    assert not (tmp_path / "upload").exists()
    line = one_line_error(weights.main, ["push", ckpt, "my-lab/x", "--dry-run", str(tmp_path / "upload")])
    assert "is not a CytoSyn export" in line and not (tmp_path / "upload").exists()
