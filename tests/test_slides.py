"""Tests for support/slides.py: reading whole-slide images (CytoSyn §3.2), MPP, coordinates, and the
reader that gives training tiles straight from the slides, identical to tiling.py's PNGs.

Real data: tests/data/cmu_small_region.svs (Aperio, 0.499 µm/px). Synthetic slides are written
here with synthetic_slide.write_pyramid_tiff (generic-tiff of known µm/px). CPU, seconds.
"""
import csv
import json
import os
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

import synthetic_slide
import tiling
from support import slides

DATA = Path(__file__).parent / "data"
CMU = DATA / "cmu_small_region.svs"


def fake(**props):
    """An object with OpenSlide's `properties` mapping and nothing else."""
    return type("FakeSlide", (), {"properties": props})()


def read_manifest(out):
    with open(Path(out) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Levels and MPP
# ---------------------------------------------------------------------------------------------

def test_choose_level_and_scale():
    mpps = [0.25, 0.5, 1.0, 4.0]
    assert slides.choose_level(mpps, 0.5) == 1
    assert slides.choose_level(mpps, 0.7) == 1
    assert slides.choose_level(mpps, 2.0) == 2
    assert slides.choose_level([0.2527, 1.0108, 4.043], 0.5) == 0   # TCGA 40x: read level 0
    assert slides.choose_level([0.504, 2.016], 0.5) == 0             # 0.8% coarse: still 20x
    with pytest.raises(slides.SlideError, match="upsampled"):
        slides.choose_level([1.0, 4.0], 0.5)
    assert slides.level_scale(0.2527, 0.5) == 2.0    # snapped: a 2x box, not 1.979
    assert slides.level_scale(0.499, 0.5) == 1.0
    assert slides.level_scale(0.3, 0.5) == pytest.approx(5 / 3)


def test_slide_mpp_sources(monkeypatch):
    """--slide-mpp, else openslide.mpp-x, else 10 / objective power, else a clear error."""
    def fake_openslide(**props):
        return fake(**{f"openslide.{k}": v for k, v in props.items()})
    assert slides.slide_mpp(fake_openslide(**{"mpp-x": "0.2527", "objective-power": "40"})) == 0.2527
    assert slides.slide_mpp(fake_openslide(**{"objective-power": "20"})) == 0.5
    assert slides.slide_mpp(fake_openslide(**{"mpp-x": "0.2527"}), override=0.26) == 0.26
    monkeypatch.setattr(slides, "check_readable", lambda slide: None)  # a fake has no pixels to probe
    with pytest.raises(slides.SlideError, match="--slide-mpp"):
        slides.slide_mpp(fake_openslide())


@pytest.mark.parametrize("props, mpp, source", [
    ({"openslide.mpp-x": "0.2527", "aperio.MPP": "0.3"}, 0.2527, "openslide.mpp-x"),
    ({"aperio.MPP": "0.2525", "tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"},
     0.2525, "aperio.MPP"),
    ({"mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X": "0.243"}, 0.243,
     "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X"),
    ({"hamamatsu.XResolution": "44000"}, 1e4 / 44000, "hamamatsu.XResolution"),
    ({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, 0.25, "tiff-resolution"),
    ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, 0.5, "tiff-resolution"),
    ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch", "openslide.objective-power": "40"},
     0.25, "objective-power"),  # 72 dpi is a placeholder, not a scan: skipped
    ({"aperio.MPP": "junk", "openslide.objective-power": "20"}, 0.5, "objective-power"),
])
def test_metadata_fallbacks_in_order(props, mpp, source):
    assert slides.resolve_mpp(fake(**props)) == (pytest.approx(mpp), source)


def test_typed_values_win_over_the_metadata():
    slide = fake(**{"openslide.mpp-x": "0.25"})
    assert slides.resolve_mpp(slide, csv_mpp=0.26, global_mpp=0.3) == (0.26, "csv")
    assert slides.resolve_mpp(slide, global_mpp=0.3) == (0.3, "--slide-mpp")
    table = {"a.svs": 0.24, "b": 0.5}
    assert slides.csv_mpp_for(table, "/x/a.svs") == 0.24 and slides.csv_mpp_for(table, "/x/b.ndpi") == 0.5
    assert slides.csv_mpp_for(table, "/x/c.svs") is None


