"""evaluate.py --memorization: every generated tile's nearest training tiles, against real held-out tiles.

What must hold: the search is exact (scipy's distances, whatever the chunking); d1, d2 and Carlini et al.'s ratio
of every tile are those numpy computes from the definitions; planted copies of training tiles (exact, shifted by
a pixel, JPEG'd) are flagged and nothing else; a set without copies flags none at the recorded thresholds; the
val-in and val-out rows are computed on those sets (they differ here: val-out is another "slide", restained).
"""
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.spatial
import scipy.stats
import torch
from PIL import Image

import evaluate as E
import extractors
import fld
import metrics as M
from conftest import perturbed
from features import load_encoder
from sit import build_sit
from support.outputs import read_csv
from support.slides import open_slide, read_tile_at, resolve_mpp, slide_geometry
from support.tiles import RESIZE_KERNELS
from vae import build_vae

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:FD from")
SLIDE = Path(__file__).resolve().parent / "data" / "cmu_small_region.svs"  # 2220 x 2967 px at 0.499 µm/px
SIZE, POOL = 64, 16  # 64 px tiles; the stand-in extractor's 4 x 4 colour thumbnail (48 values)
THUMBNAIL = extractors.ExtractorSpec(None, "4 x 4 colour thumbnail (test)", input_size=SIZE, dim=48)


class Thumbnail:
    """A stand-in for a pathology extractor that, like one, barely moves when a tile is shifted by a pixel or
    JPEG'd (a random-weight network does not: its features of a shifted tile are as far as another tile's)."""

    def embed(self, x, bf16=False):
        return torch.nn.functional.avg_pool2d(x.float(), POOL).flatten(1)  # (B, 3 * 4 * 4)


def thumbnails(files):
    """The same features, in numpy, from the files: (N, 48)."""
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float64) / 255 for f in files])
    return tiles.reshape(len(files), 4, POOL, 4, POOL, 3).mean((2, 4)).reshape(len(files), -1)


