"""Synthetic whole-slide images for the tiling tests and `bench.py tiling`: an H&E-coloured test
pattern, pen strokes over it, written as a tiled pyramidal TIFF that OpenSlide opens (as
"generic-tiff") with a known µm/px.

Pillow cannot write tiled TIFFs (it drops the tile tags) and tifffile is not a dependency, so the
TIFF bytes are laid out here by hand: one IFD (image file directory) per pyramid level.
"""
import io
import os
import struct

import numpy as np
from PIL import Image


def _tiff_entry(tag, kind, *values):
    """One IFD entry as (tag, type, count, packed values); kind 3 SHORT, 4 LONG, 5 RATIONAL."""
    code = {3: "H", 4: "I", 5: "I"}[kind]
    count = len(values) // 2 if kind == 5 else len(values)
    return tag, kind, count, struct.pack(f"<{len(values)}{code}", *values)


def _write_ifd(f, entries):
    """Values over 4 bytes go first, then the IFD; returns (IFD offset, its next-IFD pointer)."""
    packed = []
    for tag, kind, count, data in sorted(entries):
        if len(data) > 4:
            f.write(b"\0" * (f.tell() % 2))  # word alignment
            offset = f.tell()
            f.write(data)
            data = struct.pack("<I", offset)
        packed.append(struct.pack("<HHI", tag, kind, count) + data.ljust(4, b"\0"))
    f.write(b"\0" * (f.tell() % 2))
    ifd = f.tell()
    f.write(struct.pack("<H", len(packed)) + b"".join(packed) + struct.pack("<I", 0))
    return ifd, ifd + 2 + 12 * len(packed)


def write_pyramid_tiff(path, image, mpp, downsamples=(1, 4), tile=256, jpeg_quality=None):
    """A tiled pyramidal TIFF OpenSlide reads as generic-tiff, with openslide.mpp-x = mpp.

    Pillow cannot write tiled TIFFs (it drops the tile tags), hence the bytes laid out here:
    one IFD per level (box-averaged by whole factors), raw or JPEG tiles, resolution per cm."""
    with open(path, "wb") as f:
        f.write(b"II*\0" + struct.pack("<I", 0))  # little-endian; first IFD pointer patched below
        pointer = 4
        for d in downsamples:
            level = np.asarray(Image.fromarray(image).reduce(d)) if d > 1 else image
            h, w = level.shape[:2]
            padded = np.full((-(-h // tile) * tile, -(-w // tile) * tile, 3), 255, np.uint8)
            padded[:h, :w] = level
            offsets, counts = [], []
            for ty in range(0, padded.shape[0], tile):
                for tx in range(0, padded.shape[1], tile):
                    data = _tile_bytes(padded[ty:ty + tile, tx:tx + tile], jpeg_quality)
                    offsets.append(f.tell())
                    counts.append(len(data))
                    f.write(data)
            per_cm = round(1e4 / (mpp * d) * 1000)
            entries = [_tiff_entry(254, 4, int(d > 1)), _tiff_entry(256, 4, w), _tiff_entry(257, 4, h),
                       _tiff_entry(258, 3, 8, 8, 8), _tiff_entry(259, 3, 7 if jpeg_quality else 1),
                       _tiff_entry(262, 3, 6 if jpeg_quality else 2), _tiff_entry(277, 3, 3),
                       _tiff_entry(282, 5, per_cm, 1000), _tiff_entry(283, 5, per_cm, 1000),
                       _tiff_entry(284, 3, 1), _tiff_entry(296, 3, 3), _tiff_entry(322, 3, tile),
                       _tiff_entry(323, 3, tile), _tiff_entry(324, 4, *offsets),
                       _tiff_entry(325, 4, *counts)]
            if jpeg_quality:
                entries.append(_tiff_entry(530, 3, 2, 2))  # YCbCr 4:2:0, Pillow's default
            ifd, next_pointer = _write_ifd(f, entries)
            f.seek(pointer)
            f.write(struct.pack("<I", ifd))
            f.seek(0, os.SEEK_END)
            pointer = next_pointer


def _tile_bytes(tile, jpeg_quality):
    if not jpeg_quality:
        return tile.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, "JPEG", quality=jpeg_quality)
    return buffer.getvalue()


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
