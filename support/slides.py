"""Reading whole-slide images: µm per pixel, pyramid levels, tiles at a target MPP, coordinates.

CytoSyn tech report (arXiv 2603.18089) §3.2: tiles of 224 x 224 px at 0.5 µm/px (20x). This
file knows how to read them; tiling.py decides which ones to read. Here:

- open_slide: any OpenSlide format, or a plain image through OpenSlide's Pillow-backed ImageSlide.
- resolve_mpp: level-0 µm/px and where it came from: `--mpp-csv`, `--slide-mpp`, `openslide.mpp-x`,
  vendor keys, the TIFF resolution, then the objective power (mpp = 10 / power).
- slide_geometry / read_tile_at: the coarsest level at or finer than the target, one read_region and
  one antialiased resize per tile, placed exactly by its level-0 top-left corner.
- write_coords / read_coords: TRIDENT- and CLAM-compatible HDF5 coordinates (`coords`, (N, 2)
  level-0 top-left x, y, with `patch_size`, `patch_size_level0`, `patch_level`, ...).
- SlideTileReader: a manifest row back to its tile's pixels, for training straight from slides.

Deliberately left out: colour management (ICC profiles are ignored), non-square pixels (mpp-y is
assumed equal to mpp-x), DICOM folders as one slide.
"""
import csv
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import openslide
from PIL import Image, ImageDraw
from tqdm import tqdm

from support.cli import InputError, MissingInput
from support.outputs import atomic
from support.tiles import IMAGE_EXTENSIONS, RESIZE_KERNELS, SLIDE_EXTENSIONS

# Plain images given as slides are large by design; Pillow's decompression-bomb guard (about 89 Mpx)
# would refuse them.
Image.MAX_IMAGE_PIXELS = None

PREVIEW_MAX_PX = 1024  # tiling.py's previews: the longer side
SPLIT_COLOURS = {"train": (0, 160, 0), "val_in": (0, 90, 255), "val_out": (255, 120, 0)}
INK_COLOUR = (255, 0, 255)  # the preview tints dropped pen ink magenta
MPP_TOLERANCE = 0.02      # 0.499 or 0.504 µm/px counts as 0.5: scanners are calibrated no better
KERNEL_REACH = 3          # pixels a resampling kernel reaches at scale 1 (Lanczos-3, the widest)
PLAUSIBLE_MPP = (0.05, 20.0)  # a fallback key outside this is a placeholder (72 dpi), not a scan
# Vendor keys OpenSlide passes through, in the order tried; each value -> µm per pixel.
# Files a slide folder may hold: OpenSlide's formats and plain images are slides; anything else is one only
# if OpenSlide or Pillow recognises its bytes. manifest.csv and tiling.json are tiling.py's own output.
SLIDE_FILES = set(SLIDE_EXTENSIONS) | set(IMAGE_EXTENSIONS)
OUTPUT_FILES = {"manifest.csv", "tiling.json"}
VENDOR_MPP_KEYS = {
    "aperio.MPP": float,
    "openslide.mirax.MPP": float,
    "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X": float,
    "hamamatsu.XResolution": lambda v: 1e4 / float(v),  # NDPI: pixels per centimetre
}
UM_PER_RESOLUTION_UNIT = {"centimeter": 1e4, "inch": 25400.0}  # tiff.ResolutionUnit -> µm
TARGET_MAGNIFICATION_MPP = 10.0  # 20x = 0.5 µm/px: magnification = 10 / mpp


class SlideError(InputError):
    """A problem with one slide that its owner can fix; the run skips the slide and goes on."""


def open_slide(path):
    try:  # OpenSlide for whole-slide formats, its Pillow-backed ImageSlide for plain images
        with warnings.catch_warnings():  # Pillow's complaints about a non-image; ours says it plainly
            warnings.simplefilter("ignore")
            return openslide.open_slide(str(path))
    except (openslide.OpenSlideError, OSError) as e:  # Pillow's UnidentifiedImageError is an OSError
        raise SlideError(f"corrupt or truncated: neither OpenSlide nor Pillow can read it ({e})") from e


# -------- µm per pixel: explicit values first, then the metadata, then the objective power --------