def test_mpp_csv_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\na.svs,0.25\nb.svs,nan\n")
    with pytest.raises(slides.InputError, match="line 3.*'nan'"):
        slides.read_mpp_csv(bad)
    bad.write_text("name,resolution\na.svs,0.25\n")
    with pytest.raises(slides.InputError, match="columns slide,mpp"):
        slides.read_mpp_csv(bad)


def test_one_slide_with_two_mpps_is_refused_before_anything_is_written(tmp_path, capsys, one_line_error):
    """Which scale is right is a guess (12 tiles instead of 46): refused in one line naming both rows; the same
    value twice is read once, with a note."""
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\na.svs,0.25\nb.svs,0.5\n a.svs ,0.5\n")
    with pytest.raises(slides.InputError, match=r"slide 'a.svs' has two values, 0.25 \(line 2\) and 0.5 \(line 4\)"):
        slides.read_mpp_csv(table)
    table.write_text("slide,mpp\na.svs,0.25\nb.svs,0.5\na.svs,0.25\n")
    assert slides.read_mpp_csv(table) == {"a.svs": 0.25, "b.svs": 0.5}
    assert "1 repeated rows with the same value, read once: a.svs" in capsys.readouterr().err
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(CMU, folder / "a.svs")
    table.write_text("slide,mpp\na.svs,0.25\na,0.5\n")  # by file name and by stem: the same slide
    line = one_line_error(tiling.main, ["--slides", str(folder), "--out", str(tmp_path / "out"),
                                        "--mpp-csv", str(table)])
    assert "slide a.svs has two values, 0.25 (as a.svs) and 0.5 (as a)" in line
    assert not (tmp_path / "out").exists()
    table.write_text("slide,mpp\na.svs,0.25\na,0.25\n")
    assert slides.mpp_table(table, [folder / "a.svs"]) == {"a.svs": 0.25, "a": 0.25}


def test_a_truncated_image_is_called_corrupt_not_sent_for_its_mpp(tmp_path):
    """Pillow opens a truncated PNG's header; without the probe it would ask for --slide-mpp."""
    path = tmp_path / "cut.png"
    Image.fromarray(synthetic_slide.synthetic_tissue(512)).save(path)
    path.write_bytes(path.read_bytes()[:5000])
    slide = slides.open_slide(path)
    with pytest.raises(slides.SlideError, match="corrupt or truncated") as error:
        slides.resolve_mpp(slide)
    assert "--slide-mpp" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Coordinates (TRIDENT / CLAM HDF5)
# ---------------------------------------------------------------------------------------------

def test_coords_round_trip_and_attributes(tmp_path):
    slide = openslide.OpenSlide(str(CMU))
    geo = slides.slide_geometry(slide, 0.499, 0.5, 224)
    path = tmp_path / "coords" / "cmu.h5"
    slides.write_coords(path, [(224, 448), (0, 672)], geo, "cmu")
    with h5py.File(path) as f:
        attrs = dict(f["coords"].attrs)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (2, 2)
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 224 and attrs["patch_level"] == 0
    assert attrs["level0_magnification"] == pytest.approx(20.04, abs=0.01)
    assert attrs["target_magnification"] == pytest.approx(20.04, abs=0.01) and attrs["name"] == "cmu"
    coords, side = slides.read_coords(path, slide, "cmu")
    assert coords.tolist() == [[224, 448], [0, 672]] and side == 224
    with pytest.raises(slides.SlideError, match="is for slide 'cmu'"):
        slides.read_coords(path, slide, "other")


def test_clam_coords_and_points_outside(tmp_path):
    slide = openslide.OpenSlide(str(CMU))  # 2220 x 2967, one level
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.array([[0, 0], [2300, 10]]))
        f["coords"].attrs.update({"patch_size": 256, "patch_level": 0})
    with pytest.raises(slides.SlideError, match="1 of 2 points .* outside the slide \\(2220 x 2967"):
        slides.read_coords(path, slide, "cmu")
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.array([[0, 0], [1000, 10]]))
        f["coords"].attrs.update({"patch_size": 256, "patch_level": 0})
    assert slides.read_coords(path, slide, "cmu")[1] == 256
    with pytest.raises(slides.SlideError, match="no coordinates file"):
        slides.read_coords(tmp_path / "missing.h5", slide, "cmu")


