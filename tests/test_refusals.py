"""No silent useless output, and errors that point at their cause: an empty comparison, sets of different tile
sizes, non-finite feature rows, unused --pairs columns, a manifest moved away from its tiles, a .npy that is not
an array, a run folder or a .sha256 where a checkpoint goes, a bad flag in any tool; and the machine's defaults."""
import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import features
import metrics
import sample
import train
from support import cli
from test_evaluate import copies_of_guidance, generated_argv, tiling_output
from test_layout import parsers

ROOT = Path(__file__).resolve().parent.parent
TILES = ROOT / "tests" / "data" / "tiles"
pytestmark = pytest.mark.filterwarnings("ignore:FD from")  # a handful of tiles in 48 dims: expected here


def never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was reached: the input should have been refused before")
    return fail


# -------- No silent useless output --------------------------------------------------------------------------
def report(folder, extractor):
    folder.mkdir()
    row = dict(row="CytoSyn (sde, 250 steps)", extractor=extractor, val="val_out", metric="fd", value=1.0, std=None,
               settings={})
    (folder / "report.json").write_text(json.dumps({"results": [row]}))
    return folder


def test_a_comparison_of_runs_sharing_no_column_is_refused_naming_their_extractors(tmp_path, one_line_error):
    a, b = report(tmp_path / "a", "uni2-h"), report(tmp_path / "b", "tiny")
    line = one_line_error(evaluate.main, ["--compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert line.endswith(f"error: --compare: the runs share no column (metric, extractor and val set), so there is "
                         f"nothing to compare; their extractors: {a}: uni2-h; {b}: tiny. Score them with a common "
                         f"extractor (--extractors)")
    assert not (tmp_path / "cmp").exists()


def tiles(folder, n, size, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / f"t{i}.png")
    return folder


def test_scoring_sets_of_different_tile_sizes_says_how_each_was_resized(tmp_path, capsys):
    real, gen = tiles(tmp_path / "real", 5, 224), tiles(tmp_path / "gen", 5, 64, seed=1)
    common = ["--val", str(real), "--generated", str(gen), "--extractors", "tiny", "--random-weights", "--no-cache",
              "--num-workers", "0", "--out", str(tmp_path / "m")]
    assert metrics.main(common) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: tiny: val tiles (224x224 px): none (224 px tiles)",
                     "note: tiny: generated tiles (64x64 px): 64 px -> 224 px, PIL bicubic (antialiased when "
                     "shrinking)",
                     "note: tiny: the sets' tiles differ in size, each resized on its own: --crop N centre-crops every "
                     "set alike (the paper's 256 -> 224: --crop 224), --resize-to-input resizes each straight to the "
                     "input"]
    assert metrics.main(common + ["--crop", "64"]) == 0  # said how: no note
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    same = tiles(tmp_path / "same", 5, 224, seed=2)
    assert metrics.main(common[:2] + ["--generated", str(same)] + common[4:]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]


def test_evaluate_says_how_each_set_was_resized_and_notes_unused_pairs_columns(tmp_path, capsys):
    tiling = tiling_output(tmp_path / "tiling", {"train": 12, "val_in": 6, "val_out": 6})
    model, pairs = copies_of_guidance(tiling, tmp_path / "model", pad=8)  # 80 px tiles beside 64 px ones
    rows = list(csv.DictReader(open(pairs)))
    with open(pairs, "w", newline="") as f:
        writer = csv.DictWriter(f, ["generated", "guidance", "score", "model"])
        writer.writeheader()
        writer.writerows({**r, "score": 1, "model": "x"} for r in rows)
    capsys.readouterr()
    assert evaluate.main(generated_argv(model, tiling, tmp_path / "out", "--pairs", str(pairs),
                                       "--val-sets", "val_in")) == 0
    out, err = capsys.readouterr()
    assert f"note: --pairs {pairs}: column(s) score, model not used (only generated,guidance are read)" in out
    notes = [line for line in err.splitlines() if line.startswith("note: tiny: ")]
    assert notes[:3] == ["note: tiny: guidance tiles (64x64 px): 64 px -> 224 px, PIL bicubic (antialiased when "
                         "shrinking)", "note: tiny: val_in tiles (64x64 px): 64 px -> 224 px, PIL bicubic (antialiased "
                         "when shrinking)", f"note: tiny: {os.path.relpath(model, tmp_path / 'out')} tiles (80x80 "
                         f"px): 80 px -> 224 px, PIL bicubic (antialiased when shrinking)"]
    assert "--crop N" in notes[3] and "--resize-to-input" in notes[3] and len(notes) == 4


