"""The tissue mask pinned on pictures whose tissue and background areas are known (CytoSyn §3.2), so that a
mask that inverted or shifted them fails.

Tissue is what is more saturated than the threshold: white and grey glass (saturation about 0) is
background, H&E's pink and purple are tissue. A mask that kept the pixels below the threshold would send
background tiles into the training set; these tests count pixels and tiles exactly.
"""
import numpy as np
import pytest

import synthetic_slide
import tiling
from support.slides import open_slide, slide_geometry

MIN_OBJECT = 16  # px: a quarter of a 8 x 8 px tile, as tiling.slide_masks sets it for 16 px per tile


def test_the_mask_is_the_saturated_area_exactly():
    rgb = np.full((64, 96, 3), 255, np.uint8)  # white glass
    rgb[40:60, 4:30] = (200, 200, 205)  # grey glass, saturation 0.02: below the floor
    rgb[8:32, 40:88] = synthetic_slide.he_texture(24, 48)  # tissue: 24 x 48 px of H&E
    rgb[50:52, 60:62] = (230, 160, 200)  # a 2 x 2 px pink speck: dust, smaller than MIN_OBJECT
    mask = tiling.tissue_mask(rgb, MIN_OBJECT)
    expected = np.zeros((64, 96), bool)
    expected[8:32, 40:88] = True
    assert mask.sum() == 24 * 48 and np.array_equal(mask, expected)


def test_pale_tissue_above_the_floor_is_kept_and_glass_below_it_is_not():
    rgb = np.full((40, 40, 3), 255, np.uint8)
    rgb[4:36, 4:18] = (240, 214, 230)  # pale eosin: saturation 0.108, above the 0.07 floor
    rgb[4:36, 22:36] = (240, 230, 236)  # faintly tinted glass: saturation 0.042, below it
    mask = tiling.tissue_mask(rgb, MIN_OBJECT)
    assert mask[4:36, 4:18].all() and mask.sum() == 32 * 14


def test_a_blank_slide_stays_background_whatever_otsu_finds():
    """Only glass, white and faintly tinted: Otsu still splits it in two (near 0.02), the floor keeps both out."""
    rgb = np.full((40, 40, 3), 255, np.uint8)
    rgb[4:36, 4:36] = (240, 230, 236)  # saturation 0.042
    assert tiling.otsu_threshold(np.where(rgb[..., 0] == 255, 0.0, 0.042)) < tiling.MIN_SATURATION
    assert not tiling.tissue_mask(rgb, MIN_OBJECT).any()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """6 x 4 tiles of 224 px at 0.5 µm/px: white glass, H&E from x = 1.5 to 5 tiles, y = 1 to 3 tiles."""
    image = np.full((4 * 224, 6 * 224, 3), 255, np.uint8)
    image[224:3 * 224, 336:5 * 224] = synthetic_slide.he_texture(2 * 224, 5 * 224 - 336)
    path = tmp_path_factory.mktemp("slide") / "known.tiff"
    synthetic_slide.write_pyramid_tiff(path, image, 0.5, downsamples=(1,))
    return open_slide(path)


@pytest.mark.parametrize("min_tissue, columns", [(0.4, (1, 2, 3, 4)), (0.6, (2, 3, 4)), (1.0, (2, 3, 4))])
def test_find_tissue_keeps_exactly_the_tiles_with_enough_tissue(slide, min_tissue, columns):
    geo = slide_geometry(slide, 0.5, tiling.TILE_MPP, tiling.TILE_SIZE)
    assert geo.step == 224
    tissue = tiling.find_tissue(slide, geo, min_tissue)
    assert sorted(zip(tissue.y.tolist(), tissue.x.tolist())) == [(224 * r, 224 * c) for r in (1, 2) for c in columns]
    assert tissue.fraction.tolist() == [0.5 if x == 224 else 1.0 for x in tissue.x.tolist()]  # column 1: half
    assert tissue.mask.sum() == (2 * 16) * (5 * 16 - 24)  # 16 mask px per tile; the tissue starts 24 px in
