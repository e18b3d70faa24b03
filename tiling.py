"""Whole-slide images to training and validation tiles: 224 x 224 px at 0.5 µm/px from tissue (CytoSyn §3.2).

Tiles of 224 x 224 px at 0.5 µm/px (20x) from the tissue of each slide, lossless PNG, sampled so that the TCGA
tissue source sites (TSS, `TCGA-XX-...`) keep their share; val-out (tiles of held-out patients) and val-in
(other tiles of training slides) for §4.1; §4.3's ablations as flags: `--context 16` also writes the 256 px
tile around the same centre (the 224 tile is its centre crop, bit for bit with PNG), `--jpeg 70` DS-MIL's JPEG.

    python tiling.py --slides SLIDES_DIR --out OUT              # OUT/tiles/, manifest.csv, coords/, previews/
    python tiling.py --slides SLIDES_DIR --out OUT --from-coords TRIDENT_DIR/patches   # another pipeline's patches

Per slide: MPP (support/slides.resolve_mpp) -> the coarsest pyramid level at or finer than the target ->
tissue mask on a thumbnail, pen ink removed -> a grid of non-overlapping candidate tiles -> sampling and
splits -> each tile read once and resampled with a named antialiased kernel -> tiles, a preview PNG,
coords/<slide>.h5 (TRIDENT/CLAM layout), a CSV, and last a done-marker (so a killed run resumes).
--from-coords DIR skips the grid and the sampling: each patch of DIR/<slide>.h5 gives our tile centred on it,
kept when its tissue (outside the slide: none) is at least --min-tissue, as a grid tile's.

Left out: the paper's tissue-detection model and artefact filters (folds, bubbles, blur; a saturation/Otsu
threshold and a colour rule for pen stand in), the v2 curation to 108M tiles, stain normalisation (the paper
names none), TSS-stratified choice of the val-out patients (chosen by a seeded hash of the barcode).
"""
import argparse
import json
import multiprocessing
import re
import shutil
import signal
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from support.cli import IMAGE_SIZE, SEED, ArgumentParser, DiskFull, InputError, MissingInput, number_in, run
from support.outputs import PNG_OVERHEAD, atomic, claim_output_folder, read_csv, save_csv, save_json
from support.slides import (
    SlideError,
    centred_tiles,
    csv_mpp_for,
    list_slides,
    mpp_table,
    open_slide,
    read_coords,
    read_tile_at,
    resolve_mpp,
    save_tiling_preview,
    slide_geometry,
    thumbnail,
    write_coords,
)
from support.tiles import RESIZE_KERNELS, TILE_MPP, TILE_SIZE

THUMB_PX_PER_TILE = 16    # the tissue mask sees each tile as about 16 x 16 pixels
MIN_SATURATION = 0.07     # floor under the Otsu threshold, so glass and a blank slide stay background
MIN_OBJECT_TILES = 0.25   # tissue pieces smaller than a quarter of a tile are dust
MAX_INK_FRACTION = 0.02   # a tile with more pen ink than this (about 5 thumbnail pixels) is dropped
PNG_COMPRESS_LEVEL = 3    # lossless either way; on H&E tiles 1.35x faster than Pillow's 6, +5% bytes
MANIFEST_FIELDS = ["slide_id", "slide_file", "tss", "x", "y", "level", "scale", "size", "mpp",
                   "slide_mpp", "mpp_source", "tissue", "file", "context_file", "split"]
# Files a slide folder may hold: OpenSlide's formats and plain images are slides; anything else
# is one only if OpenSlide or Pillow recognises its bytes.


# -------- Tissue: a saturation mask on a thumbnail, minus pen ink, then the grid cells it covers ---