def jpeg(tile, quality=90):
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiling output of 64 px tissue tiles of the bundled slide (150 train, 30 val-in, 40 val-out: other tiles,
    their red and green lowered as another lab's stain would), a generated folder holding 12 planted copies of training
    tiles (4 exact, 4 shifted by one pixel, 4 JPEG q90) and 30 real tiles used nowhere else, and a folder of
    those 30 alone."""
    root = tmp_path_factory.mktemp("planted")
    slide = open_slide(SLIDE)
    geo = slide_geometry(slide, resolve_mpp(slide)[0], 0.5, SIZE)
    read = lambda x, y: read_tile_at(slide, geo, x, y, 0, RESIZE_KERNELS["lanczos"])  # noqa: E731
    grid = [(x, y) for y in range(100, 2900, SIZE) for x in range(50, 2150, SIZE)]
    tissue = [p for p in grid if read(*p).mean() < 200]  # glass tiles would all be copies of each other
    np.random.default_rng(0).shuffle(tissue)
    splits = {"train": tissue[:150], "val_in": tissue[150:180], "val_out": tissue[180:220]}
    rows = []
    (root / "tiling" / "tiles").mkdir(parents=True)
    for split, places in splits.items():
        for x, y in places:
            tile = read(x, y)
            if split == "val_out":
                tile = (tile * np.array([0.7, 0.9, 1.0])).astype(np.uint8)
            name = f"tiles/{split}_{x}_{y}.png"
            Image.fromarray(tile).save(root / "tiling" / name)
            rows.append(f"{split}-slide,{'AB'[x % 2]},{name},{split}\n")
    (root / "tiling" / "manifest.csv").write_text("slide_id,tss,file,split\n" + "".join(rows))
    copies = {f"copy_exact_{i}": read(*splits["train"][i]) for i in range(4)}
    copies |= {f"copy_shifted_{i}": read(splits["train"][i][0] + 1, splits["train"][i][1] + 1) for i in range(4, 8)}
    copies |= {f"copy_jpeg_{i}": jpeg(read(*splits["train"][i])) for i in range(8, 12)}
    for folder in ("generated", "novel"):
        (root / folder).mkdir()
        for x, y in tissue[220:250]:
            Image.fromarray(read(x, y)).save(root / folder / f"novel_{x}_{y}.png")
    for name, tile in copies.items():
        Image.fromarray(tile).save(root / "generated" / f"{name}.png")
    return root


def run_audit(root, generated, out, monkeypatch, *extra):
    build = E.build_extractor
    monkeypatch.setitem(extractors.EXTRACTORS, "thumbnail", THUMBNAIL)
    monkeypatch.setattr(E, "build_extractor", lambda name, *a: Thumbnail() if name == "thumbnail" else build(name, *a))
    assert E.main(["--generated", str(root / generated), "--tiles", str(root / "tiling"), "--out", str(out),
                   "--num-guidance", "8", "--extractors", "thumbnail", "--memorization", "--device", "cpu",
                   "--num-workers", "0", "--bootstrap-draws", "0", "--k", "2", *extra]) == 0
    return json.loads((out / "memorization" / "thumbnail" / "audit.json").read_text())


def test_planted_copies_and_only_they_are_flagged(planted, tmp_path, monkeypatch):
    out = tmp_path / "audit"
    record = run_audit(planted, "generated", out, monkeypatch)
    tiles = read_csv(out / "memorization" / "thumbnail" / "tiles.csv")
    assert {s: sum(t["set"] == s for t in tiles) for s in {t["set"] for t in tiles}} == {
        "val_in": 30, "val_out": 40, "generated (--generated)": 42}  # every tile of every set, once
    generated = [t for t in tiles if t["set"] == "generated (--generated)"]
    flagged = sorted(t["tile"].split("/")[-1] for t in generated if t["flagged"] == "True")
    planted_names = [f"copy_exact_{i}.png" for i in range(4)] + [f"copy_shifted_{i}.png" for i in range(4, 8)]
    assert flagged == sorted(planted_names + [f"copy_jpeg_{i}.png" for i in range(8, 12)])
    for t in generated:
        if t["tile"].endswith(("copy_exact_0.png", "copy_exact_3.png")):
            assert float(t["d1"]) == 0 and float(t["ratio"]) == 0  # an exact copy is at 0, not at rounding error
    # every tile's numbers from the definitions, with scipy: the training set is the 150 train rows
    train_files = sorted(str(p.resolve()) for p in (out / "train").iterdir())
    assert len(train_files) == 150 and record["n_train"] == 150
    assert {t["nearest_train"] for t in tiles} <= set(train_files)
    train = thumbnails(train_files)
    dists = np.sort(scipy.spatial.distance.cdist(thumbnails([t["tile"] for t in tiles]), train), axis=1)
    # (float32 features against these float64 ones: a few 1e-7 apart)
    np.testing.assert_allclose([float(t["d1"]) for t in tiles], dists[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(t["d2"]) for t in tiles], dists[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(t["ratio"]) for t in tiles], dists[:, 0] / (0.5 * dists[:, :50].mean(1)),
                               rtol=1e-5, atol=1e-6)
    generated_row, = [r for r in json.loads((out / "report.json").read_text())["results"] if r["metric"] == "memorized"]
    assert generated_row["value"] == pytest.approx(12 / 42) and generated_row["val"] == "train"
    assert (generated_row["row"], generated_row["extractor"]) == ("generated (--generated)", "thumbnail")
    settings = generated_row["settings"]
    assert (settings["n"], settings["n_flagged"], settings["n_train"], settings["heldout"]) == (42, 12, 150, "val_out")
    assert settings["d1_threshold"] == record["d1_threshold"]
    assert [r["set"] for r in settings["heldout_rows"]] == ["val_in", "val_out"]
    assert settings["heldout_rows"] == [s for s in record["sets"] if s["set"] in ("val_in", "val_out")]
    d1s, ratios = (np.array([float(t[k]) for t in generated]) for k in ("d1", "ratio"))
    assert settings["near"] == pytest.approx((d1s < record["d1_threshold"]).mean())
    assert settings["low_ratio"] == pytest.approx((ratios < 1 / 3).mean()) and settings["low_ratio"] > 0
    assert (out / "memorization" / "thumbnail" / "nearest_pairs.png").is_file()
    plotted = json.loads((out / "memorization" / "thumbnail" / "histogram.json").read_text())
    assert sum(plotted["panels"]["d1"]["counts"]["val_out"]) == 40
    assert "| generated (--generated) | 42 |" in (out / "memorization.md").read_text()


def test_no_copies_no_flags_and_the_baselines_are_the_sets_they_name(planted, tmp_path, monkeypatch):
    out = tmp_path / "novel"
    record = run_audit(planted, "novel", out, monkeypatch)
    rows = {s["set"]: s for s in record["sets"]}
    assert rows["novel (--generated)"]["flagged"] == 0 and rows["novel (--generated)"]["n"] == 30
    train = thumbnails(sorted(str(p.resolve()) for p in (out / "train").iterdir()))
    folders = {"val_in": "val_in_", "val_out": "val_out_", "novel (--generated)": "novel_"}
    found = {}
    for name, prefix in folders.items():
        files = sorted(p for p in (planted / ("novel" if prefix == "novel_" else "tiling/tiles")).iterdir()
                       if p.name.startswith(prefix))
        dists = np.sort(scipy.spatial.distance.cdist(thumbnails(files), train), axis=1)
        found[name] = dists[:, 0], dists[:, 0] / (0.5 * dists[:, :50].mean(1))
        assert rows[name]["n"] == len(files)
        assert rows[name]["d1_median"] == pytest.approx(np.median(found[name][0]), rel=1e-5)
        assert rows[name]["ratio_median"] == pytest.approx(np.median(found[name][1]), rel=1e-5)
        assert rows[name]["d1_p01"] == pytest.approx(np.percentile(found[name][0], 1), rel=1e-5)
    # the two held-out sets differ in size and in their d1 (another "slide" is further), so a swap shows above
    assert abs(np.median(found["val_out"][0]) - np.median(found["val_in"][0])) > 0.02
    assert record["heldout"] == "val_out"
    assert record["d1_threshold"] == pytest.approx(np.percentile(found["val_out"][0], 1), rel=1e-5)
    d1, ratio = found["novel (--generated)"]
    assert not ((d1 < record["d1_threshold"]) & (ratio < record["ratio_threshold"])).any()
    assert record["ratio_threshold"] == pytest.approx(1 / 3)
    for name, (d1s, ratios) in found.items():  # the shares of each set, against the thresholds recorded
        assert rows[name]["near"] == pytest.approx((d1s < record["d1_threshold"]).mean())
        assert rows[name]["low_ratio"] == pytest.approx((ratios < 1 / 3).mean())
    assert 0 < rows["val_out"]["near"] < rows["novel (--generated)"]["near"] < rows["val_in"]["near"] < 1
    assert rows["val_in"]["copying_test"] is None is rows["val_out"]["copying_test"]  # only generated sets
    test = rows["novel (--generated)"]["copying_test"]
    u = sum((a < b) + 0.5 * (a == b) for a in d1 for b in found["val_out"][0])  # pairs where generated is nearer
    assert test["nearer_share"] == pytest.approx(u / (30 * 40), rel=1e-6)


@pytest.mark.parametrize("val_sets", [["val_in"], ["val_out", "val_in"]])
def test_the_threshold_comes_from_val_out_or_else_val_in(planted, tmp_path, monkeypatch, val_sets):
    """The held-out tiles are val-out's when the run has them, in whatever order --val-sets names them, and
    val-in's otherwise; the threshold is their d1's 1st percentile."""
    out = tmp_path / "audit"
    record = run_audit(planted, "novel", out, monkeypatch, "--val-sets", ",".join(val_sets))
    heldout = "val_out" if "val_out" in val_sets else "val_in"
    assert record["heldout"] == heldout and [s["set"] for s in record["sets"]] == [*val_sets, "novel (--generated)"]
    train = thumbnails(sorted(str(p.resolve()) for p in (out / "train").iterdir()))
    files = sorted(p for p in (planted / "tiling" / "tiles").iterdir() if p.name.startswith(heldout + "_"))
    d1 = scipy.spatial.distance.cdist(thumbnails(files), train).min(1)
    assert record["d1_threshold"] == pytest.approx(np.percentile(d1, 1), rel=1e-5)


def test_the_report_holds_every_audited_extractor_and_links_its_pictures(tmp_path):
    """memorization.md: a table per extractor that has an audit.json (one without is passed over, not the end),
    each set's row with its numbers, and a link to each of its pictures."""
    from support.memorization import write_report

    sets = [dict(set="val_out", n=40, d1_median=0.5, d1_p01=0.125, ratio_median=0.75, near=0.025, low_ratio=0.0,
                 flagged=0.0, n_flagged=0, copying_test=None),
            dict(set="run (--generated)", n=42, d1_median=0.25, d1_p01=0.0, ratio_median=0.5, near=0.25,
                 low_ratio=0.125, flagged=0.25, n_flagged=10, copying_test=dict(nearer_share=0.875, p_value=0.001))]
    pictures_of = {"first": ["nearest_pairs.png"], "second": ["nearest_pairs_a.png", "nearest_pairs_b.png"]}
    for name, pictures in pictures_of.items():
        folder = tmp_path / "memorization" / name
        folder.mkdir(parents=True)
        (folder / "audit.json").write_text(json.dumps(dict(n_train=150, d1_threshold=0.125, heldout="val_out",
                                                            heldout_percentile=1, ratio_threshold=1 / 3, sets=sets)))
        for picture in pictures:
            (folder / picture).write_bytes(b"")
    write_report(tmp_path, ["missing", "first", "second"])
    text = (tmp_path / "memorization.md").read_text()
    assert "## missing" not in text and text.count("## first: 150 training tiles") == 1
    assert text.count("## second: 150 training tiles") == 1
    assert text.count("| run (--generated) | 42 | 0.25 | 0 | 0.500 | 0.250 | 0.125 | 0.250 (10) | 0.875 (0.001) |") == 2
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert links == ["memorization/first/histogram.png", "memorization/first/nearest_pairs.png",
                     "memorization/second/histogram.png", "memorization/second/nearest_pairs_a.png",
                     "memorization/second/nearest_pairs_b.png"]


def test_the_search_is_exact_whatever_the_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16)).astype(np.float32) * 100 + 1000  # far from 0: float32 |q|^2 rounding
    queries = np.concatenate([train[:5], train[5:10] + 1e-3, rng.normal(size=(20, 16)).astype(np.float32) + 1000])
    monkeypatch.setattr(fld, "DIST_BUDGET", 4 * 300 * 7)  # 7 queries per chunk
    dists, index = M.nearest_neighbours(queries, train, 5)
    reference = scipy.spatial.distance.cdist(queries.astype(np.float64), train.astype(np.float64))
    np.testing.assert_allclose(dists, np.sort(reference, axis=1)[:, :5], rtol=1e-12, atol=1e-12)
    assert (index[:10, 0] == np.arange(10)).all() and (dists[:5, 0] == 0).all()


