"""Tests for slides.py: reading whole-slide images (CytoSyn §3.2), MPP, coordinates, and the
reader that gives training tiles straight from the slides, identical to tiling.py's PNGs.

Real data: tests/data/cmu_small_region.svs (Aperio, 0.499 µm/px). Synthetic slides are written
here with synthetic_slide.write_pyramid_tiff (generic-tiff of known µm/px). CPU, seconds.
"""
import csv
import os
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

import slides
import synthetic_slide
import tiling

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
    with pytest.raises(SystemExit, match="line 3.*'nan'"):
        slides.read_mpp_csv(bad)
    bad.write_text("name,resolution\na.svs,0.25\n")
    with pytest.raises(SystemExit, match="columns slide,mpp"):
        slides.read_mpp_csv(bad)


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
    assert tiling.main([str(folder), str(tmp_path / "out"), "--val-in", "0.2"]) == 0
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
