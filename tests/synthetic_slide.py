"""Synthetic whole-slide images for the tiling tests and `bench.py tiling`: an H&E-coloured test
pattern, pen strokes over it, written as a tiled pyramidal TIFF (tifffile) that OpenSlide opens as
"generic-tiff" with a known µm/px (from the TIFF resolution, in pixels per centimetre).
"""
import numpy as np
import tifffile
from PIL import Image


def write_pyramid_tiff(path, image, mpp, downsamples=(1, 4), tile=256, jpeg_quality=None):
    """A tiled pyramidal TIFF OpenSlide reads as generic-tiff, with openslide.mpp-x = mpp: one page per
    level (box-averaged by whole factors), raw RGB tiles or JPEG ones (tifffile's JPEG codec comes from
    the imagecodecs package)."""
    # RGB JPEG tiles: with photometric "ycbcr" OpenSlide reads tifffile's tiles with shifted colours
    codec = dict(compression="jpeg", compressionargs={"level": jpeg_quality}) if jpeg_quality else {}
    with tifffile.TiffWriter(path) as tiff:
        for d in downsamples:
            level = np.asarray(Image.fromarray(image).reduce(d)) if d > 1 else image
            per_cm = 1e4 / (mpp * d)
            tiff.write(level, tile=(tile, tile), resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                       subfiletype=int(d > 1), photometric="rgb", **codec)


def synthetic_tissue(side, seed=0):
    """An H&E-coloured test image: a disc of pink 'stroma' with purple 'nuclei' on white glass."""
    rng = np.random.default_rng(seed)
    image = np.full((side, side, 3), 255, np.uint8)
    x = np.arange(side, dtype=np.float32)[None, :]
    for y0 in range(0, side, 512):
        y = np.arange(y0, min(y0 + 512, side), dtype=np.float32)[:, None]
        nuclei = np.sin(x / 6 + 3 * np.sin(y / 50)) * np.sin(y / 7 + 3 * np.sin(x / 40)) > 0.7
        colour = np.where(nuclei[..., None], [110, 60, 150], [230, 160, 200]).astype(np.float32)
        colour += rng.normal(0, 6, colour.shape)
        disc = (x - side / 2) ** 2 + (y - side / 2) ** 2 < (0.42 * side) ** 2
        image[y0:y0 + len(y)] = np.where(disc[..., None], colour.clip(0, 255), 255).astype(np.uint8)
    return image


PEN_COLOURS = {"blue": (35, 70, 170), "green": (40, 140, 75), "black": (30, 30, 35)}


def he_texture(height, width, seed=0):
    """Tissue everywhere: pink 'stroma' with purple 'nuclei', H&E's colours, with a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width].astype(np.float32)
    nuclei = np.sin(x / 6 + 3 * np.sin(y / 50)) * np.sin(y / 7 + 3 * np.sin(x / 40)) > 0.7
    colour = np.where(nuclei[..., None], [110, 60, 150], [230, 160, 200]).astype(np.float32)
    return (colour + rng.normal(0, 6, colour.shape)).clip(0, 255).astype(np.uint8)


def draw_pen(image, colour, x0, y0, x1, y1, seed=0):
    """A pen stroke: the box [x0, x1) x [y0, y1) of `image` in a PEN_COLOURS ink, a little uneven."""
    rng = np.random.default_rng(seed)
    ink = np.asarray(PEN_COLOURS[colour], np.float32) + rng.normal(0, 5, (y1 - y0, x1 - x0, 3))
    image[y0:y1, x0:x1] = ink.clip(0, 255).astype(np.uint8)
    return image