def test_the_copying_test_is_scipys_mann_whitney():
    generated, heldout = np.array([0.1, 0.2, 0.2, 0.9]), np.array([0.2, 0.5, 0.6])
    out = M.copying_test(generated, heldout)
    assert out["nearer_share"] == pytest.approx((3 + 2.5 + 2.5 + 0) / 12)  # 0.1: 3; 0.2: 2 and a tie; 0.9: 0
    assert out["p_value"] == pytest.approx(scipy.stats.mannwhitneyu(generated, heldout, alternative="less").pvalue)


def test_a_sampled_run_is_audited_in_the_benchmarks_extractor_space(planted, tmp_path):
    """--ckpt: the benchmark's own samples, audited in the registry's "tiny" space against the guidance tiles and
    more training rows up to --num-train; a random model's samples copy nothing."""
    torch.manual_seed(0)
    encoder = load_encoder("tiny", pretrained=False)
    sit = perturbed(build_sit("SiT-T/2", input_size=8, cond_dim=encoder.embed_dim, z_dim=encoder.embed_dim), 1)
    vae = perturbed(build_vae("tiny"), 2)
    config = {"model": "SiT-T/2", "vae": "tiny", "encoder": "tiny", "image_size": 64, "seed": 0, **sit.config}
    torch.save({"config": config, "step": 1, "sit": sit.state_dict(), "sit_ema": sit.state_dict(),
                "vae": vae.state_dict(), "vae_ema": vae.state_dict()}, tmp_path / "c.pt")
    out = tmp_path / "bench"
    assert E.main(["--ckpt", str(tmp_path / "c.pt"), "--tiles", str(planted / "tiling"), "--out", str(out),
                   "--num-guidance", "8", "--extractors", "tiny", "--random-weights", "--memorization",
                   "--num-train", "20", "--num-sampling-steps", "2", "--device", "cpu", "--num-workers", "0",
                   "--bootstrap-draws", "0", "--k", "2"]) == 0
    record = json.loads((out / "memorization" / "tiny" / "audit.json").read_text())
    assert record["n_train"] == 20  # the 8 guidance tiles and 12 more, --num-train in all
    guidance = {p.resolve() for p in (out / "guidance").glob("*.png")}
    assert guidance <= {p.resolve() for p in (out / "train").iterdir()}
    sampled = {s["set"]: s for s in record["sets"]}[E.run_name("sde", 2)]
    assert sampled["n"] == 8 and sampled["n_flagged"] == 0
    assert (out / "memorization" / "tiny" / "nearest_pairs.png").is_file()