def otsu_threshold(values, bins=256):
    """Otsu (1979): the threshold on [0, 1] that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0, 1))
    centres = (edges[:-1] + edges[1:]) / 2
    n0 = np.cumsum(hist)                 # pixels at or below each candidate threshold
    n1 = n0[-1] - n0
    s0 = np.cumsum(hist * centres)
    mean0 = s0 / np.maximum(n0, 1)
    mean1 = (s0[-1] - s0) / np.maximum(n1, 1)
    between = n0 * n1 * (mean0 - mean1) ** 2
    return edges[np.argmax(between) + 1]


def tissue_mask(rgb, min_object_px):
    """Tissue = HSV saturation above Otsu's threshold (and a floor), holes filled, dust removed."""
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = (high - low) / np.maximum(high, 1)  # HSV saturation: glass is grey-white, H&E is not
    mask = saturation > max(otsu_threshold(saturation), MIN_SATURATION)
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_object_px
    keep[0] = False
    return keep[labels]


def ink_mask(rgb):
    """Pen marks by colour on a thumbnail: blue (hue 190-245°), green (hue 70-170°), black. H&E stays out:
    eosin is pink (hue 300-350°), haematoxylin purple (250-290°), the darkest nuclei on the CMU slide keep a
    channel above 44, and the saturation floors keep out grey glass and pale stain."""
    # NOTE: the paper drops pen marks with its artefact filters (a model); this colour rule stands in, and
    # misses red pen, which eosin hides.
    hue = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 0] * (360 / 255)  # uint8 RGB in
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = (high - low) / np.maximum(high, 1)
    blue = (hue >= 190) & (hue < 245) & (saturation > 0.45)
    green = (hue >= 70) & (hue < 170) & (saturation > 0.3)
    black = high < 40
    return blue | green | black


def box_fractions(mask, x0, y0, x1, y1):
    """Mean of `mask` over each box [x0, x1) x [y0, y1) (mask pixels, rounded to whole ones)."""
    xa, xb = (np.clip(np.round(v).astype(int), 0, mask.shape[1]) for v in (x0, x1))
    ya, yb = (np.clip(np.round(v).astype(int), 0, mask.shape[0]) for v in (y0, y1))
    sums = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image
    total = sums[yb, xb] - sums[ya, xb] - sums[yb, xa] + sums[ya, xa]
    return total / np.maximum((xb - xa) * (yb - ya), 1)


@dataclass
class Tissue:
    mask: np.ndarray      # (h, w) bool tissue, pen ink removed, on a thumbnail
    ink: np.ndarray       # (h, w) bool pen ink found (all False with --no-ink-filter)
    scale: float          # level-0 pixels per thumbnail pixel
    x: np.ndarray         # level-0 left edge of each candidate tile
    y: np.ndarray         # level-0 top edge
    fraction: np.ndarray  # tissue fraction of each candidate
    dropped: int = 0      # --from-coords: patches whose tile has less tissue than --min-tissue


def slide_masks(slide, geo, ink_filter):
    """(tissue mask, ink mask, level-0 px per mask px) on a thumbnail of 16 px per tile."""
    thumb, scale = thumbnail(slide, geo.step / THUMB_PX_PER_TILE)
    tissue = tissue_mask(thumb, MIN_OBJECT_TILES * THUMB_PX_PER_TILE ** 2)
    ink = ink_mask(thumb) if ink_filter else np.zeros_like(tissue)
    return tissue & ~ink, ink, scale