def test_centred_tiles():
    """Their 512 px patch at (1000, 2000): our 448 px tile shares its centre (1256, 2256)."""
    ours = slides.centred_tiles(np.array([[1000, 2000]]), 512, 448)
    assert ours.tolist() == [[1032, 2032]]
    assert slides.centred_tiles(np.array([[0, 0]]), 224, 448).tolist() == [[-112, -112]]


# ---------------------------------------------------------------------------------------------
# Training from slides: the reader gives the PNG's pixels back
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, mpp", [("cmu", 0.499), ("pyramid", 0.25), ("unsnapped", 0.3)])
def test_reader_gives_the_tiles_tiling_wrote(tmp_path, source, mpp):
    """Native pixels (CMU), a 2x Lanczos resample (40x pyramid), a 5/3 resample whose grid step
    is fractional in level-0 pixels: every manifest row read back equals its PNG exactly."""
    folder = tmp_path / "slides"
    folder.mkdir()
    if source == "cmu":
        os.symlink(CMU, folder / CMU.name)
    else:
        synthetic_slide.write_pyramid_tiff(folder / f"{source}.tiff", synthetic_slide.synthetic_tissue(2048),
                                           mpp, downsamples=(1, 4))
    assert tiling.main(["--slides", str(folder), "--out", str(tmp_path / "out"), "--val-in", "0.2"]) == 0
    rows = read_manifest(tmp_path / "out")
    assert len(rows) >= 10
    assert {float(r["scale"]) for r in rows} == {slides.level_scale(float(rows[0]["slide_mpp"]), 0.5)}
    reader = slides.SlideTileReader(folder)
    for r in rows:
        tile = reader.read(r)
        assert tile.dtype == np.uint8 and tile.shape == (224, 224, 3)
        assert np.array_equal(tile, np.asarray(Image.open(tmp_path / "out" / r["file"]))), r["file"]
    assert len(reader.slides) == 1  # one handle per slide, reused
    reader.close()


# ---------------------------------------------------------------------------------------------
# tiling.py runs: per-slide MPP, coordinates out and in
# ---------------------------------------------------------------------------------------------

def test_mpp_csv_overrides_per_slide_and_is_recorded(tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ["a.svs", "b.svs"]:
        os.symlink(CMU, folder / name)
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\na.svs,0.25\nghost,0.5\n")
    out = tmp_path / "out"
    assert tiling.main(["--slides", str(folder), "--out", str(out), "--mpp-csv", str(table)]) == 0
    assert "1 rows name no slide in the folder, ignored: ghost" in capsys.readouterr().err
    rows = read_manifest(out)
    by_slide = {r["slide_id"]: r for r in rows}
    assert (by_slide["a"]["mpp_source"], by_slide["a"]["slide_mpp"], by_slide["a"]["scale"]) == ("csv", "0.25", "2.0")
    assert (by_slide["b"]["mpp_source"], by_slide["b"]["slide_mpp"], by_slide["b"]["scale"]) == (
        "openslide.mpp-x", "0.499", "1.0")
    assert {r["slide_file"] for r in rows} == {"a.svs", "b.svs"}
    recorded = json.loads((out / "tiling.json").read_text())["slides"]
    assert recorded == {"a": {"slide_mpp": 0.25, "mpp_source": "csv"},
                        "b": {"slide_mpp": 0.499, "mpp_source": "openslide.mpp-x"}}
    for slide_id, side in [("a", 448), ("b", 224)]:  # one coords file per slide, the manifest's tiles
        with h5py.File(out / "coords" / f"{slide_id}.h5") as f:
            assert f["coords"].attrs["patch_size_level0"] == side and f["coords"].attrs["patch_size"] == 224
            assert sorted(map(tuple, f["coords"][()].tolist())) == sorted(
                (int(r["x"]), int(r["y"])) for r in rows if r["slide_id"] == slide_id)


def test_our_own_coords_give_the_same_tiles(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(CMU, folder / CMU.name)
    assert tiling.main(["--slides", str(folder), "--out", str(tmp_path / "grid"), "--min-tissue", "0.8"]) == 0
    assert tiling.main(["--slides", str(folder), "--out", str(tmp_path / "again"),
                        "--from-coords", str(tmp_path / "grid" / "coords")]) == 0
    grid, again = read_manifest(tmp_path / "grid"), read_manifest(tmp_path / "again")
    assert [(r["x"], r["y"], r["file"]) for r in grid] == [(r["x"], r["y"], r["file"]) for r in again]
    for r in grid:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "grid" / r["file"])),
                              np.asarray(Image.open(tmp_path / "again" / r["file"])))


