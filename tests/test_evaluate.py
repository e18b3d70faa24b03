"""evaluate.py end to end on a tiny checkpoint and a tiny tiling output (CPU, random extractors)."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
import sample
from conftest import perturbed
from features import load_encoder
from sit import build_sit
from vae import build_vae

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:FD from")  # a handful of tiles in 48 dims: expected here


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """64 px tiles (an 8 x 8 latent), unlike conftest's 224 px checkpoint: the benchmark samples many."""
    torch.manual_seed(0)
    encoder = load_encoder("tiny", pretrained=False)
    sit = perturbed(build_sit("SiT-T/2", input_size=8, cond_dim=encoder.embed_dim, z_dim=encoder.embed_dim), 1)
    vae = perturbed(build_vae("tiny"), 2)
    config = {"model": "SiT-T/2", "vae": "tiny", "encoder": "tiny", "image_size": 64, "seed": 0, **sit.config}
    path = str(tmp_path_factory.mktemp("ckpt") / "0000100.pt")
    torch.save({"config": config, "step": 100, "sit": sit.state_dict(), "sit_ema": sit.state_dict(),
                "vae": vae.state_dict(), "vae_ema": vae.state_dict()}, path)
    return path


def tiling_output(root, counts, size=64):
    """tiling.py's layout: OUT/manifest.csv (slide_id, tss, file, split) and the PNG tiles it names."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in counts.items():
        for i in range(n):
            tss, name = ("A", "B")[i % 2], f"tiles/{split}_{i}.png"
            (root / "tiles").mkdir(parents=True, exist_ok=True)
            colour = np.array([200, 120, 180]) * (0.5 + 0.5 * rng.random(3))
            tile = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(tile).save(root / name)
            rows.append(dict(slide_id=f"{tss}-{split}", tss=tss, file=name, split=split))
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["slide_id", "tss", "file", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def argv(ckpt, tiles, out, *extra):
    return ["--ckpt", ckpt, "--tiles", str(tiles), "--out", str(out), "--num-guidance", "8", "--extractors",
            "tiny", "--random-weights", "--random-encoder", "--device", "cpu", "--num-workers", "0",
            "--bootstrap-draws", "3", "--k", "2", *extra]


def test_benchmark_end_to_end_every_row_extractor_and_setting(ckpt, tmp_path):
    tiles = tiling_output(tmp_path / "tiling", {"train": 12, "val_in": 6, "val_out": 6})
    out = tmp_path / "bench"
    assert E.main(argv(ckpt, tiles, out, "--num-sampling-steps", "2,3", "--sampler", "ode,sde", "--jpeg-val", "70",
                       "--sit-weights", "raw")) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    runs = {E.BASELINE} | {E.run_name(s, n) for s in ("ode", "sde") for n in (2, 3)}
    assert {r["row"] for r in rows} == runs
    for run in runs:
        for val in ("val_in", "val_out"):
            metrics = {r["metric"] for r in rows if r["row"] == run and r["val"] == val}
            expected = {"fd", "fd_bootstrap", "precision", "recall"} | ({"fld"} if run != E.BASELINE else set())
            assert metrics == expected, (run, val)
        if run != E.BASELINE:
            assert {r["metric"] for r in rows if r["row"] == run and r["val"] is None} == {"cosine", "cosine_shuffled"}
    for r in rows:
        s = r["settings"]
        assert r["extractor"] == "tiny" and np.isfinite(r["value"]) and s["weights"] == "random(seed=0)"
        assert s["preprocess"]["val"]["jpeg"] == 70 and s["preprocess"]["guidance"]["jpeg"] is None
        assert s["resize"]["guidance"] == "64 px -> 224 px, PIL bicubic (antialiased when shrinking)"
        if r["row"] != E.BASELINE:
            assert (s["sit_weights"], s["vae_weights"], s["cfg_scale"]) == ("raw", "ema", 2.5)
    # one tile per guidance tile + settings.json + the lock sample.py held while it wrote them
    files = os.listdir(out / "generated" / "sde-3")
    assert len(files) == 8 + 2 and {".lock", "settings.json"} <= set(files)
    assert json.loads((out / "generated" / "sde-3" / "settings.json").read_text())["sit_weights"] == "raw"
    assert set(report["fd_vs_steps"]) == {"ode", "sde"} and (out / "fd_vs_steps.png").exists()
    text = (out / "report.md").read_text()
    assert "| guidance vs val |" in text and " / " in text and "Figure 4" in text
    # the paired cosine pairs each generated tile with the guidance tile that conditioned it
    cos = next(r for r in rows if r["metric"] == "cosine")
    assert cos["settings"]["n_pairs"] == 8


def test_a_killed_run_resumes_without_redoing_finished_samples(ckpt, tmp_path, monkeypatch):
    tiles = tiling_output(tmp_path / "tiling", {"train": 10, "val_in": 5, "val_out": 5})
    out = tmp_path / "bench"
    saved, real_save = [], sample.save_png

    def save_then_die(image, path):
        if len(saved) == 3:
            raise KeyboardInterrupt  # the run is killed after 3 images
        real_save(image, path)
        saved.append(path)

    monkeypatch.setattr(sample, "save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        E.main(argv(ckpt, tiles, out, "--num-sampling-steps", "2", "--sample-batch-size", "1"))
    monkeypatch.setattr(sample, "save_png", real_save)
    stamps = {p: os.stat(p).st_mtime_ns for p in saved}
    written = []
    monkeypatch.setattr(sample, "save_png", lambda image, path: (written.append(path), real_save(image, path)))
    assert E.main(argv(ckpt, tiles, out, "--num-sampling-steps", "2", "--sample-batch-size", "1",
                       "--extractors", "tiny,conch-v1")) == 0  # an unavailable extractor: skipped, one line
    skipped = json.loads((out / "report.json").read_text())["skipped"]
    assert [s["extractor"] for s in skipped] == ["conch-v1"] and "\n" not in skipped[0]["error"]
    written = [p for p in written if not p.endswith("_grid.png")]  # sample.py's overview grid is redrawn
    assert len(written) == 5 and not set(written) & set(saved)  # only the missing 5 of 8 images
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
    assert (out / "report.json").exists()


def test_bad_input_is_one_line_and_keeps_finished_work(ckpt, tmp_path, one_line_error):
    no_val_out = tiling_output(tmp_path / "a", {"train": 10, "val_in": 4})
    assert re.search(r"error: .* has no val_out rows: .*--val-sets$", one_line_error(E.main, argv(ckpt, no_val_out,
                                                                                               tmp_path / "out_a")))
    few = tiling_output(tmp_path / "b", {"train": 5, "val_in": 4, "val_out": 4})
    assert "has 5 training tiles, fewer than --num-guidance 8" in one_line_error(E.main, argv(ckpt, few,
                                                                                              tmp_path / "out_b"))
    with pytest.raises(SystemExit) as err:
        E.parse_args(argv(ckpt, few, tmp_path / "out_c", "--extractors", "nope"))
    assert err.value.code == 2


def test_ambiguous_guidance_inputs_are_refused_in_one_line(ckpt, tmp_path, one_line_error):
    """Guidance features that do not fit the guidance tiles, or a manifest with a tile twice, are refused before
    any tile is generated."""
    tiles = tiling_output(tmp_path / "t", {"train": 10, "val_in": 4, "val_out": 4})
    out = tmp_path / "bench"
    (out / "guidance").mkdir(parents=True)
    np.save(out / "guidance" / "cls.npy", np.zeros((5, 48), np.float32))  # 5 rows for 8 guidance tiles
    assert "holds features of another guidance set (not 8 tiles)" in one_line_error(
        E.main, argv(ckpt, tiles, out, "--num-sampling-steps", "2"))
    with open(tiles / "manifest.csv", "a") as f:
        f.write("B-val_in,B,tiles/train_3.png,val_in\n")  # a training tile also listed as val_in
    assert "lines 5 and 20 are the same tile (file tiles/train_3.png)" in one_line_error(
        E.main, argv(ckpt, tiles, tmp_path / "bench2", "--num-sampling-steps", "2"))
    assert not (out / "generated").exists() and not (tmp_path / "bench2" / "generated").exists()


def test_guidance_is_stratified_by_tss():
    rows = [dict(tss="A", path=f"a{i}") for i in range(30)] + [dict(tss="B", path=f"b{i}") for i in range(10)]
    picked = E.stratified(rows, 8, seed=0)
    assert sum(r["tss"] == "A" for r in picked) == 6 and sum(r["tss"] == "B" for r in picked) == 2
    assert picked == E.stratified(rows, 8, seed=0) and len({r["path"] for r in picked}) == 8


def test_shuffled_pairing_never_pairs_a_tile_with_its_own_sample():
    stems = [f"{i:06d}" for i in range(7)]
    real = np.eye(7)  # orthogonal features: the true pairing has cosine 1, any other 0
    fake_stems = [s + "_00" for s in stems]
    assert E.M.paired_cosine(stems, real, fake_stems, real)[0] == 1.0
    for seed in range(20):
        assert E.shuffled_cosine(stems, real, fake_stems, real, seed)[0] == 0.0