def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def metadata_mpp(properties):
    """(level-0 µm/px, the key it came from) from the slide's properties, or (None, None)."""
    # NOTE: unlike TRIDENT's fallbacks, values from vendor keys and the TIFF resolution are kept only within
    # PLAUSIBLE_MPP: images saved by ordinary software carry 72 or 96 dpi, which is no microscope's resolution.
    mpp = _number(properties.get(openslide.PROPERTY_NAME_MPP_X))
    if mpp:
        return mpp, openslide.PROPERTY_NAME_MPP_X
    for key, to_mpp in VENDOR_MPP_KEYS.items():
        value = _number(properties.get(key))
        if value and PLAUSIBLE_MPP[0] <= to_mpp(value) <= PLAUSIBLE_MPP[1]:
            return to_mpp(value), key
    per_unit = _number(properties.get("tiff.XResolution"))
    unit = UM_PER_RESOLUTION_UNIT.get(properties.get("tiff.ResolutionUnit", ""))
    if per_unit and unit and PLAUSIBLE_MPP[0] <= unit / per_unit <= PLAUSIBLE_MPP[1]:
        return unit / per_unit, "tiff-resolution"
    return None, None


def resolve_mpp(slide, csv_mpp=None, global_mpp=None):
    """Level-0 µm/px of a slide and its source, one of: "csv", "--slide-mpp", a metadata key
    ("openslide.mpp-x", "aperio.MPP", ...), "tiff-resolution", "objective-power"."""
    # NOTE: the field's order puts the metadata first; here a value the user typed wins (a `--mpp-csv` row,
    # then `--slide-mpp`), because it is given to correct metadata that is wrong or missing. The objective
    # power comes last: it names a lens, not the scanner's pixel.
    if csv_mpp:
        return float(csv_mpp), "csv"
    if global_mpp:
        return float(global_mpp), "--slide-mpp"
    mpp, source = metadata_mpp(slide.properties)
    if mpp:
        return mpp, source
    power = _number(slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power:
        return TARGET_MAGNIFICATION_MPP / power, "objective-power"  # 20x = 0.5 µm/px
    check_readable(slide)  # a damaged file is named as one, not sent looking for its MPP
    raise SlideError("no MPP in its metadata (openslide.mpp-x, vendor keys, TIFF resolution) and no "
                     "objective power: pass --slide-mpp, or a row for it in --mpp-csv (µm per level-0 pixel)")


def slide_mpp(slide, override=None):
    """Level-0 µm/px: `override` (--slide-mpp) if given, else as resolve_mpp finds it."""
    return resolve_mpp(slide, global_mpp=override)[0]


def check_readable(slide):
    """Raise SlideError when the slide's pixels cannot be decoded (probed at two corners)."""
    width, height = slide.dimensions
    try:
        for level in {0, slide.level_count - 1}:
            ds = slide.level_downsamples[level]
            slide.read_region((0, 0), level, (1, 1))
            slide.read_region((int(width - ds), int(height - ds)), level, (1, 1))
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(f"corrupt or truncated: its header reads but its pixels do not ({e})") from e


def read_mpp_csv(path):
    """--mpp-csv: {slide file name or stem: level-0 µm/px} from columns `slide` and `mpp`."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"--mpp-csv {path}: cannot read it ({e.strerror})")
    if not rows or not {"slide", "mpp"} <= set(rows[0]):
        raise InputError(f"--mpp-csv {path}: needs a header with columns slide,mpp and one row per slide")
    table, lines, repeated = {}, {}, []
    for n, row in enumerate(rows, start=2):
        mpp, name = _number(row["mpp"]), (row["slide"] or "").strip()
        if not mpp or not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            raise InputError(f"--mpp-csv {path} line {n}: mpp {row['mpp']!r} is not a number in "
                             f"[{PLAUSIBLE_MPP[0]}, {PLAUSIBLE_MPP[1]}] µm per pixel")
        if name in table and table[name] != mpp:  # which one is right? The slide's scale depends on it
            raise InputError(f"--mpp-csv {path}: slide {name!r} has two values, {table[name]} (line {lines[name]}) "
                             f"and {mpp} (line {n}): keep one row per slide")
        if name in table:
            repeated.append(name)
        table[name], lines[name] = mpp, lines.get(name, n)
    if repeated:
        print(f"note: --mpp-csv {path}: {len(repeated)} repeated rows with the same value, read once: "
              f"{', '.join(sorted(set(repeated)))}", file=sys.stderr)
    return table


def csv_mpp_for(table, path):
    """The --mpp-csv value for a slide file, looked up by file name, then by stem."""
    path = Path(path)
    return table.get(path.name, table.get(path.stem))


# -------- A folder of slides: what is a slide, what is not, and what is tiling.py's own output ----

def looks_like_a_slide(path):
    """A slide extension, else bytes that OpenSlide or Pillow recognise."""
    if path.suffix.lower() in SLIDE_FILES or openslide.OpenSlide.detect_format(str(path)):
        return True
    try:
        with warnings.catch_warnings(), Image.open(path):
            warnings.simplefilter("ignore")
            return True
    except (OSError, ValueError):
        return False


def sort_folder(folder):
    """(slides, files that are not slides, our own outputs) among the files of SLIDES_DIR.
    Folders are never slides, so OUT_DIR inside SLIDES_DIR is skipped with them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"--slides {folder}: not a folder; give the folder that holds the slides")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    ours = [p for p in files if p.name in OUTPUT_FILES]
    slides = [p for p in files if p not in ours and looks_like_a_slide(p)]
    return slides, [p for p in files if p not in ours and p not in slides], ours