def test_non_finite_feature_rows_are_refused_before_any_model_is_built(tmp_path, ckpt, one_line_error,
                                                                        monkeypatch):
    feats = np.random.default_rng(0).standard_normal((6, 48)).astype(np.float32)
    feats[2, 7], feats[5, 0] = np.nan, -np.inf
    np.save(tmp_path / "f.npy", feats)
    monkeypatch.setattr(sample, "load_pipeline", never("the model"))
    for flag in ("--features", "--cond-mean"):
        line = one_line_error(sample.main, ["--ckpt", ckpt, flag, str(tmp_path / "f.npy"), "--out",
                                            str(tmp_path / "s"), "--device", "cpu"])
        assert line.endswith(f"error: {flag} {tmp_path}/f.npy: 2 of its 6 rows hold NaN or inf (rows 2, 5, counting "
                             f"from 0); remove or recompute them")
    assert not (tmp_path / "s").exists()
    pooled = np.concatenate([feats, feats], 1)  # LazySlide's (N, 1536): CLS, then the patch mean
    np.save(tmp_path / "pooled.npy", np.pad(pooled, ((0, 0), (0, 1536 - 96))))
    line = one_line_error(features.main, ["--pooled", str(tmp_path / "pooled.npy"), "--out", str(tmp_path / "tok")])
    assert line.endswith("2 of its 6 rows hold NaN or inf (rows 2, 5, counting from 0); remove or recompute them")
    assert not (tmp_path / "tok").exists()


# -------- Errors that point at the cause -------------------------------------------------------------------
def moved_manifest(tmp_path):
    """A tiling output's manifest copied elsewhere without its tiles (its paths are relative to its folder)."""
    source = tiling_output(tmp_path / "tiling", {"train": 10, "val_in": 4, "val_out": 4})
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "manifest.csv").write_text((source / "manifest.csv").read_text())
    (moved / "tiling.json").write_text("{}")
    return moved


def test_a_manifest_away_from_its_tiles_is_refused_before_any_model_is_built(tmp_path, ckpt, one_line_error,
                                                                             monkeypatch):
    moved = moved_manifest(tmp_path)
    manifest = moved / "manifest.csv"
    said = (f"error: {manifest}: tile tiles/train_0.png ({moved}/tiles/train_0.png): no such file; paths in "
            f"{manifest} are relative to its folder: keep the manifest beside its tiles, or write absolute paths")
    monkeypatch.setattr(train, "build_models", never("train.build_models"))
    monkeypatch.setattr(features, "load_encoder", never("features.load_encoder"))
    monkeypatch.setattr(evaluate.sample, "load_pipeline", never("the model"))
    line = one_line_error(train.main, ["--tiles", str(moved), "--out", str(tmp_path / "run"), "--encoder", "tiny"])
    assert said in line and line.endswith("(10 of the 10 rows checked are missing)")
    line = one_line_error(features.main, ["--tiles", str(manifest), "--out", str(tmp_path / "tok")])
    assert said in line
    line = one_line_error(evaluate.main, ["--ckpt", ckpt, "--tiles", str(moved), "--out", str(tmp_path / "bench"),
                                          "--num-guidance", "4", "--extractors", "tiny", "--random-weights"])
    assert said in line and line.endswith("(18 of the 18 rows checked are missing)")
    assert not (tmp_path / "bench").exists() and not (tmp_path / "tok").exists()


