"""The README's first run, end to end at a reduced step count: demo.py tiles, trains, samples, benchmarks; and in
the order a newcomer types it, a quick check first, then the run: the same result as the run alone."""
import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from support.cli import OutputConflict
from support.stain import stain_balance

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--num-sampling-steps", "5", "--n", "2", "--num-guidance", "16"]
STEPS = 10  # a straight run: checkpoints every 2 steps, its middle one is step 6


def run_demo(out, steps):
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out), "--max-steps", str(steps), *FAST], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "straight"
    return out, run_demo(out, STEPS)


def test_demo_pipeline(straight):
    out, proc = straight
    assert "Where to look" in proc.stdout and "$ python train.py --tiles" in proc.stdout

    # the tiles: 64 px of real H&E from the bundled slide, a val-in split, and the 8 held-out tiles shown
    manifest = list(csv.DictReader(open(out / "tiles" / "manifest.csv")))
    readme = (ROOT / "README.md").read_text()  # the counts the README states (one statement each: test_readme)
    tiles, val_in = (int(re.search(p, readme).group(1)) for p in (r"(\d+) tissue tiles of 64 px",
                                                                    r"\((\d+) held out as val-in\)"))
    assert len(manifest) == tiles and sum(r["split"] == "val_in" for r in manifest) == val_in
    shown = sorted((out / "shown").glob("*.png"))
    assert [p.name[0] for p in shown] == list("01234567") and Image.open(shown[0]).size == (64, 64)
    balance = [stain_balance(np.asarray(Image.open(p).convert("RGB")))[0] for p in shown]  # pinkest first
    assert balance[:4] == sorted(balance[:4]) and max(balance[:4]) < min(balance[4:])

    # training: checkpoints, finite losses logged 5 times (a short run's loss plot has points), a sample grid
    run = out / "run"
    assert (run / "checkpoints" / "0000010.pt").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("diffusion", "proj_sit", "proj_vae", "l1", "kl"))
    assert "disc" not in rows[-1] and "lpips" not in rows[-1]  # the demo trains without the GAN and LPIPS
    assert Image.open(run / "loss.png").size[0] > 100
    grid = np.asarray(Image.open(run / "samples" / "0000010.png").convert("RGB"))
    assert grid.shape[0] >= 2 * 64 and grid.std() > 1  # a row of real tiles above the samples, not blank

    # sampling from the last checkpoint, conditioned on the shown tiles, into a folder named by its step
    images = sorted((out / "generated" / "0000010").glob("*.png"))
    assert len(images) == 2 * len(shown) and Image.open(images[0]).size == (64, 64)
    assert (out / "generated" / "0000010_grid.png").exists()  # the grid lies beside the tiles, not among them

    # the benchmark (evaluate.py) on the untrained, middle and last checkpoints; a short run says what ran
    benches = sorted(p.name for p in (out / "bench").iterdir())
    assert benches == ["0000000", "0000006", "0000010"]
    for step in benches:
        report = json.loads((out / "bench" / step / "report.json").read_text())
        metrics = {(r["row"], r["metric"]) for r in report["results"]}
        assert {("CytoSyn (sde, 5 steps)", m) for m in ("fd", "fld", "precision", "recall", "cosine",
                                                        "cosine_shuffled")} <= metrics
        assert ("guidance vs val", "fd") in metrics
        assert all(math.isfinite(r["value"]) for r in report["results"])
    learning = json.loads((out / "learning.json").read_text())
    assert learning["steps"] == [0, 6, 10] and len(learning["fd"]) == 3 and learning["judged"] is False
    assert "fd_falls" not in learning and "FD fell" not in proc.stdout and "did NOT" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("pipeline ran: tiling, 10 training steps (finite losses)"
                                                           ", sampling from step 10, and the benchmark of steps 0, "
                                                           "6, 10")


def tensors_equal(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_a_quick_check_then_the_run_ends_on_the_straight_runs_result(straight, tmp_path):
    """The order a newcomer types: `--max-steps 2` (a quick check: a checkpoint every step), then the run in the
    same --out. It continues the quick one and must report exactly what the straight run reports: the same middle
    checkpoint (step 6, not a quick-check one), the same weights, samples and numbers."""
    reference, _ = straight
    out = tmp_path / "demo"
    shutil.copytree(reference / "tiles", out / "tiles")  # deterministic (tested above): not tiled again
    quick = run_demo(out, 2)
    assert sorted(p.name for p in (out / "run" / "checkpoints").glob("*.pt")) == ["0000001.pt", "0000002.pt"]
    assert "pipeline ran" in quick.stdout and (out / "generated" / "0000002").is_dir()
    run_demo(out, STEPS)

    assert json.loads((out / "learning.json").read_text()) == json.loads((reference / "learning.json").read_text())
    a, b = (torch.load(d / "run" / "checkpoints" / "0000010.pt", weights_only=True) for d in (reference, out))
    for key in ("sit", "sit_ema", "vae", "vae_ema", "opt_sit", "opt_vae"):
        assert tensors_equal(a[key], b[key]), key
    ours, theirs = (sorted((d / "generated" / "0000010").glob("*.png")) for d in (out, reference))
    assert [p.name for p in ours] == [p.name for p in theirs]
    assert all(np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))) for x, y in zip(ours, theirs))
    assert sorted(p.name for p in (out / "bench").iterdir()) == ["0000000", "0000001", "0000002", "0000006",
                                                                 "0000010"]


def test_a_folder_holding_a_longer_run_is_refused_before_anything_runs(tmp_path, one_line_error):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "0000020.pt").write_bytes(b"")
    line = one_line_error(demo.main, ["--out", str(tmp_path), "--max-steps", "10"])
    assert line.endswith(f": error: {tmp_path}/run holds a run trained to step 20, past --max-steps 10: a shorter "
                         f"run's models were not kept; give a 10-step run another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(OutputConflict):
        demo.main(["--out", str(tmp_path), "--max-steps", "19"])
