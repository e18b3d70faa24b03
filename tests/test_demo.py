"""The README's first run, end to end at a reduced step count: demo.py tiles, trains, samples, benchmarks."""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from support.stain import stain_balance

ROOT = Path(__file__).resolve().parent.parent


def test_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out), "--max-steps", "20",
                           "--num-sampling-steps", "5",
                           "--n", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
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

    # training: checkpoints, finite losses, a loss curve and a sample grid
    run = out / "run"
    assert (run / "checkpoints" / "0000020.pt").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert int(rows[-1]["step"]) == 20
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("diffusion", "proj_sit", "proj_vae", "l1", "kl"))
    assert "disc" not in rows[-1] and "lpips" not in rows[-1]  # the demo trains without the GAN and LPIPS
    assert Image.open(run / "loss.png").size[0] > 100
    grid = np.asarray(Image.open(run / "samples" / "0000020.png").convert("RGB"))
    assert grid.shape[0] >= 2 * 64 and grid.std() > 1  # a row of real tiles above the samples, not blank

    # sampling from the last checkpoint, conditioned on the shown tiles
    images = sorted((out / "generated").glob("*.png"))
    assert len(images) == 2 * len(shown) and Image.open(images[0]).size == (64, 64)
    assert (out / "generated_grid.png").exists()  # the grid lies beside the tiles, not among them

    # the benchmark (evaluate.py) on the untrained, middle and last checkpoints, and the verdict on learning
    benches = sorted(p.name for p in (out / "bench").iterdir())
    assert benches == ["0000000", "0000012", "0000020"]
    for step in benches:
        report = json.loads((out / "bench" / step / "report.json").read_text())
        metrics = {(r["row"], r["metric"]) for r in report["results"]}
        assert {("CytoSyn (sde, 5 steps)", m) for m in ("fd", "fld", "precision", "recall", "cosine",
                                                        "cosine_shuffled")} <= metrics
        assert ("guidance vs val", "fd") in metrics
        assert all(math.isfinite(r["value"]) for r in report["results"])
    learning = json.loads((out / "learning.json").read_text())
    assert learning["steps"] == [0, 12, 20] and len(learning["fd"]) == 3
    assert ("FD fell" in proc.stdout) == learning["fd_falls"]