def find_tissue(slide, geo, min_tissue, ink_filter=True):
    """Grid cells (non-overlapping tiles from the level-0 origin) with tissue >= min_tissue and
    pen ink <= MAX_INK_FRACTION."""
    mask, ink, scale = slide_masks(slide, geo, ink_filter)
    width, height = slide.dimensions
    iy, ix = np.mgrid[:int(height // geo.step), :int(width // geo.step)].reshape(2, -1)  # raster order
    edges = (ix * geo.step / scale, iy * geo.step / scale, (ix + 1) * geo.step / scale,
             (iy + 1) * geo.step / scale)
    fraction, ink_fraction = box_fractions(mask, *edges), box_fractions(ink, *edges)
    keep = (fraction >= min_tissue) & (ink_fraction <= MAX_INK_FRACTION)
    x, y = np.round(ix[keep] * geo.step).astype(int), np.round(iy[keep] * geo.step).astype(int)
    return Tissue(mask, ink, scale, x, y, fraction[keep])


def tissue_at_coords(slide, geo, path, slide_id, min_tissue):
    """--from-coords: our tiles centred on the patches of DIR/<slide>.h5, in its order, those with tissue
    >= min_tissue (the grid's rule): a patch at the slide's edge gives a tile that is mostly padding, and
    what lies outside the slide counts as no tissue."""
    coords, their_side = read_coords(path, slide, slide_id)
    tiles = centred_tiles(coords, their_side, geo.step)
    _, first = np.unique(tiles, axis=0, return_index=True)
    tiles = tiles[np.sort(first)]  # two patches closer than a pixel give one tile
    mask, ink, scale = slide_masks(slide, geo, ink_filter=False)
    x, y = tiles[:, 0], tiles[:, 1]
    inside = np.prod([(np.clip(v + geo.step, 0, n) - np.clip(v, 0, n)) / geo.step
                      for v, n in ((x, slide.dimensions[0]), (y, slide.dimensions[1]))], axis=0)
    fraction = inside * box_fractions(mask, x / scale, y / scale, (x + geo.step) / scale, (y + geo.step) / scale)
    keep = fraction >= min_tissue
    return Tissue(mask, ink, scale, x[keep], y[keep], fraction[keep], int((~keep).sum()))


def write_tile_image(array, path, jpeg_quality):
    """A tile as lossless PNG, or as JPEG at jpeg_quality (DS-MIL's 70; Pillow's 4:2:0 chroma subsampling);
    atomically, so a full disk leaves no half-written tile."""
    image = Image.fromarray(array)
    with atomic(path, array.nbytes + PNG_OVERHEAD, "at most") as tmp:
        if jpeg_quality:
            image.save(tmp, "JPEG", quality=jpeg_quality)
        else:
            image.save(tmp, "PNG", compress_level=PNG_COMPRESS_LEVEL)


# -------- Sampling and splits ---------------------------------------------------------------------

def tss_code(slide_id):
    """Tissue source site: the two characters after `TCGA-` in a TCGA barcode, else ''."""
    match = re.match(r"TCGA-([A-Z0-9]{2})-", slide_id)
    return match.group(1) if match else ""


def patient_id(slide_id):
    """TCGA patient barcode (`TCGA-XX-XXXX`, the first 12 characters), else the slide id itself."""
    match = re.match(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", slide_id)
    return match.group(0) if match else slide_id


def val_out_slides(slide_ids, fraction, seed):
    """Slides held out for val-out: every slide of round(fraction * n) of the n patients, so that no
    patient has slides on both sides; at least one patient on each side when fraction > 0 and there
    are two patients or more. Patients are ranked by a seeded hash of their id, not by a shuffle
    of the list, so a slide that joins or drops out of the folder moves at most two patients
    across instead of redrawing the whole held-out set."""
    patients = sorted({patient_id(s) for s in slide_ids})
    n = len(patients)
    count = round(fraction * n)
    if fraction > 0 and n >= 2:
        count = min(max(count, 1), n - 1)
    ranked = sorted(patients, key=lambda p: (zlib.crc32(f"{seed}:{p}".encode()), p))
    held_out = set(ranked[:count])
    return {s for s in slide_ids if patient_id(s) in held_out}


def water_fill(counts, quota):
    """Share `quota` tiles over slides with `counts` candidates as evenly as their counts allow."""
    shares = [0] * len(counts)
    left = quota
    for rank, k in enumerate(sorted(range(len(counts)), key=lambda k: counts[k])):
        shares[k] = min(counts[k], left // (len(counts) - rank))
        left -= shares[k]
    return shares


def allocate(plans, per_slide, stratify):
    """Tiles to take from each slide (dict slide id -> count).

    Without a cap: every candidate. With --max-tiles-per-slide K: min(K, candidates). With
    --stratify tss as well, each (TSS, split) group gets K tiles per slide and a slide short of
    tissue hands its unused share to the others of its group, so each TSS's share of the tiles
    is its share of the slides (paper §3.2)."""
    if per_slide is None:
        return {p["slide_id"]: p["n_candidates"] for p in plans}
    if stratify != "tss":
        return {p["slide_id"]: min(per_slide, p["n_candidates"]) for p in plans}
    groups = {}
    for p in plans:
        groups.setdefault((p["tss"], p["split"]), []).append(p)
    shares = {}
    for group in groups.values():
        counts = [p["n_candidates"] for p in group]
        for p, share in zip(group, water_fill(counts, per_slide * len(group))):
            shares[p["slide_id"]] = share
    return shares


def sample_tiles(tissue, n_tiles, split, val_in, rng):
    """Indices of the candidates to keep (raster order) and the split of each."""
    n = len(tissue.x)
    chosen = np.sort(rng.choice(n, size=min(n_tiles, n), replace=False))
    splits = np.full(len(chosen), split, dtype=object)
    if split == "train" and val_in > 0:  # val-in: other grid cells of training slides
        splits[rng.choice(len(chosen), size=round(val_in * len(chosen)), replace=False)] = "val_in"
    return chosen, splits


# -------- One slide: plan (count candidates), then tile (read, save, preview, coords, CSV, done-marker) ---

def prepare(job):
    """Open the slide and find its candidates; the same answer in the plan and the tile pass."""
    s = job["settings"]
    slide = open_slide(job["path"])
    mpp, source = resolve_mpp(slide, job["csv_mpp"], s["slide_mpp"])
    geo = slide_geometry(slide, mpp, s["mpp"], s["image_size"])
    if s["from_coords"]:
        tissue = tissue_at_coords(slide, geo, Path(s["from_coords"]) / f"{job['slide_id']}.h5", job["slide_id"],
                                  s["min_tissue"])
    else:
        tissue = find_tissue(slide, geo, s["min_tissue"], s["ink_filter"])
    return slide, geo, tissue, source


def describe(error):
    if isinstance(error, SlideError):
        return str(error)
    if isinstance(error, openslide.OpenSlideError):
        return f"corrupt: OpenSlide opened it but could not read its pixels ({error})"
    return f"{type(error).__name__}: {error}"


def plan_slide(job):
    try:
        slide, geo, tissue, source = prepare(job)
        slide.close()
        return {**job, "n_candidates": len(tissue.x), "level": geo.level, "slide_mpp": geo.slide_mpp,
                "mpp_source": source, "n_dropped": tissue.dropped, "error": None}
    except Exception as e:  # one bad slide must not stop the others
        return {**job, "error": describe(e)}


def tile_slide(job):
    """Write the slide's tiles, preview, coordinates and CSV, then its done-marker (atomically, last). A full disk
    stops the run: the slide's unfinished tiles are removed (a rerun redoes the slide) and the finished slides
    stay as they are."""
    out, slide_id, s = Path(job["out_dir"]), job["slide_id"], job["settings"]
    marker_path(out, slide_id).unlink(missing_ok=True)
    try:
        slide, geo, tissue, _ = prepare(job)
        rng = np.random.default_rng([s["seed"], zlib.crc32(slide_id.encode())])
        chosen, splits = sample_tiles(tissue, job["n_tiles"], job["split"], s["val_in"], rng)
        rows = write_tiles(slide, geo, tissue, chosen, splits, job)
        save_tiling_preview(out / "previews" / f"{slide_id}.png", slide, tissue, geo.step, rows)
        write_coords(out / "coords" / f"{slide_id}.h5", [(r["x"], r["y"]) for r in rows], geo, slide_id)
        slide.close()
        save_csv(rows, out / "slides" / f"{slide_id}.csv", MANIFEST_FIELDS)
    except DiskFull:
        for folder in tile_dirs(out, slide_id, s["context"], make=False):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    except Exception as e:
        return {"slide_id": slide_id, "error": describe(e), "n_tiles": 0}
    save_json(job, marker_path(out, slide_id))
    return {"slide_id": slide_id, "error": None, "n_tiles": len(rows)}


def tile_dirs(out, slide_id, context, make=True):
    """The slide's tile folders, emptied and made (make=False: only named)."""
    dirs = [out / "tiles" / slide_id] + ([out / f"tiles_ctx{context}" / slide_id] if context else [])
    for d in dirs if make else []:
        shutil.rmtree(d, ignore_errors=True)  # leftovers of an interrupted or different run
        d.mkdir(parents=True)
    return dirs


def write_tiles(slide, geo, tissue, chosen, splits, job):
    out, slide_id, s = Path(job["out_dir"]), job["slide_id"], job["settings"]
    c, ext = s["context"], "jpg" if s["jpeg"] else "png"
    dirs = tile_dirs(out, slide_id, c)
    rows = []
    for k, t in enumerate(chosen):
        x, y = int(tissue.x[t]), int(tissue.y[t])
        tile = read_tile_at(slide, geo, x, y, c, RESIZE_KERNELS[s["resize_kernel"]])
        name = f"{slide_id}_{x}_{y}.{ext}"
        write_tile_image(tile[c:c + geo.size, c:c + geo.size], dirs[0] / name, s["jpeg"])
        if c:
            write_tile_image(tile, dirs[1] / name, s["jpeg"])
        rows.append({"slide_id": slide_id, "slide_file": Path(job["path"]).name, "tss": job["tss"],
                     "x": x, "y": y, "level": geo.level, "scale": geo.scale, "size": geo.size,
                     "mpp": round(geo.mpp, 5), "slide_mpp": geo.slide_mpp, "mpp_source": job["mpp_source"],
                     "tissue": round(float(tissue.fraction[t]), 3),
                     "file": str((dirs[0] / name).relative_to(out)),
                     "context_file": str((dirs[1] / name).relative_to(out)) if c else "",
                     "split": splits[k]})
    return rows


# -------- Files: per-slide CSV and done-marker, the run's manifest --------------------------------

def marker_path(out, slide_id):
    return out / "slides" / f"{slide_id}.done.json"


def read_marker(out, slide_id):
    try:
        return json.loads(marker_path(out, slide_id).read_text())
    except (OSError, ValueError):
        return None


# -------- The run: sort the folder, plan, split and allocate, tile in parallel, write the manifest ---

def tiling_settings(args):
    """Everything that changes a slide's tiles; a slide is redone when these differ."""
    return {"mpp": args.mpp, "image_size": args.image_size, "slide_mpp": args.slide_mpp,
            "min_tissue": args.min_tissue, "resize_kernel": args.resize_kernel, "jpeg": args.jpeg,
            "context": args.context, "seed": args.seed,
            "val_in": args.val_in, "ink_filter": args.ink_filter,
            "from_coords": str(Path(args.from_coords).resolve()) if args.from_coords else None}


def parallel(fn, jobs, workers, desc):
    """fn over jobs in `workers` processes (in this one when 1), with a progress bar."""
    if workers <= 1 or len(jobs) <= 1:
        return list(tqdm(map(fn, jobs), total=len(jobs), desc=desc, unit="slide"))
    with multiprocessing.Pool(min(workers, len(jobs)), initializer=leave_signals_to_the_main_process) as pool:
        return list(tqdm(pool.imap_unordered(fn, jobs), total=len(jobs), desc=desc, unit="slide"))


def leave_signals_to_the_main_process():
    """A slide process ignores Ctrl-C, which the terminal sends to every process of the run, and dies quietly on
    SIGTERM: the main process reports the interruption once and ends the pool (one line, not a traceback per
    process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def plan_all(paths, settings, out, workers, mpps):
    """Candidate counts per slide; slides done by an earlier run with these settings reuse theirs."""
    jobs, plans, seen = [], [], {}
    for path in paths:
        slide_id = path.stem
        job = {"slide_id": slide_id, "path": str(path), "tss": tss_code(slide_id), "out_dir": str(out),
               "settings": settings, "csv_mpp": csv_mpp_for(mpps, path)}
        marker = read_marker(out, slide_id)
        if slide_id in seen:
            plans.append({**job, "error": f"same slide id as {seen[slide_id]}; rename one"})
        elif marker and all(marker.get(k) == v for k, v in job.items()):
            plans.append({**marker, "error": None})
        else:
            jobs.append(job)
        seen.setdefault(slide_id, path.name)
    return plans + parallel(plan_slide, jobs, workers, "tissue masks")


def assign_splits(plans, args):
    """Give each readable slide its split and its number of tiles."""
    val_out = val_out_slides([p["slide_id"] for p in plans], args.val_out_slides, args.seed)
    for p in plans:
        p["split"] = "val_out" if p["slide_id"] in val_out else "train"
    shares = allocate(plans, args.max_tiles_per_slide, args.stratify)
    keys = ("slide_id", "path", "tss", "out_dir", "settings", "csv_mpp", "n_candidates", "level",
            "slide_mpp", "mpp_source", "split")
    return [{**{k: p[k] for k in keys}, "n_tiles": shares[p["slide_id"]]} for p in plans]


def write_manifest(out, jobs):
    rows = []
    for job in sorted(jobs, key=lambda j: j["slide_id"]):
        if read_marker(out, job["slide_id"]) == job:
            rows += read_csv(out / "slides" / f"{job['slide_id']}.csv")
    save_csv(rows, out / "manifest.csv", MANIFEST_FIELDS)
    return rows


def summarise(plans, jobs, results, n_rows):
    """One line per skipped slide, then a summary; returns the exit code."""
    messages = [f"skipped {Path(p['path']).name}: {p['error']}" for p in plans if p["error"]]
    messages += [f"failed {r['slide_id']}: {r['error']}" for r in results if r["error"]]
    messages += [f"no tiles from {job['slide_id']}: no tissue above --min-tissue (see previews/"
                 f"{job['slide_id']}.png)" for job in jobs if job["n_candidates"] == 0]
    messages += [f"--from-coords: dropped {p['n_dropped']} patches of {p['slide_id']} with tissue below --min-tissue"
                 f" (at the slide's edge, or over glass)" for p in plans if p.get("n_dropped")]
    for message in messages:
        tqdm.write(message, file=sys.stderr)
    print(f"{len(jobs) - len(results)} slides already done, {len(results)} tiled now, "
          f"{sum(bool(p['error']) for p in plans) + sum(bool(r['error']) for r in results)} "
          f"failed; manifest.csv: {n_rows} tiles")
    if n_rows == 0:
        print("nothing was tiled: " + ("see the messages above" if messages else "no tiles chosen"),
              file=sys.stderr)
    return 0 if n_rows else 1


def tile_slides(args):
    out = Path(args.out)
    paths = list_slides(args.slides)
    if not paths:
        print(f"{args.slides} holds no slides (any OpenSlide format, or PNG/TIFF/JPEG images): "
              "nothing to tile", file=sys.stderr)
        return 1
    mpps, settings = mpp_table(args.mpp_csv, paths), tiling_settings(args)
    claim_output_folder(out)  # locked: two runs into one OUT would list each other's half-written tiles
    print(f"tiles of {args.image_size} px at {args.mpp} µm/px, resampled with Pillow "
          f"{RESIZE_KERNELS[args.resize_kernel].name} (antialiased) where the slide's MPP differs", file=sys.stderr)
    plans = plan_all(paths, settings, out, args.slide_processes, mpps)
    plans.sort(key=lambda p: p["slide_id"])  # workers finish in any order; splits must not
    jobs = assign_splits([p for p in plans if not p["error"]], args)
    save_json({
        **vars(args), "kernel": f"Pillow {args.resize_kernel} (antialiased)",
        "openslide": openslide.__library_version__,
        "slides": {j["slide_id"]: {"slide_mpp": j["slide_mpp"], "mpp_source": j["mpp_source"]} for j in jobs}},
        out / "tiling.json")
    todo = [job for job in jobs if read_marker(out, job["slide_id"]) != job]
    results = parallel(tile_slide, todo, args.slide_processes, "tiling")
    return summarise(plans, jobs, results, len(write_manifest(out, jobs)))


# -------- The command line: every number checked for range when parsed ----------------------------

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--slides", required=True, metavar="SLIDES_DIR",
                   help="folder of slides (any OpenSlide format) or plain images")
    p.add_argument("--out", required=True, help="output folder: tiles/, manifest.csv, coords/, previews/")
    p.add_argument("--mpp", type=number_in(float, 0, 100, open_low=True), default=TILE_MPP,
                   help="µm per pixel of the tiles (0.5 = 20x)")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=TILE_SIZE, help="tile side in pixels")
    p.add_argument("--slide-mpp", type=number_in(float, 0, 100, open_low=True), default=None,
                   help="µm per level-0 pixel of every slide, overriding the metadata; "
                        "required for plain images")
    p.add_argument("--mpp-csv", default=None,
                   help="CSV with columns slide,mpp (slide: file name or stem): per-slide µm per "
                        "level-0 pixel, overriding the metadata and --slide-mpp")
    p.add_argument("--min-tissue", type=number_in(float, 0, 1), default=0.5,
                   help="minimum tissue fraction of a tile")
    p.add_argument("--no-ink-filter", dest="ink_filter", action="store_false",
                   help="keep tiles over blue, green or black pen ink (dropped by default)")
    p.add_argument("--from-coords", default=None, metavar="DIR",
                   help="tile the patches in DIR/<slide>.h5 (TRIDENT/CLAM coords), our tile centred "
                        "on each, instead of choosing tiles from the tissue mask")
    p.add_argument("--resize-kernel", choices=list(RESIZE_KERNELS), default="lanczos",
                   help="Pillow antialiased kernel used when the slide's MPP differs from --mpp")
    p.add_argument("--jpeg", type=number_in(int, 1, 100), default=None, metavar="QUALITY",
                   help="write JPEG tiles at this quality (DS-MIL: 70) instead of lossless PNG")
    p.add_argument("--context", type=number_in(int, 0, 4096), default=0,
                   help="also write tiles of size + 2 * context px around the same centre")
    p.add_argument("--max-tiles-per-slide", type=number_in(int, 1, 10 ** 9), default=None,
                   help="at most this many tiles per slide, drawn at random (unset: all)")
    p.add_argument("--stratify", choices=["none", "tss"], default="none",
                   help="tss: K tiles per slide on average within each TSS (needs --max-tiles-per-slide)")
    p.add_argument("--val-out-slides", type=number_in(float, 0, 1, open_high=True), default=0.0,
                   help="fraction of patients whose slides are all held out (TCGA-XX-XXXX; else one slide each)")
    p.add_argument("--val-in", type=number_in(float, 0, 1, open_high=True), default=0.0,
                   help="fraction of a training slide's tiles held out")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--slide-processes", type=number_in(int, 1, 1024), default=1, help="slides tiled in parallel")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.stratify == "tss" and args.max_tiles_per_slide is None:
        raise InputError("--stratify tss needs --max-tiles-per-slide (the average number of tiles per slide)")
    if args.from_coords and args.max_tiles_per_slide is not None:
        raise InputError("--from-coords tiles every patch of its files: drop --max-tiles-per-slide")
    if args.from_coords and not Path(args.from_coords).is_dir():
        raise MissingInput(f"--from-coords {args.from_coords}: not a folder; give the folder of <slide>.h5 files")
    return args


def main(argv=None):
    return tile_slides(parse_args(argv))


if __name__ == "__main__":
    run(main)
