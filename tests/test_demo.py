"""The README's first run, end to end at a reduced step count: demo.py tiles, trains, samples, scores."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out), "--max-steps", "20", "--sample-steps", "5",
                           "--n", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Where to look" in proc.stdout and "$ python train.py --data" in proc.stdout

    # the tiles: real H&E from the bundled slide, with a held-out val-in split copied aside
    manifest = list(csv.DictReader(open(out / "tiles" / "manifest.csv")))
    val = sorted((out / "val").glob("*.png"))
    assert len(manifest) > 30 and len(val) == sum(r["split"] == "val_in" for r in manifest) > 0

    # training: checkpoints, finite losses, a loss curve and a sample grid
    run = out / "run"
    assert (run / "checkpoints" / "0000020.pt").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert int(rows[-1]["step"]) == 20
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("diffusion", "proj_sit", "l1", "disc"))
    assert Image.open(run / "loss.png").size[0] > 100
    grid = np.asarray(Image.open(run / "samples" / "0000020.png").convert("RGB"))
    assert grid.shape[0] >= 2 * 64 and grid.std() > 1  # a row of real tiles above the samples, not blank

    # sampling from the last checkpoint, conditioned on every held-out tile
    images = sorted((out / "generated").glob("*.png"))
    assert len(images) == 2 * len(val) and Image.open(images[0]).size == (64, 64)
    assert (out / "generated_grid.png").exists()  # the grid lies beside the tiles, not among them

    # metrics of the generated tiles against the held-out ones (random extractor: a pipeline check)
    results = {r["metric"]: r["value"] for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert set(results) >= {"fd", "precision", "recall", "cosine"}, results
    assert math.isfinite(results["fd"]) and results["fd"] >= 0
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