def list_slides(folder):
    """The slide paths of SLIDES_DIR; one line each for what is skipped as not a slide."""
    slides, others, ours = sort_folder(folder)
    if ours:
        tqdm.write(f"skipped tiling.py's own output: {', '.join(p.name for p in ours)}", file=sys.stderr)
    if others:
        tqdm.write(f"not a slide, skipped ({len(others)}): {', '.join(p.name for p in others)}", file=sys.stderr)
    return slides


def mpp_table(path, slides):
    """--mpp-csv as {name: mpp}; one line for the rows that name no slide of the folder."""
    if not path:
        return {}
    table = read_mpp_csv(path)
    for p in slides:  # a row by file name and another by stem, disagreeing: the same slide twice
        if table.get(p.name, table.get(p.stem)) != table.get(p.stem, table.get(p.name)):
            raise InputError(f"--mpp-csv {path}: slide {p.name} has two values, {table[p.name]} (as {p.name}) and "
                             f"{table[p.stem]} (as {p.stem}): keep one row per slide")
    names = {p.name for p in slides} | {p.stem for p in slides}
    unknown = sorted(name for name in table if name not in names)
    if unknown:
        tqdm.write(f"--mpp-csv {path}: {len(unknown)} rows name no slide in the folder, ignored: "
                   f"{', '.join(unknown)}", file=sys.stderr)
    return table


# -------- Levels and the output-pixel geometry ----------------------------------------------------

def choose_level(level_mpps, target_mpp):
    """Index of the coarsest level whose MPP is at or finer than the target (within tolerance)."""
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + MPP_TOLERANCE)]
    if not fine_enough:
        raise SlideError(f"its finest level is {min(level_mpps):.3f} µm/px, coarser than the target "
                         f"{target_mpp} µm/px; tiles would have to be upsampled")
    return max(fine_enough, key=lambda i: level_mpps[i])


def level_scale(level_mpp, target_mpp):
    """Level pixels per output pixel, snapped to a whole number within MPP_TOLERANCE."""
    # NOTE: the paper resamples to 0.5 µm/px exactly; snapping keeps native 20x pixels untouched (0.499 µm/px
    # is read 1:1 rather than shrunk by 0.2%, which would blur every tile); the manifest records the true MPP.
    scale = target_mpp / level_mpp
    whole = round(scale)
    return float(whole) if whole >= 1 and abs(scale - whole) <= MPP_TOLERANCE * scale else scale


@dataclass
class Geometry:
    """How output pixels map onto the slide: output pixel u covers level pixels [u*scale, (u+1)*scale)."""
    level: int
    downsample: float  # level-0 pixels per level pixel
    scale: float       # level pixels per output pixel: 1 = copy, 2 = halve, ...
    mpp: float         # µm per output pixel: what the tiles really are
    slide_mpp: float   # µm per level-0 pixel
    size: int          # tile side in output pixels

    @property
    def step(self):  # level-0 pixels per tile
        return self.size * self.scale * self.downsample


def slide_geometry(slide, mpp, target_mpp, size):
    if not mpp > 0:
        raise SlideError(f"its MPP reads {mpp}, not a positive number: pass --slide-mpp")
    level = choose_level([mpp * d for d in slide.level_downsamples], target_mpp)
    downsample = slide.level_downsamples[level]
    scale = level_scale(mpp * downsample, target_mpp)
    return Geometry(level, downsample, scale, mpp * downsample * scale, mpp, size)


def to_rgb(region):
    """OpenSlide's RGBA region (transparent outside the scanned area) as an RGB image on white."""
    if region.getchannel("A").getextrema()[0] == 255:
        return region.convert("RGB")
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, region).convert("RGB")


