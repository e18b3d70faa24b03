"""Tests for tiling.py: whole-slide images to 224 px tiles at 0.5 µm/px (CytoSyn §3.2, §4.3).

Real data: tests/data/cmu_small_region.svs (OpenSlide's CMU-1-Small-Region, CC0, Aperio SVS,
2220 x 2967 px at 0.499 µm/px, one level). Synthetic data: a two-level pyramidal TIFF written
here with synthetic_slide.write_pyramid_tiff -- Pillow cannot write tiled TIFFs and tifffile is not a
dependency, so the TIFF bytes are laid out by hand; the test checks that OpenSlide really reads it
as a generic-tiff pyramid with its MPP before trusting it. Everything runs on the CPU in seconds.
"""
import csv
import io
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

import synthetic_slide
import tiling
from support import slides

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
CMU = DATA / "cmu_small_region.svs"

# The synthetic slide: level 0 at 0.25 µm/px, so one 224 tile at 0.5 µm/px is a 448 px cell.
MPP0 = 0.25
CELL = 448
CELLS_X, CELLS_Y = 8, 6
TISSUE_CELLS = (2, 2, 6, 4)   # x0, y0, x1, y1 in cells: even, so the 1.0 µm/px grid also aligns
PERIOD_UM = 16.0              # vertical stripes of this period in µm


def run(slides, out, *args):
    return tiling.main(["--slides", str(slides), "--out", str(out), *[str(a) for a in args]])


