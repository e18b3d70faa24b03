"""evaluate.py end to end on a tiny checkpoint and a tiny tiling output (CPU, random extractors)."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
import sample
from extractors import EXTRACTORS, spec_record
from support import tile_sets
from support.outputs import read_csv
from support.tile_features import Preprocess, extract_features

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:FD from")  # a handful of tiles in 48 dims: expected here


@pytest.fixture(scope="module")
def ckpt(ckpt_64px):
    """64 px tiles (conftest's ckpt_64px), not 224 px: the benchmark samples many."""
    return ckpt_64px


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
            "tiny", "--random-weights", "--device", "cpu", "--num-workers", "0",
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
    # one value per setting: what sample.py recorded beside its tiles (settings.json), what report.json says of the
    # run and of each row, and the flag's default when it was not given
    parser = E.build_parser()
    for sampler, steps in (("ode", 2), ("sde", 3)):
        recorded = json.loads((out / "generated" / f"{sampler}-{steps}" / "settings.json").read_text())
        row = next(r for r in rows if r["row"] == E.run_name(sampler, steps))["settings"]
        assert (recorded["sampler"], recorded["num_sampling_steps"]) == (row["sampler"], row["num_sampling_steps"])
        for key in ("cfg_scale", "sit_weights", "vae_weights"):
            assert recorded[key] == row[key] == report["settings"][key], key
        assert [recorded["guidance_low"], recorded["guidance_high"]] == row["guidance_interval"] == \
            [report["settings"]["guidance_low"], report["settings"]["guidance_high"]] == \
            [parser.get_default("guidance_low"), parser.get_default("guidance_high")]
        assert recorded["seed"] == row["seed"] == report["settings"]["seed"] == parser.get_default("seed")
        assert recorded["cfg_scale"] == parser.get_default("cfg_scale")
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
    assert "argument --extractors: 'nope' in 'nope': choose from" in one_line_error(
        E.main, argv(ckpt, few, tmp_path / "out_c", "--extractors", "nope"))


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
    assert picked != E.stratified(rows, 8, seed=1)  # --seed chooses them


def test_each_set_is_scored_with_the_flags_it_was_given(tmp_path):
    """score_set passes --bootstrap-num-generated, --fld-num-generated, --k and --seed on: the recorded draws
    hold the asked size, FLD keeps the asked number of generated rows, and the draws follow the seed (the same
    seed twice: the same rows; another seed: others). A bootstrap is reported once a half holds 2 samples."""
    from types import SimpleNamespace

    rng = np.random.default_rng(5)
    real, gen, train = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) + 1, rng.normal(size=(25, 3)) - 1

    def scored(seed, generated=gen, size=5):
        rows = {}
        args = SimpleNamespace(bootstrap_draws=3, bootstrap_num_generated=size, seed=seed, k=2, fld_num_generated=10,
                               out=tmp_path)
        E.score_set(lambda metric, value, std=None, **settings: rows.setdefault(metric, settings), real, generated,
                    train, args, "cpu")
        return rows, {m: dict(np.load(tmp_path / r["subsets"])) for m, r in rows.items() if "subsets" in r}

    rows, drawn = scored(1)
    assert rows["fd_bootstrap"]["size"] == 5 and (drawn["fd_bootstrap"]["bootstrap"].sum(1) == 5).all()
    assert len(drawn["fld"]["generated"]) == 10 and rows["precision"]["k"] == 2 == rows["recall"]["k"]
    again, other = scored(1)[1], scored(2)[1]
    for metric, key in (("fd_bootstrap", "bootstrap"), ("fld", "generated"), ("fld", "fit_order")):
        assert np.array_equal(drawn[metric][key], again[metric][key])
        assert not np.array_equal(drawn[metric][key], other[metric][key]), (metric, key)
    assert "fd_bootstrap" in scored(1, gen[:4], size=None)[0] and "fd_bootstrap" not in scored(1, gen[:3], None)[0]