def test_a_npy_that_is_not_an_array_is_called_what_it_is(tmp_path, ckpt, one_line_error):
    (tmp_path / "notes.npy").write_text("0.1, 0.2, 0.3\n")
    (tmp_path / "image.npy").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    argv = ["--out", str(tmp_path / "s"), "--device", "cpu"]
    line = one_line_error(sample.main, ["--ckpt", ckpt, "--features", str(tmp_path / "notes.npy"), *argv])
    assert line.endswith(f"error: --features {tmp_path}/notes.npy is not a NumPy .npy array file (it holds text); "
                         f"write the array with numpy.save") and "pickled" not in line
    line = one_line_error(sample.main, ["--ckpt", ckpt, "--cond-mean", str(tmp_path / "image.npy"), *argv])
    assert "image.npy is not a NumPy .npy array file (it holds another format, beginning b'\\x89PNG\\r\\n\\x1a\\n')" \
        in line
    line = one_line_error(features.main, ["--pooled", str(tmp_path / "objects.npy"), "--out", str(tmp_path / "t")])
    assert f"--pooled {tmp_path}/objects.npy is a .npy file but not an array of numbers (" in line


def test_a_run_folder_or_a_checksum_given_as_a_checkpoint_says_which_file_to_give(tmp_path, ckpt, one_line_error):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (2, 10, 4):
        (run / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    argv = ["--num-samples", "1", "--out", str(tmp_path / "s"), "--device", "cpu"]
    for given in (run, run / "checkpoints"):
        line = one_line_error(sample.main, ["--ckpt", str(given), *argv])
        assert line.endswith(f"error: {given} is a train.py run folder, not a checkpoint or an export: give one of its "
                             f"checkpoints, e.g. its latest, {run}/checkpoints/0000010.pt")
    copy = tmp_path / "0000100.pt"
    copy.write_bytes(Path(ckpt).read_bytes())
    (tmp_path / "0000100.pt.sha256").write_text("0" * 64 + "  0000100.pt\n")
    line = one_line_error(sample.main, ["--ckpt", f"{copy}.sha256", *argv])
    assert line.endswith(f"error: {copy}.sha256 is the sha256 sum of {copy}, not weights: give that file")


def test_every_tool_refuses_a_bad_flag_through_the_one_error_path():
    for name, parser in parsers().items():  # subcommands' parsers included
        assert isinstance(parser, cli.ArgumentParser), name
        with pytest.raises(cli.InputError, match=r"(unrecognized arguments: --no-such-flag|the following arguments "
                                                 r"are required: .*); `.*--help` lists the flags$"):
            parser.parse_args(["--no-such-flag"])
    proc = subprocess.run([sys.executable, "train.py", "--tiles", "x", "--lr", "-1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "usage:" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["train.py: error: argument --lr: -1 is outside the allowed range "
                                                "(0, 1]"]


# -------- Defaults that fit the machine ------------------------------------------------------------------
def test_data_workers_default_to_what_the_machine_has(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, workers in ((1, 0), (2, 1), (5, 4), (64, 8)):
        monkeypatch.setattr(cli, "available_cpus", lambda cpus=cpus: cpus)
        assert cli.default_workers() == workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 ranks share the node's 64 CPUs
    assert cli.default_workers() == 7
    monkeypatch.undo()
    found = {name: next(a.default for a in p._actions if "--num-workers" in a.option_strings)
             for name, p in parsers().items() if any("--num-workers" in a.option_strings for a in p._actions)}
    assert {"train.py", "features.py", "metrics.py", "evaluate.py"} <= set(found)
    assert set(found.values()) == {cli.default_workers()}
    loader = torch.utils.data.DataLoader(range(4), num_workers=cli.default_workers())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*worker processes in total")  # PyTorch's, when they outnumber the CPUs
        assert sorted(int(x) for x in loader) == [0, 1, 2, 3]


def test_the_weights_tool_runs_from_any_folder_as_the_docs_say(tmp_path):
    doc = (ROOT / "docs" / "weights.md").read_text()
    assert "PYTHONPATH=/path/to/repo python -m\nsupport.weights" in doc
    proc = subprocess.run([sys.executable, "-m", "support.weights", "export", "--help"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--sit-weights" in proc.stdout, proc.stderr[-2000:]