def read_manifest(out):
    with open(Path(out) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return np.asarray(Image.open(path))


def slide_folder(tmp_path, names, target=CMU):
    """A folder of links to one slide under several names (each link is a distinct slide)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for n in names:
        os.symlink(target, folder / n)
    return folder


def stripes_image():
    """White glass with one tissue rectangle of purple/pink vertical stripes, PERIOD_UM apart."""
    image = np.full((CELLS_Y * CELL, CELLS_X * CELL, 3), 255, np.uint8)
    x = np.arange(CELLS_X * CELL) * MPP0                      # µm
    purple = (x % PERIOD_UM) < PERIOD_UM / 2
    row = np.where(purple[:, None], [120, 50, 160], [230, 140, 190]).astype(np.uint8)
    x0, y0, x1, y1 = (c * CELL for c in TISSUE_CELLS)
    image[y0:y1, x0:x1] = row[None, x0:x1]
    return image


def period_px(tile):
    """Dominant horizontal period of a tile in pixels, from the FFT of its column means."""
    signal = tile[..., 1].astype(float).mean(0)
    spectrum = np.abs(np.fft.rfft(signal - signal.mean()))
    return len(signal) / np.argmax(spectrum)


def expected_cells(cell_per_tile):
    """(x, y) level-0 corners of the tiles fully inside the tissue rectangle."""
    x0, y0, x1, y1 = (c // cell_per_tile for c in TISSUE_CELLS)
    step = CELL * cell_per_tile
    return {(i * step, j * step) for i in range(x0, x1) for j in range(y0, y1)}


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory):
    """One default run on the CMU slide, shared by the tests that only read its output."""
    tmp = tmp_path_factory.mktemp("cmu")
    folder = slide_folder(tmp, [CMU.name])
    assert run(folder, tmp / "out") == 0
    return tmp / "out"


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    """A 1344 px square of the CMU slide (mostly tissue) as an uncompressed TIFF at 0.499 µm/px:
    real H&E that is cheap to read, for the tests that tile several slides."""
    path = tmp_path_factory.mktemp("small") / "small.tiff"
    region = openslide.OpenSlide(str(CMU)).read_region((896, 1120), 0, (1344, 1344)).convert("RGB")
    synthetic_slide.write_pyramid_tiff(path, np.asarray(region), 0.499, downsamples=(1,))
    return path


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyramid") / "slides"
    folder.mkdir()
    synthetic_slide.write_pyramid_tiff(folder / "stripes.tiff", stripes_image(), MPP0, downsamples=(1, 4))
    return folder


# ---------------------------------------------------------------------------------------------
# The real slide
# ---------------------------------------------------------------------------------------------

def test_cmu_slide_gives_tissue_tiles(cmu_run):
    rows = read_manifest(cmu_run)
    assert 30 <= len(rows) <= 90  # 117 grid cells; about 40% of the slide is tissue
    files = {str(p.relative_to(cmu_run)) for p in (cmu_run / "tiles").rglob("*.png")}
    assert files == {r["file"] for r in rows}
    for r in rows:
        assert (r["slide_id"], r["tss"], r["level"], r["split"]) == ("cmu_small_region", "", "0", "train")
        assert float(r["mpp"]) == pytest.approx(0.499)  # native 20x pixels, not resampled
        assert float(r["tissue"]) >= 0.5
        image = Image.open(cmu_run / r["file"])
        assert (image.size, image.mode) == ((224, 224), "RGB")
        tile = np.asarray(image).astype(float)
        saturation = (tile.max(-1) - tile.min(-1)) / np.maximum(tile.max(-1), 1)
        assert tile.mean() < 225 and saturation.mean() > 0.1, r["file"]  # stained, not glass
    assert ("0", "0") not in {(r["x"], r["y"]) for r in rows}  # the top-left corner is glass
    assert Image.open(cmu_run / "previews" / "cmu_small_region.png").size[1] > 500


def test_tiles_are_the_slide_pixels(cmu_run):
    """At native MPP a tile is exactly read_region at its manifest position."""
    slide = openslide.OpenSlide(str(CMU))
    for r in read_manifest(cmu_run)[:5]:
        region = slide.read_region((int(r["x"]), int(r["y"])), 0, (224, 224)).convert("RGB")
        assert np.array_equal(load(cmu_run / r["file"]), np.asarray(region))


def test_shipped_tiles_come_from_the_tiler(cmu_run):
    """tests/data/tiles: 8 real H&E tiles for other tests, cut by this tiler (--min-tissue 0.9)."""
    shipped = sorted((DATA / "tiles").glob("*.png"))
    assert len(shipped) == 8 and sum(p.stat().st_size for p in shipped) < 1.5e6
    made = {Path(r["file"]).name: r["file"] for r in read_manifest(cmu_run)}
    for p in shipped:
        image = Image.open(p)
        assert (image.size, image.mode) == ((224, 224), "RGB")
        assert np.array_equal(np.asarray(image), load(cmu_run / made[p.name]))


# ---------------------------------------------------------------------------------------------
# Scale, levels and tissue on a synthetic pyramid; the plain-image path
# ---------------------------------------------------------------------------------------------

def test_synthetic_tiff_is_an_openslide_pyramid(pyramid):
    slide = openslide.OpenSlide(str(pyramid / "stripes.tiff"))
    assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
    assert slide.level_downsamples == (1.0, 4.0)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP0)
    region = np.asarray(slide.read_region((0, 0), 0, (CELLS_X * CELL, CELLS_Y * CELL)))
    assert np.array_equal(region[..., :3], stripes_image())


@pytest.mark.parametrize("mpp, level, cell_per_tile", [(0.5, 0, 1), (1.0, 1, 2)])
def test_pyramid_tiles_come_from_tissue_at_the_right_scale(pyramid, tmp_path, mpp, level, cell_per_tile):
    """0.5 µm/px resamples level 0 (0.25) by 2; 1.0 µm/px copies level 1. A 16 µm period is
    16 / mpp px in the tile, and tiles come only from the tissue rectangle."""
    assert run(pyramid, tmp_path, "--mpp", mpp) == 0
    rows = read_manifest(tmp_path)
    assert {(int(r["x"]), int(r["y"])) for r in rows} == expected_cells(cell_per_tile)
    for r in rows:
        assert (int(r["level"]), float(r["mpp"])) == (level, mpp)
        assert period_px(load(tmp_path / r["file"])) == pytest.approx(PERIOD_UM / mpp, rel=0.02)


def test_plain_image_needs_and_uses_slide_mpp(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.fromarray(stripes_image()).save(folder / "stripes.png", compress_level=1)
    assert run(folder, tmp_path / "a") == 1  # no MPP: skipped, and nothing else to tile
    assert "--slide-mpp" in capsys.readouterr().err
    assert run(folder, tmp_path / "b", "--slide-mpp", MPP0) == 0
    rows = read_manifest(tmp_path / "b")
    assert {(int(r["x"]), int(r["y"])) for r in rows} == expected_cells(1)
    for r in rows:
        assert period_px(load(tmp_path / "b" / r["file"])) == pytest.approx(PERIOD_UM / 0.5, rel=0.02)


def test_otsu_threshold_maximises_between_class_variance():
    """Against the definition, evaluated directly on the values at every candidate threshold."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.03, 5000), rng.normal(0.6, 0.05, 2000)]).clip(0, 1)

    def between(t):
        low, high = values[values < t], values[values >= t]
        return len(low) * len(high) * (low.mean() - high.mean()) ** 2 if len(low) and len(high) else 0

    best = max(np.arange(1, 256) / 256, key=between)
    assert tiling.otsu_threshold(values) == pytest.approx(best)
    assert 0.15 < best < 0.45  # between the two modes


# ---------------------------------------------------------------------------------------------
# The paper's ablations: context tiles and JPEG
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["cmu", "pyramid"])
def test_context_tile_centre_crop_is_the_tile(tmp_path, pyramid, source):
    """--context 16: the 256 tile's centre crop is the 224 tile bit for bit; the 224 tiles are
    those of a run without --context; the 256 tile is the slide around it (native pixels on the
    CMU slide, a 2x Lanczos resample of the whole picture on the pyramid)."""
    folder = slide_folder(tmp_path, [CMU.name]) if source == "cmu" else pyramid
    assert run(folder, tmp_path / "ctx", "--context", 16, "--max-tiles-per-slide", 10) == 0
    assert run(folder, tmp_path / "plain", "--max-tiles-per-slide", 10) == 0
    rows, plain = read_manifest(tmp_path / "ctx"), read_manifest(tmp_path / "plain")
    assert len(rows) >= 8 and [r["file"] for r in rows] == [r["file"] for r in plain]
    half = np.asarray(Image.fromarray(stripes_image()).resize(
        (CELLS_X * CELL // 2, CELLS_Y * CELL // 2), Image.Resampling.LANCZOS)).astype(int)
    slide = openslide.OpenSlide(str(CMU))
    for r in rows:
        big, tile = load(tmp_path / "ctx" / r["context_file"]), load(tmp_path / "ctx" / r["file"])
        assert big.shape == (256, 256, 3)
        assert np.array_equal(big[16:240, 16:240], tile)
        assert np.array_equal(tile, load(tmp_path / "plain" / r["file"]))
        x, y = int(r["x"]), int(r["y"])
        if source == "cmu":
            around = slide.read_region((x - 16, y - 16), 0, (256, 256)).convert("RGB")
            assert np.array_equal(big, np.asarray(around))
        else:
            around = half[y // 2 - 16:y // 2 + 240, x // 2 - 16:x // 2 + 240]
            assert np.abs(big - around).max() <= 1


def ijg_luma_table(quality):
    """The IJG (libjpeg) luminance table at `quality`: what a JPEG written at that quality holds."""
    base = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57,
            69, 56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55,
            64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100,
            103, 99]
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return sorted(min(max((b * scale + 50) // 100, 1), 255) for b in base)


def test_jpeg_round_trip_at_quality(tmp_path, small_slide):
    folder = slide_folder(tmp_path, ["small.tiff"], small_slide)
    common = ["--max-tiles-per-slide", 6, "--seed", 3]
    assert run(folder, tmp_path / "png", *common) == 0
    assert run(folder, tmp_path / "jpg", *common, "--jpeg", 70) == 0
    png, jpg = read_manifest(tmp_path / "png"), read_manifest(tmp_path / "jpg")
    assert [(r["x"], r["y"]) for r in png] == [(r["x"], r["y"]) for r in jpg]
    assert ijg_luma_table(70) != ijg_luma_table(75)
    for p, j in zip(png, jpg):
        assert j["file"].endswith(".jpg")
        written = (tmp_path / "jpg" / j["file"]).read_bytes()
        image = Image.open(io.BytesIO(written))
        assert image.format == "JPEG" and image.size == (224, 224)
        assert sorted(image.quantization[0]) == ijg_luma_table(70)
        lossless = load(tmp_path / "png" / p["file"])
        again = io.BytesIO()
        Image.fromarray(lossless).save(again, "JPEG", quality=70)
        assert again.getvalue() == written  # the same pixels, encoded at quality 70
        mse = ((np.asarray(image).astype(float) - lossless) ** 2).mean()
        assert 10 * np.log10(255 ** 2 / mse) > 22  # and decodes close to them (4:2:0 chroma)


# ---------------------------------------------------------------------------------------------
# Sampling and splits
# ---------------------------------------------------------------------------------------------

def test_splits_are_disjoint_and_stratified(tmp_path, small_slide):
    names = ["TCGA-AA-0001-01Z-00-DX1.tiff", "TCGA-AA-0002-01Z-00-DX1.tiff",
             "TCGA-BB-0003-01Z-00-DX1.tiff", "TCGA-BB-0004-01Z-00-DX1.tiff"]
    folder = slide_folder(tmp_path, names, small_slide)
    assert run(folder, tmp_path / "out", "--max-tiles-per-slide", 8, "--stratify", "tss",
               "--val-out-slides", 0.25, "--val-in", 0.25) == 0
    rows = read_manifest(tmp_path / "out")
    by_split = {s: {(r["slide_id"], r["x"], r["y"]) for r in rows if r["split"] == s}
                for s in ("train", "val_in", "val_out")}
    slides = {s: {key[0] for key in keys} for s, keys in by_split.items()}
    assert len(slides["val_out"]) == 1
    assert not slides["val_out"] & (slides["train"] | slides["val_in"])
    assert by_split["val_in"] and not by_split["val_in"] & by_split["train"]
    assert len(rows) == len(set((r["slide_id"], r["x"], r["y"]) for r in rows)) == 32
    assert {r["tss"] for r in rows} == {"AA", "BB"}
    assert sum(r["tss"] == "AA" for r in rows) == 16  # identical slides: equal shares (reallocation: below)


def test_stratified_tss_moves_a_short_slides_share_to_its_own_site(tmp_path, small_slide):
    short = tmp_path / "short.tiff"  # 448 x 672 px: at most 6 tiles, fewer than the cap of 8
    synthetic_slide.write_pyramid_tiff(short, load(small_slide)[:672, :448], 0.499, downsamples=(1,))
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(short, folder / "TCGA-AA-0001-01Z-00-DX1.tiff")
    for n in ("TCGA-AA-0002-01Z-00-DX1.tiff", "TCGA-BB-0003-01Z-00-DX1.tiff", "TCGA-BB-0004-01Z-00-DX1.tiff"):
        os.symlink(small_slide, folder / n)
    count = {}
    for stratify in ("none", "tss"):
        assert run(folder, tmp_path / stratify, "--max-tiles-per-slide", 8, "--stratify", stratify) == 0
        rows = read_manifest(tmp_path / stratify)
        count[stratify] = {k: sum(r["slide_id"].startswith(f"TCGA-{k}") for r in rows)
                           for k in ("AA-0001", "AA", "BB")}
    k = count["none"]["AA-0001"]
    assert 0 < k < 8 and count["tss"]["AA-0001"] == k
    assert count["none"] == {"AA-0001": k, "AA": k + 8, "BB": 16}
    assert count["tss"] == {"AA-0001": k, "AA": 16, "BB": 16}  # AA-0002 takes what AA-0001 cannot give


def test_val_out_holds_out_whole_patients_and_is_stable():
    slides = [f"TCGA-AA-{k:04d}-01Z-00-DX{d}" for k in range(40) for d in (1, 2)] + ["cmu_small_region"]
    held = tiling.val_out_slides(slides, 0.25, seed=0)
    patients = {tiling.patient_id(s) for s in held}
    assert len(patients) == round(0.25 * 41) and tiling.patient_id("cmu_small_region") == "cmu_small_region"
    assert held == {s for s in slides if tiling.patient_id(s) in patients}  # DX1 and DX2 on the same side
    fewer = [s for s in slides if not s.startswith("TCGA-AA-0007")]  # one patient's slides drop out
    moved = {tiling.patient_id(s) for s in held ^ tiling.val_out_slides(fewer, 0.25, seed=0)}
    assert len(moved - {"TCGA-AA-0007"}) <= 1  # not a new draw: at most one other patient crosses
    assert tiling.val_out_slides(slides, 0.25, seed=1) != held


def test_water_fill_and_stratified_allocation():
    assert tiling.water_fill([2, 50, 50], 30) == [2, 14, 14]
    assert tiling.water_fill([1, 1], 10) == [1, 1]
    plans = [{"slide_id": f"s{k}", "tss": tss, "split": "train", "n_candidates": n}
             for k, (tss, n) in enumerate([("AA", 3), ("AA", 100), ("BB", 100)])]
    assert tiling.allocate(plans, 10, "none") == {"s0": 3, "s1": 10, "s2": 10}
    assert tiling.allocate(plans, 10, "tss") == {"s0": 3, "s1": 17, "s2": 10}
    assert tiling.allocate(plans, None, "none") == {"s0": 3, "s1": 100, "s2": 100}
    assert tiling.tss_code("TCGA-A1-A0SB-01Z-00-DX1.XYZ") == "A1"
    assert tiling.tss_code("cmu_small_region") == ""


def test_workers_give_the_same_manifest(tmp_path, small_slide):
    folder = slide_folder(tmp_path, ["TCGA-AA-0001.tiff", "TCGA-BB-0002.tiff"], small_slide)
    args = ["--max-tiles-per-slide", 4, "--val-in", 0.5]
    assert run(folder, tmp_path / "one", *args) == 0
    assert run(folder, tmp_path / "two", *args, "--slide-processes", 2) == 0
    assert read_manifest(tmp_path / "one") == read_manifest(tmp_path / "two")


# ---------------------------------------------------------------------------------------------
# Resume and bad input
# ---------------------------------------------------------------------------------------------

def test_resume_skips_done_slides_and_redoes_the_rest(tmp_path, capsys, small_slide):
    folder = slide_folder(tmp_path, ["a.tiff", "b.tiff"], small_slide)
    out = tmp_path / "out"
    assert run(folder, out, "--max-tiles-per-slide", 3) == 0
    first = read_manifest(out)
    stamps = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in first}
    (out / "slides" / "b.done.json").unlink()       # as if killed before b's marker
    (out / "tiles" / "b" / "b_junk.png").write_bytes(b"half a tile")
    capsys.readouterr()
    assert run(folder, out, "--max-tiles-per-slide", 3) == 0
    assert "1 slides already done, 1 tiled now" in capsys.readouterr().out
    assert read_manifest(out) == first
    assert not (out / "tiles" / "b" / "b_junk.png").exists()
    assert all((out / f).stat().st_mtime_ns == t for f, t in stamps.items() if "/a/" in f)
    assert run(folder, out, "--max-tiles-per-slide", 3, "--seed", 1) == 0  # new settings: redo all
    assert "0 slides already done, 2 tiled now" in capsys.readouterr().out


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, monkeypatch, small_slide):
    """Two runs into one OUT once left manifest rows for tiles the other run had deleted. While a run tiles
    (here: in the middle of its second slide), the same command in another process is refused in one line,
    and the first run's manifest lists exactly the tiles on disk."""
    folder, out = slide_folder(tmp_path, ["a.tiff", "b.tiff"], small_slide), tmp_path / "out"
    args = ["--slides", str(folder), "--out", str(out), "--max-tiles-per-slide", "3"]
    second, real_write = [], tiling.write_tiles

    def write_tiles_racing(slide, geo, tissue, chosen, splits, job):
        if job["slide_id"] == "b":  # the second run starts while b is being tiled
            second.append(subprocess.run([sys.executable, str(REPO / "tiling.py"), *args], capture_output=True,
                                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}))
        return real_write(slide, geo, tissue, chosen, splits, job)

    monkeypatch.setattr(tiling, "write_tiles", write_tiles_racing)
    assert tiling.main(args) == 0
    assert second[0].returncode == 1 and second[0].stderr.strip().splitlines() == [
        f"tiling.py: error: --out {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
        f"since {(out / '.lock').read_text().split('since ')[1].strip()}): two runs in one folder would mix their "
        f"files; wait for it to end, or choose another --out"]
    rows = read_manifest(out)
    on_disk = {str(p.relative_to(out)) for p in (out / "tiles").rglob("*.png")}
    assert len(rows) == 6 and {r["file"] for r in rows} == on_disk


def test_bad_input_is_reported_per_slide(tmp_path, capsys):
    folder = slide_folder(tmp_path, ["good.svs"])
    data = CMU.read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[200_000:1_200_000] = bytes(1_000_000)  # header intact, JPEG tiles zeroed
    (folder / "damaged.svs").write_bytes(damaged)
    (folder / "corrupt.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "notes.txt").write_text("not a slide\n")
    Image.fromarray(stripes_image()[:CELL, :CELL]).save(folder / "no_mpp.png")
    synthetic_slide.write_pyramid_tiff(folder / "blank.tiff", np.full((1792, 1792, 3), 250, np.uint8), MPP0)
    assert run(folder, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert {r["slide_id"] for r in read_manifest(tmp_path / "out")} == {"good"}
    for name in ["truncated.svs", "damaged", "corrupt.svs", "notes.txt", "no_mpp.png"]:
        assert name in err
    assert "--slide-mpp" in err and "no tissue" in err and "blank" in err
    (folder / "good.svs").unlink()
    assert run(folder, tmp_path / "out2") == 1  # nothing could be tiled


# ---------------------------------------------------------------------------------------------
# Pen ink
# ---------------------------------------------------------------------------------------------

INK_TISSUE = (1, 1, 5, 4)                                  # tissue cells x0, y0, x1, y1
INK_CELLS = {(2, 1), (2, 2), (3, 3), (4, 3), (4, 1)}       # cells a pen stroke crosses


@pytest.fixture(scope="module")
def inked(tmp_path_factory):
    """H&E-like tissue on glass with a blue, a green and a black pen stroke, each kept at least
    60 px (2 thumbnail pixels) inside its cells."""
    image = np.full((5 * CELL, 6 * CELL, 3), 255, np.uint8)
    x0, y0, x1, y1 = (c * CELL for c in INK_TISSUE)
    image[y0:y1, x0:x1] = synthetic_slide.he_texture(y1 - y0, x1 - x0)
    synthetic_slide.draw_pen(image, "blue", 2 * CELL + 120, CELL + 60, 2 * CELL + 330, 3 * CELL - 60)
    synthetic_slide.draw_pen(image, "green", 3 * CELL + 60, 3 * CELL + 150, 5 * CELL - 60, 3 * CELL + 300)
    synthetic_slide.draw_pen(image, "black", 4 * CELL + 100, CELL + 100, 4 * CELL + 350, CELL + 350)
    folder = tmp_path_factory.mktemp("inked") / "slides"
    folder.mkdir()
    synthetic_slide.write_pyramid_tiff(folder / "inked.tiff", image, MPP0, downsamples=(1, 4))
    return folder


def test_tiles_over_pen_ink_are_dropped_and_shown(inked, tmp_path):
    tissue = {(i, j) for i in range(INK_TISSUE[0], INK_TISSUE[2]) for j in range(INK_TISSUE[1], INK_TISSUE[3])}
    cells, previews = {}, {}
    for name, flags in [("on", []), ("off", ["--no-ink-filter"])]:
        assert run(inked, tmp_path / name, *flags) == 0
        cells[name] = {(int(r["x"]) // CELL, int(r["y"]) // CELL) for r in read_manifest(tmp_path / name)}
        previews[name] = load(tmp_path / name / "previews" / "inked.png").astype(int)
    assert cells["on"] == tissue - INK_CELLS   # the neighbours of every stroke are kept
    assert cells["off"] == tissue
    downsample = math.ceil(6 * CELL / slides.PREVIEW_MAX_PX)
    blue = previews["on"][(2 * CELL) // downsample, (2 * CELL + 225) // downsample]
    assert blue[0] > 120 and blue[1] < 60          # tinted magenta: (ink + INK_COLOUR) / 2
    assert previews["off"][(2 * CELL) // downsample, (2 * CELL + 225) // downsample][0] < 60


# ---------------------------------------------------------------------------------------------
# What the slide folder holds; the command line
# ---------------------------------------------------------------------------------------------

def test_folder_is_sorted_into_slides_non_slides_and_our_output(tmp_path, capsys, small_slide):
    folder = slide_folder(tmp_path, ["good.tiff"], small_slide)
    for name in ["README.txt", "labels.csv", "meta.json", "notes.md"]:
        (folder / name).write_text("not a slide\n")
    (folder / "corrupt.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    Image.fromarray(synthetic_slide.synthetic_tissue(CELL)).save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[:len(data) // 2])  # Pillow still opens its header
    assert run(folder, folder, "--max-tiles-per-slide", 2) == 0     # OUT_DIR is SLIDES_DIR
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "not a slide" in line] == [
        "not a slide, skipped (4): README.txt, labels.csv, meta.json, notes.md"]
    for name in ["corrupt.svs", "cut.png"]:
        line, = [line for line in err if name in line]
        assert "corrupt" in line and "--slide-mpp" not in line
    assert run(folder, folder, "--max-tiles-per-slide", 2) == 0     # again: its own output is not a slide
    captured = capsys.readouterr()
    assert "skipped tiling.py's own output: manifest.csv, tiling.json" in captured.err
    assert "not a slide, skipped (4)" in captured.err and "1 slides already done" in captured.out
    assert run(folder, folder / "out", "--max-tiles-per-slide", 2) == 0  # OUT_DIR inside SLIDES_DIR
    assert run(folder, folder / "out", "--max-tiles-per-slide", 2) == 0
    assert "1 slides already done, 0 tiled now" in capsys.readouterr().out


@pytest.mark.parametrize("files", [[], ["README.md"]])
def test_a_folder_without_slides_says_so(tmp_path, capsys, files):
    for name in files:
        (tmp_path / name).write_text("# notes\n")
    assert run(tmp_path, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "holds no slides" in err and "see the messages above" not in err


@pytest.mark.parametrize("flag, value, bounds", [
    ("--mpp", "0", "(0, 100]"), ("--mpp", "nan", "(0, 100]"), ("--slide-mpp", "inf", "(0, 100]"),
    ("--image-size", "0", "[16, 4096]"), ("--image-size", "2.5", "[16, 4096]"), ("--min-tissue", "1.5", "[0, 1]"),
    ("--jpeg", "101", "[1, 100]"), ("--context", "-1", "[0, 4096]"),
    ("--max-tiles-per-slide", "0", "[1, 1000000000]"), ("--val-in", "1", "[0, 1)"),
    ("--val-out-slides", "-0.1", "[0, 1)"), ("--seed", "-1", "[0, 2147483647]"),
    ("--slide-processes", "0", "[1, 1024]")])
def test_numbers_are_checked_when_parsed(tmp_path, one_line_error, flag, value, bounds):
    line = one_line_error(tiling.main, ["--slides", str(tmp_path), "--out", str(tmp_path / "out"), flag, value])
    assert f"argument {flag}" in line and bounds in line