def thumbnail(slide, downsample):
    """RGB thumbnail of about `downsample` level-0 px per px and its exact scale, read in strips.

    Box-averaging by a whole factor keeps the scale exact and memory bounded on slides
    without a low-resolution level."""
    level = slide.get_best_level_for_downsample(downsample)
    level_ds = slide.level_downsamples[level]
    factor = max(1, int(downsample / level_ds))
    w, h = (n // factor * factor for n in slide.level_dimensions[level])
    strip = factor * max(1, (1 << 22) // max(w, 1) // factor)  # about 4 Mpx per read
    rows = []
    for y in range(0, h, strip):
        region = slide.read_region((0, round(y * level_ds)), level, (w, min(strip, h - y)))
        rows.append(np.asarray(to_rgb(region).reduce(factor)))
    return np.concatenate(rows), level_ds * factor


# -------- Tiles: one read_region and one exact resize per tile ------------------------------------

def read_output_pixels(slide, geo, u0, v0, width, height, resample):
    """Output pixels [u0, u0 + width) x [v0, v0 + height) of the slide at the target MPP
    (u0, v0 may be fractional).

    One read_region, then one resize whose float `box` puts every output pixel exactly where
    the Geometry says, whatever the integer rounding of the read."""
    ds, r = geo.downsample, geo.scale
    if r == 1:  # native pixels: a crop, no resampling at all
        return np.asarray(to_rgb(slide.read_region((round(u0 * ds), round(v0 * ds)), geo.level,
                                                   (width, height))))
    pad = math.ceil(KERNEL_REACH * r) + 1  # the antialiased kernel reads this far beyond the box
    x0, y0 = math.floor(u0 * r) - pad, math.floor(v0 * r) - pad
    x1, y1 = math.ceil((u0 + width) * r) + pad, math.ceil((v0 + height) * r) + pad
    region = to_rgb(slide.read_region((round(x0 * ds), round(y0 * ds)), geo.level, (x1 - x0, y1 - y0)))
    box = (u0 * r - x0, v0 * r - y0, (u0 + width) * r - x0, (v0 + height) * r - y0)
    return np.asarray(region.resize((width, height), resample, box=box))


def read_tile_at(slide, geo, x, y, context, resample):
    """The (size + 2 context)^2 tile whose size^2 centre has level-0 top-left (x, y). The size^2
    tile is cut from its centre, never read on its own, so the two agree bit for bit.

    The tile starts exactly at the manifest's integer (x, y), so a manifest row gives back its tile;
    where a grid step is fractional in level-0 pixels (unsnapped scales), this moves a tile by under
    half a level-0 pixel from the exact grid. Reading blocks of neighbouring tiles at once ran at
    0.9-0.96x the speed of this per-tile read: OpenSlide's tile cache already decodes each JPEG tile once."""
    per_output_px = geo.scale * geo.downsample  # level-0 px per output px
    n = geo.size + 2 * context
    return read_output_pixels(slide, geo, x / per_output_px - context, y / per_output_px - context,
                              n, n, resample)


# -------- Coordinates in TRIDENT / CLAM's HDF5 layout ---------------------------------------------

def write_coords(path, coords, geo, slide_id):
    """OUT/coords/<slide>.h5: dataset `coords` (N, 2) int64 level-0 top-left (x, y), and the
    attributes TRIDENT writes (patch_size, patch_size_level0, level0_magnification,
    target_magnification), CLAM's patch_level, and ours (mpp, slide_mpp, name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    with atomic(path, coords.nbytes, "at least") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=coords)
        f["coords"].attrs.update({
            "patch_size": geo.size, "patch_size_level0": round(geo.step), "patch_level": geo.level,
            "level0_magnification": round(TARGET_MAGNIFICATION_MPP / geo.slide_mpp, 3),
            "target_magnification": round(TARGET_MAGNIFICATION_MPP / geo.mpp, 3),
            "mpp": geo.mpp, "slide_mpp": geo.slide_mpp, "name": slide_id, "overlap": 0})


def read_coords(path, slide, slide_id):
    """(coords (N, 2) int64 level-0 top-left, patch side in level-0 px) from a TRIDENT or CLAM file.

    Raises SlideError when the file is missing, names another slide, or holds points outside
    this slide. The patch side comes from `patch_size_level0` (TRIDENT) or from `patch_size`
    at `patch_level` (CLAM)."""
    if not Path(path).is_file():
        raise SlideError(f"--from-coords: no coordinates file {path}")
    try:
        with h5py.File(path, "r") as f:
            coords, attrs = f["coords"][()], {**f.attrs, **f["coords"].attrs}
    except (OSError, KeyError) as e:
        raise SlideError(f"--from-coords: {path} is not an HDF5 file with a `coords` dataset ({e})") from e
    name = attrs.get("name")
    name = name.decode() if isinstance(name, bytes) else name
    if name is not None and str(name) != slide_id:
        raise SlideError(f"--from-coords: {path} is for slide {name!r} (its `name` attribute), not this one")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SlideError(f"--from-coords: {path}: `coords` has shape {coords.shape}, expected (N, 2)")
    if "patch_size_level0" in attrs:
        side = float(attrs["patch_size_level0"])
    elif "patch_size" in attrs:
        side = float(attrs["patch_size"]) * slide.level_downsamples[int(attrs.get("patch_level", 0))]
    else:
        raise SlideError(f"--from-coords: {path} has neither `patch_size_level0` nor `patch_size`")
    width, height = slide.dimensions
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        raise SlideError(f"--from-coords: {outside.sum()} of {len(coords)} points in {path} lie outside "
                         f"the slide ({width} x {height} px): a file for another slide?")
    return coords.astype(np.int64), side


def centred_tiles(coords, their_side, our_step):
    """Level-0 top-left of our tiles centred on their patches: (x + their_side/2 - our_step/2)."""
    return np.round(coords + (their_side - our_step) / 2).astype(np.int64)


# -------- Training from slides: a manifest row back to its pixels ---------------------------------

class SlideTileReader:
    """Tiles straight from the slides, identical to the PNGs tiling.py wrote.

        reader = SlideTileReader("SLIDES_DIR")          # the folder tiling.py read
        tile = reader.read(row)                          # uint8 (size, size, 3)

    `row` is a manifest.csv row (a dict of strings as csv.DictReader gives it) and needs the
    columns slide_file, x, y, level, scale, size (tiling.py writes them). Slides are opened on
    first use and kept open: make one reader per data worker (create it lazily inside the
    worker, not before a fork). `resample` must be the kernel of the tiling run (tiling.json)."""

    def __init__(self, slides_dir, resample="lanczos"):
        self.slides_dir = Path(slides_dir)
        self.resample = RESIZE_KERNELS[resample]
        self.slides = {}  # slide file name -> open slide handle

    def slide(self, name):
        if name not in self.slides:
            self.slides[name] = open_slide(self.slides_dir / name)
        return self.slides[name]

    def read(self, row):
        slide, level = self.slide(row["slide_file"]), int(row["level"])
        geo = Geometry(level, slide.level_downsamples[level], float(row["scale"]), 0.0, 0.0, int(row["size"]))
        return read_tile_at(slide, geo, int(row["x"]), int(row["y"]), 0, self.resample)

    def close(self):
        for slide in self.slides.values():
            slide.close()
        self.slides.clear()


# -------- The preview of a tiled slide -------------------------------------------------------------

def save_tiling_preview(path, slide, tissue, step, rows):
    """tiling.py's preview of a slide: a thumbnail of about PREVIEW_MAX_PX, dimmed outside the tissue mask,
    pen ink tinted magenta (dropped), kept tiles (level-0 side `step`) outlined in their split's colour, and
    a legend of the colours: the way to check the mask by eye."""
    thumb, scale = thumbnail(slide, math.ceil(max(slide.dimensions) / PREVIEW_MAX_PX))
    size = (thumb.shape[1], thumb.shape[0])
    mask, ink = (np.asarray(Image.fromarray(m).resize(size, Image.Resampling.NEAREST))[..., None]
                 for m in (tissue.mask, tissue.ink))
    tinted = (thumb.astype(np.uint16) + INK_COLOUR) // 2
    image = np.where(ink, tinted, np.where(mask, thumb, thumb // 3 + 150))
    image = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for row in rows:
        x, y, side = row["x"] / scale, row["y"] / scale, step / scale
        draw.rectangle([x, y, x + side, y + side], outline=SPLIT_COLOURS[row["split"]])
    legend = {**SPLIT_COLOURS, "pen ink (dropped)": INK_COLOUR}
    for k, (label, colour) in enumerate(legend.items()):
        draw.text((4, 4 + 12 * k), label, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        image.save(tmp, compress_level=1)
