"""What happens to a tile before an extractor sees it, and the feature cache (support/tile_features.py).

The centre crop, JPEG and resize against numpy and Pillow; the cache keyed by the tiles' contents and their
preprocessing; a folder compared with another byte by byte; and the size each extractor is handed.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import extractors as F
from conftest import write_tiles
from support import tile_features as T

torch.set_num_threads(1)


def test_preprocessing_crops_the_centre_and_jpeg_changes_pixels(tmp_path):
    tile = np.zeros((256, 256, 3), np.uint8)
    tile[16:240, 16:240] = 200  # the 224 tile inside a 256 one
    Image.fromarray(tile).save(tmp_path / "t.png")
    cropped = T.preprocessed_tile(tmp_path / "t.png", T.Preprocess(crop=224), 224, "bicubic")
    assert cropped.shape == (224, 224, 3) and (cropped == 200).all()
    write_tiles(tmp_path, ["noise"])
    plain = T.preprocessed_tile(tmp_path / "noise.png", T.Preprocess(), 256, "bicubic")
    jpeg = T.preprocessed_tile(tmp_path / "noise.png", T.Preprocess(jpeg=70), 256, "bicubic")
    assert np.abs(plain.astype(int) - jpeg).mean() > 5
    with pytest.raises(ValueError, match="smaller than the centre crop"):
        T.preprocessed_tile(tmp_path / "t.png", T.Preprocess(crop=300), 224, "bicubic")
    Image.fromarray(np.zeros((224, 672, 3), np.uint8)).save(tmp_path / "grid.png")  # a picture, not a tile
    with pytest.raises(ValueError, match="not a square tile"):
        T.preprocessed_tile(tmp_path / "grid.png", T.Preprocess(), 224, "bicubic")


def test_feature_cache_is_keyed_by_content_and_preprocessing(tmp_path):
    folder = write_tiles(tmp_path / "tiles", ["a", "b", "c"], size=224)
    builds = []

    def get():
        builds.append(1)
        return F.build_extractor("tiny", pretrained=False)

    run = lambda prep: T.extract_features(folder, F.EXTRACTORS["tiny"], prep, get,  # noqa: E731
                                         identity=dict(extractor="tiny", weights="random(seed=0)"),
                                         cache_dir=tmp_path / "c")
    stems, first = run(T.Preprocess())
    _, again = run(T.Preprocess())
    assert stems == ["a", "b", "c"] and first.shape == (3, 48) and len(builds) == 1
    np.testing.assert_array_equal(first, again)
    run(T.Preprocess(jpeg=70))  # other preprocessing: a miss
    write_tiles(folder, ["c"], size=224, seed=1)  # new content for c: a miss
    run(T.Preprocess())
    assert len(builds) == 3


def test_an_odd_margin_crops_whole_pixels_and_each_set_reaches_the_size_its_extractor_takes(tmp_path):
    """A 227 px tile cropped to 224 loses 1 px on the top and left and 2 on the bottom and right (whole pixels:
    numpy's slice), not a resampled half pixel. An extractor that resizes inside (pytorch-fid's Inception) gets
    each tile at its own size unless --resize-to-input asks; the others get their input size."""
    pixels = np.random.default_rng(2).integers(0, 256, (227, 227, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "odd.png")
    assert np.array_equal(T.preprocessed_tile(tmp_path / "odd.png", T.Preprocess(crop=224), None, "bicubic"),
                          pixels[1:225, 1:225])
    tiles = write_tiles(tmp_path / "tiles", ["a", "b", "c"], size=48)
    seen = []

    class Recorder:
        def embed(self, x, bf16=False):
            seen.append(tuple(x.shape[2:]))
            return x.mean((2, 3))  # (B, 3)

    for resize_inside, to_input, want in ((True, False, (48, 48)), (True, True, (32, 32)), (False, False, (32, 32))):
        spec = F.ExtractorSpec(None, "recorder", input_size=32, dim=3, resize_inside=resize_inside)
        seen.clear()
        T.extract_features(tiles, spec, T.Preprocess(resize_to_input=to_input), Recorder, identity=dict(extractor="r"))
        assert seen == [want], (resize_inside, to_input, seen)


def test_same_tiles_compares_the_bytes_not_only_the_names_and_sizes(tmp_path):
    """Uncompressed TIFFs of one size have one byte count: folders alike in names and sizes but not in pixels
    are not the same tiles; a byte copy under other names is."""
    rng = np.random.default_rng(0)
    for folder, seed in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        for i in range(3):
            pixels = np.random.default_rng(seed * 10 + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / folder / f"{i}.tif")
    sizes = [sorted(p.stat().st_size for p in (tmp_path / f).iterdir()) for f in "ab"]
    assert sizes[0] == sizes[1]  # the premise: only the contents differ
    assert not T.same_tiles(tmp_path / "a", tmp_path / "b")
    (tmp_path / "c").mkdir()
    for i, name in enumerate(rng.permutation(3)):
        (tmp_path / "c" / f"copy_{name}.tif").write_bytes((tmp_path / "a" / f"{i}.tif").read_bytes())
    assert T.same_tiles(tmp_path / "a", tmp_path / "c") and T.same_tiles(tmp_path / "a", tmp_path / "a")