def test_shuffled_pairing_never_pairs_a_tile_with_its_own_sample():
    stems = [f"{i:06d}" for i in range(7)]
    real = np.eye(7)  # orthogonal features: the true pairing has cosine 1, any other 0
    fake_stems = [s + "_00" for s in stems]
    assert E.M.paired_cosine(stems, real, fake_stems, real)[0] == 1.0
    for seed in range(20):
        assert E.shuffled_cosine(stems, real, fake_stems, real, seed)[0] == 0.0


# -------- Table 3: an out-of-distribution cohort ----------------------------------------------------------
def cohort(root, slide_sizes, size=64, manifest=True):
    """An OOD cohort: tiles of several slides, with a manifest (slide_id) or as a plain folder."""
    rng, rows = np.random.default_rng(1), []
    (root / "tiles").mkdir(parents=True)
    for j, n in enumerate(slide_sizes):
        for i in range(n):
            tile = np.clip([120, 90, 200] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(tile).save(root / "tiles" / f"s{j}_{i}.png")
            rows.append(dict(slide_id=f"S{j}", file=f"tiles/s{j}_{i}.png", split="train"))
    if manifest:
        with open(root / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["slide_id", "file", "split"])
            writer.writeheader()
            writer.writerows(rows)
    return root if manifest else root / "tiles"


def test_an_ood_cohort_is_split_by_slide_the_same_way_on_every_run():
    tiles = [dict(path=f"t{i:02d}.png", slide=f"S{i % 5}") for i in range(23)]
    guidance, reference, by = tile_sets.split_cohort(tiles, seed=0, cap=100)
    slides = [{t["slide"] for t in half} for half in (guidance, reference)]
    assert by == "slide" and slides[0] and slides[1] and not slides[0] & slides[1]  # no slide in both halves
    assert sorted(t["path"] for t in guidance + reference) == sorted(t["path"] for t in tiles)
    assert (guidance, reference) == tile_sets.split_cohort(tiles[::-1], 0, 100)[:2]  # a rerun, rows in any order
    deals = [tile_sets.split_cohort(tiles, seed, 100)[0] for seed in range(1, 6)]
    assert any(d != guidance for d in deals)  # --seed deals the slides
    capped = tile_sets.split_cohort(tiles, 0, 3)
    assert [len(h) for h in capped[:2]] == [3, 3] and all(t in full for h, full in zip(capped, (guidance, reference))
                                                          for t in h)
    guidance, reference, by = tile_sets.split_cohort([dict(path=f"t{i}", slide=None) for i in range(9)], 0, 100)
    assert by == "tile" and {len(guidance), len(reference)} == {4, 5}


def hand_features(out, folder, prep=None):
    """The cached features evaluate.py scored (a cache miss fails the test)."""
    def no_extractor():
        raise AssertionError(f"{folder} was not scored")
    identity = dict(extractor="tiny", spec=spec_record(EXTRACTORS["tiny"]), weights="random(seed=0)")
    return extract_features(out / folder, EXTRACTORS["tiny"], prep or Preprocess(), no_extractor, identity=identity,
                            cache_dir=out / "features")


def by_hand(out, guidance, references, runs, cohort_name, k=2, draws=3):
    """Every number of one cohort's report rows, from the defining functions called on the cached features."""
    guide_stems, guide = hand_features(out, guidance)
    want = {}
    for val, folder in references.items():
        real = hand_features(out, folder)[1]
        for label, gen, train in [(E.BASELINE, guide, None)] + [(lb, hand_features(out, f)[1], guide)
                                                                 for lb, f in runs.items()]:
            stats = E.M.feature_stats(real)
            want[label, val, "fd"] = E.M.fd(stats, E.M.feature_stats(gen))
            want[label, val, "fd_bootstrap"] = E.M.bootstrap_fd(stats, gen, draws, len(gen) // 2, 0)[:2]
            want[label, val, "precision"], want[label, val, "recall"] = E.M.precision_recall(real, gen, k)
            if train is not None:
                want[label, val, "fld"] = E.M.fld(train, real, gen, E.M.FLD_GEN_SIZE, E.M.FLD_EPOCHS, 0)
                del want[label, val, "fld"]["subsets"]  # recorded in DIR/subsets, not in the row
    for label, folder in runs.items():
        gen_stems, gen = hand_features(out, folder)
        want[label, cohort_name, "cosine"] = E.M.paired_cosine(guide_stems, guide, gen_stems, gen)[:2]
        want[label, cohort_name, "cosine_shuffled"] = E.shuffled_cosine(guide_stems, guide, gen_stems, gen, 0)[:2]
    return want


def test_ood_rows_and_every_number_equal_the_metrics_called_by_hand(ckpt, tmp_path):
    tiles = tiling_output(tmp_path / "tiling", {"train": 10, "val_in": 5, "val_out": 5})
    ibd = cohort(tmp_path / "ibd", [4, 3, 3, 2])
    out = tmp_path / "bench"
    args = argv(ckpt, tiles, out, "--num-sampling-steps", "2", "--ood", f"ibd={ibd}", "--num-ood", "5")
    assert E.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    split = report["ood"]["ibd"]
    assert (split["split_by"], split["seed"], split["n_tiles"], split["n_guidance"], split["n_reference"]) == \
        ("slide", 0, 12, 5, 5)
    assert split["slides"]["guidance"] and not set(split["slides"]["guidance"]) & set(split["slides"]["reference"])
    listed = read_csv(out / "ood" / "ibd" / "split.csv")
    for half in ("guidance", "reference"):
        assert sorted({r["slide_id"] for r in listed if r["half"] == half}) == split["slides"][half]
        assert len(os.listdir(out / "ood" / "ibd" / half)) == 5 + (half == "guidance")  # + cls.npy
    assert len([f for f in os.listdir(out / "ood" / "ibd" / "generated" / "sde-2") if f.endswith(".png")]) == 5
    run = E.run_name("sde", 2)
    want = by_hand(out, "guidance", {"val_in": "val_in", "val_out": "val_out"}, {run: "generated/sde-2"}, None)
    want.update(by_hand(out, "ood/ibd/guidance", {"ibd": "ood/ibd/reference"}, {run: "ood/ibd/generated/sde-2"},
                        "ibd"))
    rows = report["results"]
    assert {(r["row"], r["val"], r["metric"]) for r in rows} == set(want)
    for r in rows:
        expected = want[r["row"], r["val"], r["metric"]]
        if isinstance(expected, dict):  # FLD: its value, and its gap and NLLs beside it
            expected, r = expected["fld"], {**r, "settings": {k: r["settings"][k] for k in expected}}
            assert r["settings"] == pytest.approx(want[r["row"], r["val"], "fld"], rel=1e-9), r["row"]
        got = (r["value"], r["std"]) if isinstance(expected, tuple) else r["value"]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (r["row"], r["val"], r["metric"])
    ood_rows = [r for r in rows if r["val"] == "ibd"]
    assert ({r["settings"]["n_guidance"] for r in ood_rows} == {5}
            and {r["settings"]["cohort"] for r in ood_rows} == {"ibd"})
    text = (out / "report.md").read_text()
    assert ("## Table 3: ibd beside val_out" in text and "| fd (ibd) |" in text
            and "| cosine (ibd guidance half) |" in text)
    assert E.main(args) == 0 and json.loads((out / "report.json").read_text())["ood"] == report["ood"]  # a rerun


def test_a_killed_ood_run_resumes_without_redoing_finished_samples(ckpt, tmp_path, monkeypatch):
    tiles = tiling_output(tmp_path / "tiling", {"train": 8, "val_in": 4, "val_out": 4})
    ibd = cohort(tmp_path / "ibd", [3, 3, 3, 3], manifest=False)  # a plain folder: split by tile
    out = tmp_path / "bench"
    args = argv(ckpt, tiles, out, "--num-sampling-steps", "2", "--sample-batch-size", "1", "--ood", f"ibd={ibd}")
    saved, real_save = [], sample.save_png

    def save_then_die(image, path):
        if len(saved) == 3:
            raise KeyboardInterrupt  # killed after 3 of the cohort's 6 images
        real_save(image, path)
        saved.append(path) if "/ood/" in path else None

    monkeypatch.setattr(sample, "save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        E.main(args)
    monkeypatch.setattr(sample, "save_png", real_save)
    stamps = {p: os.stat(p).st_mtime_ns for p in saved}
    written = []
    monkeypatch.setattr(sample, "save_png", lambda image, path: (written.append(path), real_save(image, path)))
    assert E.main(args) == 0
    written = [p for p in written if not p.endswith("_grid.png")]
    assert len(written) == 3 and all("/ood/ibd/generated/" in p for p in written) and not set(written) & set(saved)
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((out / "report.json").read_text())["ood"]["ibd"]["split_by"] == "tile"


# -------- Table 4: another model's tiles ------------------------------------------------------------------
def copies_of_guidance(tiles, model, pad=0):
    """A "model" whose tiles are training tiles themselves (with a border of `pad` px), and its --pairs CSV."""
    model.mkdir()
    rows = []
    for i, path in enumerate(sorted((tiles / "tiles").glob("train_*.png"))[:8]):
        tile = np.asarray(Image.open(path))
        big = np.pad(tile, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        Image.fromarray(big).save(model / f"gen_{i}.png")
        rows.append(dict(generated=f"gen_{i}.png", guidance=f"tiles/{path.name}"))
    rows.append(rows[0])  # an identical repeated row: accepted, counted once
    with open(model.parent / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["generated", "guidance"])
        writer.writeheader()
        writer.writerows(rows)
    return model, model.parent / "pairs.csv"


def generated_argv(model, tiles, out, *extra):
    return ["--generated", str(model), "--tiles", str(tiles), "--out", str(out), "--extractors", "tiny",
            "--random-weights", "--device", "cpu", "--num-workers", "0", "--bootstrap-draws", "3", "--k", "2", *extra]


def test_a_model_that_returns_its_guidance_tiles_scores_cosine_1_and_the_baseline_fd(tmp_path):
    tiles = tiling_output(tmp_path / "tiling", {"train": 12, "val_in": 6, "val_out": 6})
    model, pairs = copies_of_guidance(tiles, tmp_path / "model")
    out = tmp_path / "bench"
    assert E.main(generated_argv(model, tiles, out, "--pairs", str(pairs))) == 0
    report = json.loads((out / "report.json").read_text())
    rows, label = report["results"], "model (--generated)"
    assert (report["mode"] == "generated" and report["guidance"]["n"] == 8
            and "--pairs" in report["guidance"]["chosen_by"])
    assert report["pairing"]["n_pairs"] == 8 and report["pairing"]["repeated_rows"] == 1
    assert not (out / "generated").exists()  # nothing sampled
    value = {(r["row"], r["val"], r["metric"]): r["value"] for r in rows}
    assert value[label, None, "cosine"] == pytest.approx(1.0, abs=1e-6)
    assert value[label, None, "cosine_shuffled"] < 0.999
    for val in ("val_in", "val_out"):
        for metric in ("fd", "precision", "recall"):
            assert value[label, val, metric] == pytest.approx(value[E.BASELINE, val, metric], rel=1e-6), (val, metric)
    run = next(r for r in rows if r["row"] == label)
    assert run["settings"]["sampler"] is None and run["settings"]["generated"] == str(model)
    assert "Paired cosine: --pairs" in (out / "report.md").read_text()


def test_a_bigger_model_tile_is_centre_cropped_as_the_report_states(tmp_path):
    tiles = tiling_output(tmp_path / "tiling", {"train": 12, "val_in": 6, "val_out": 6})
    model, pairs = copies_of_guidance(tiles, tmp_path / "model", pad=8)  # 80 px tiles around the 64 px ones
    cropped, resized = tmp_path / "cropped", tmp_path / "resized"
    assert E.main(generated_argv(model, tiles, cropped, "--pairs", str(pairs), "--crop", "64")) == 0
    assert E.main(generated_argv(model, tiles, resized, "--num-guidance", "8")) == 0  # no --pairs, no --crop
    rows = json.loads((cropped / "report.json").read_text())["results"]
    cos = next(r for r in rows if r["metric"] == "cosine")
    assert cos["value"] == pytest.approx(1.0, abs=1e-6) and cos["settings"]["preprocess"]["generated"]["crop"] == 64
    assert "--crop 64: every tile centre-cropped to 64 px" in (cropped / "report.md").read_text()
    text = (resized / "report.md").read_text()
    assert ("generated 80x80 px; no --crop: each set is resized" in text
            and "| model (--generated) | no pairing |" in text)
    report = json.loads((resized / "report.json").read_text())
    assert report["pairing"] is None and not any(r["metric"] == "cosine" for r in report["results"])
    assert report["tile_sizes"]["generated"] == [80, 80]


def test_precision_and_recall_keep_their_direction_in_every_report_row(tmp_path, monkeypatch):
    """The generated set covers one of the real set's two clusters: precision 1, recall 1/2 (k = 2)."""
    tiles = tiling_output(tmp_path / "tiling", {"train": 4, "val_in": 10, "val_out": 10})
    model = tmp_path / "model"
    model.mkdir()
    for i in range(4):
        Image.open(tiles / "tiles" / f"train_{i}.png").save(model / f"g{i}.png")
    real = np.array([[x] for x in (0, 1, 2, 3, 4, 100, 101, 102, 103, 104)], np.float32)  # two clusters
    part = np.array([[0.5], [1.5], [2.5], [3.5]], np.float32)  # inside the first one only

    def known_features(folder, **_):
        stems = [os.path.splitext(os.path.basename(p))[0] for p in E.list_images(folder)]
        return stems, real if os.path.basename(folder) in E.VAL_SETS else part

    monkeypatch.setattr(E, "extract_features", known_features)
    out = tmp_path / "bench"
    assert E.main(generated_argv(model, tiles, out, "--num-guidance", "4")) == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    pr = {(r["row"], r["val"], r["metric"]): r["value"] for r in rows if r["metric"] in ("precision", "recall")}
    assert len(pr) == 8  # the baseline and the model, against val-in and val-out
    for (label, val, metric), value in pr.items():
        assert value == (1.0 if metric == "precision" else 0.5), (label, val, metric)


# -------- Runs side by side ---------------------------------------------------------------------------------
def test_compare_marks_a_column_whose_runs_differ_in_steps(ckpt, tmp_path):
    tiles = tiling_output(tmp_path / "tiling", {"train": 10, "val_in": 5, "val_out": 5})
    two, three = tmp_path / "two", tmp_path / "three"
    assert E.main(argv(ckpt, tiles, two, "--num-sampling-steps", "2")) == 0
    assert E.main(argv(ckpt, tiles, three, "--num-sampling-steps", "3")) == 0
    shutil.copytree(two, tmp_path / "two_again", symlinks=True)
    assert E.main(["--compare", str(two), str(three), "--out", str(tmp_path / "steps")]) == 0
    table = json.loads((tmp_path / "steps" / "compare.json").read_text())
    names = {c["name"] for c in table["columns"]}
    assert {"fd tiny val_out", "fld tiny val_in", "precision tiny val_in", "cosine tiny tiles"} <= names
    for column in table["columns"]:  # every column holds a run's rows: each is marked, for the steps alone
        assert set(column["differs"]) == {"num_sampling_steps"}, column
        assert column["differs"]["num_sampling_steps"] == {"2": ["r2"], "3": ["r4"]}
    report = json.loads((three / "report.json").read_text())["results"]
    fd = next(r["value"] for r in report
              if (r["row"], r["metric"], r["val"]) == (E.run_name("sde", 3), "fd", "val_out"))
    row = next(r for r in table["rows"] if r["id"] == "r4")
    assert (row["run"], row["row"]) == (str(three), E.run_name("sde", 3))
    assert row["values"]["fd tiny val_out"]["value"] == fd and len(table["rows"]) == 4  # baseline + run, each
    text = (tmp_path / "steps" / "compare.md").read_text()
    assert "| fd tiny val_out *1 |" in text and "*2" not in text and "\n*1 num_sampling_steps: 2 (r2), 3 (r4)\n" in text
    assert E.main(["--compare", str(two), str(tmp_path / "two_again"), "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "compare.json").read_text())
    text = (tmp_path / "same" / "compare.md").read_text()
    assert not any(c["differs"] for c in same["columns"]) and " *1" not in text and not re.search(r"^\*\d", text, re.M)
    again = json.loads((tmp_path / "two_again" / "report.json").read_text())
    for r in again["results"]:  # as if measured with another resize kernel for the generated tiles
        r["settings"]["preprocess"]["generated"]["kernel"] = "lanczos"
    (tmp_path / "two_again" / "report.json").write_text(json.dumps(again))
    assert E.main(["--compare", str(two), str(tmp_path / "two_again"), "--out", str(tmp_path / "kernel")]) == 0
    kernel = json.loads((tmp_path / "kernel" / "compare.json").read_text())
    assert all(set(c["differs"]) == {"preprocess.generated.kernel"} for c in kernel["columns"])


# -------- Bad input: one line, nothing written ---------------------------------------------------------------
def test_every_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, one_line_error, capsys):
    tiles = tiling_output(tmp_path / "tiling", {"train": 10, "val_in": 4, "val_out": 4})
    out = tmp_path / "out"
    three = cohort(tmp_path / "three", [3], manifest=False)
    assert "has 3 tile(s); a guidance half and a reference half need 4" in one_line_error(
        E.main, argv(ckpt, tiles, out, "--ood", f"few={three}"))
    mixed = cohort(tmp_path / "mixed", [3, 3], manifest=False)
    Image.new("RGB", (80, 80), (200, 100, 150)).save(mixed / "big.png")
    assert "holds tiles of 2 sizes" in one_line_error(E.main, argv(ckpt, tiles, out, "--ood", f"mixed={mixed}"))
    assert tile_sets.plan_ood(E.parse_args(argv(ckpt, tiles, out, "--ood", f"mixed={mixed}", "--crop", "64")))["mixed"]
    assert "--ood 'sparc': give NAME=PATH" in one_line_error(E.main, argv(ckpt, tiles, out, "--ood", "sparc"))
    model, pairs = copies_of_guidance(tiles, tmp_path / "model")
    assert "--ckpt and --generated together: pass one of" in one_line_error(
        E.main, generated_argv(model, tiles, out, "--ckpt", ckpt))
    lines = pairs.read_text().splitlines()
    for bad, error in [("gen_9.png,tiles/train_0.png", "generated tile 'gen_9.png' is not in"),
                       ("gen_0.png,tiles/nope.png", "guidance tile 'tiles/nope.png' is not in"),
                       ("gen_0.png,tiles/val_in_0.png", "guidance tile 'tiles/val_in_0.png' is not a training row of"),
                       ("gen_0.png,tiles/train_9.png", "generated tile 'gen_0.png' is paired with both "
                                                       "'tiles/train_0.png' and 'tiles/train_9.png': ambiguous")]:
        pairs.write_text("\n".join(lines + [bad]) + "\n")
        assert error in one_line_error(E.main, generated_argv(model, tiles, out, "--pairs", str(pairs))), bad
    assert "--compare " + str(tmp_path / "model") + ": no report.json" in one_line_error(
        E.main, ["--compare", str(model), "--out", str(out)])
    assert not out.exists()