def trident_file(path, coords, name, side0=512):
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": side0, "level0_magnification": 40,
                                  "target_magnification": 20, "name": name})


def test_from_coords_centres_our_tile_on_their_patch_and_skips_bad_files(tmp_path, capsys):
    """Their 256 px patches at 20x (512 level-0 px at 0.25 µm/px) -> our 224 px tile around the same
    centre: 32 level-0 px in; its pixels are the 2x Lanczos picture there."""
    image = synthetic_slide.synthetic_tissue(2048)
    folder, coords = tmp_path / "slides", tmp_path / "patches"
    folder.mkdir()
    coords.mkdir()
    synthetic_slide.write_pyramid_tiff(folder / "p.tiff", image, 0.25, downsamples=(1, 4))
    for name in ["q.tiff", "r.tiff", "s.tiff"]:
        os.symlink(folder / "p.tiff", folder / name)
    theirs = [[512, 512], [1024, 512], [700, 1300]]
    trident_file(coords / "p.h5", theirs, "p")
    trident_file(coords / "q.h5", theirs, "p")                    # written for another slide
    trident_file(coords / "r.h5", theirs + [[5000, 10]], "r")     # a point outside the slide
    assert tiling.main(["--slides", str(folder), "--out", str(tmp_path / "out"), "--from-coords", str(coords)]) == 0
    err = capsys.readouterr().err
    assert "skipped q.tiff: --from-coords" in err and "is for slide 'p'" in err
    assert "skipped r.tiff: --from-coords: 1 of 4 points" in err and "outside the slide (2048 x 2048" in err
    assert "skipped s.tiff: --from-coords: no coordinates file" in err
    rows = read_manifest(tmp_path / "out")
    assert [(r["slide_id"], int(r["x"]), int(r["y"])) for r in rows] == [("p", x + 32, y + 32) for x, y in theirs]
    half = np.asarray(Image.fromarray(image).resize((1024, 1024), Image.Resampling.LANCZOS)).astype(int)
    for r in rows:
        x, y = int(r["x"]) // 2, int(r["y"]) // 2
        tile = np.asarray(Image.open(tmp_path / "out" / r["file"]))
        assert np.abs(tile - half[y:y + 224, x:x + 224]).max() <= 1


def test_from_coords_keeps_the_tissue_rule_at_the_slides_edge(tmp_path, capsys):
    """A TRIDENT patch at the slide's last pixel, or half off the slide, would give a tile of padding: tiles
    keep --min-tissue as grid tiles do, and what lies outside the slide counts as no tissue."""
    image = synthetic_slide.synthetic_tissue(2048)
    image[1024:, 1024:] = synthetic_slide.he_texture(1024, 1024)  # tissue up to the bottom-right edges
    folder, coords = tmp_path / "slides", tmp_path / "patches"
    folder.mkdir()
    coords.mkdir()
    synthetic_slide.write_pyramid_tiff(folder / "p.tiff", image, 0.25, downsamples=(1, 4))
    # our 448 px tiles start 32 px into their 512 px patches: inside, half off the slide (316 / 448 of each
    # side inside: 0.4975 of the tile at most, all of it tissue), at the last pixel (nothing inside)
    trident_file(coords / "p.h5", [[1200, 1200], [1700, 1700], [2047, 2047]], "p")
    assert tiling.main(["--slides", str(folder), "--out", str(tmp_path / "out"), "--from-coords", str(coords)]) == 0
    rows = read_manifest(tmp_path / "out")
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(1232, 1232)] and float(rows[0]["tissue"]) >= 0.5
    assert "--from-coords: dropped 2 patches of p with tissue below --min-tissue" in capsys.readouterr().err
    assert tiling.main(["--slides", str(folder), "--out", str(tmp_path / "all"), "--from-coords", str(coords),
                        "--min-tissue", "0"]) == 0  # --min-tissue 0 keeps every patch, padding and all
    assert [float(r["tissue"]) for r in read_manifest(tmp_path / "all")][1:] == [pytest.approx(0.4, abs=0.1), 0.0]
