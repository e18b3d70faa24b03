"""Which tiles a tool reads: tiling.py's manifest (its rows, their splits, their tiles checked before any model is
built), a folder of tiles, tar shards, or a manifest's tiles read back from their slides (CytoSyn §3.2).

    find_tiles(tiles, slides)   --tiles (and --slides) -> Tiles: tile paths, tar paths, or rows read from slides
    read_manifest_rows(path)    a manifest's rows of one split, each tile listed once
    check_listed_tiles(...)     a manifest's tiles exist (its paths are relative to its folder)

The tiles themselves are decoded by support/data.py.
"""
import csv
import json
import os
from collections import namedtuple

from support.cli import InputError, MissingInput
from support.tiles import IMAGE_EXTENSIONS

SLIDE_COLUMNS = ("slide_file", "x", "y", "level", "scale", "size")  # where a manifest row lies in its slide
CHECKED_ROWS = 100_000  # a manifest's tiles checked for existence up front (a stat each: well under a second)


def manifest_tile_paths(path):
    """A manifest CSV written by tiling.py -> tile paths of its `train` rows (all rows without `split`).
    The tile column is `file` (tiling.py) or `path`, relative to the manifest's folder or absolute."""
    column, rows = read_manifest_rows(path)
    base = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(base, r[column]) for r in rows]
    check_listed_tiles(path, [r[column] for r in rows], paths)
    return paths


def check_listed_tiles(manifest, written, paths):
    """A manifest's tiles are there, checked before any model is built: a manifest moved away from its tiles
    would otherwise fail in the first batch. Every row up to CHECKED_ROWS, else that many spread over the list
    (the first and the last among them); a missing tile gets one line that says how the path was read."""
    step = max(1, len(paths) // CHECKED_ROWS)
    checked = sorted({*range(0, len(paths), step), len(paths) - 1})
    missing = [i for i in checked if not os.path.exists(paths[i])]
    if missing:
        i = missing[0]
        raise MissingInput(f"{manifest}: tile {written[i]} ({paths[i]}): no such file; paths in {manifest} are "
                           f"relative to its folder: keep the manifest beside its tiles, or write absolute paths "
                           f"({len(missing)} of the {len(checked)} rows checked are missing)")


def read_manifest_rows(path, split="train"):
    """-> (the tile column's name, the manifest's rows of `split` as dicts; all rows with split=None)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames or []
    if not rows:
        raise InputError(f"{path} is an empty manifest (no tile rows)")
    column = next((c for c in ("file", "path") if c in columns), None)
    if column is None:
        raise InputError(f"{path}: a tile manifest needs a 'file' column (tiling.py writes one); "
                         f"found columns {columns}")
    rows = unique_tile_rows(rows, column, path)  # all splits: a tile in train and in val_in is ambiguous too
    if split and "split" in columns:
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise InputError(f"{path} has no row with split == {split!r}")
    return column, rows


def unique_tile_rows(rows, column, path):
    """Each tile once. Two rows of one file, or of the same pixels of one slide (slide, x, y, and the level,
    scale and size where given), are ambiguous (which split? trained twice as often?) and refused in one
    line, before anything is written; identical rows are read once, with a note."""
    slide = next((c for c in ("slide_file", "slide_id") if c in rows[0]), None)
    place = [slide, "x", "y", *(c for c in ("level", "scale", "size") if c in rows[0])]
    place = place if slide and {"x", "y"} <= set(rows[0]) else []
    seen, kept = {}, []
    for n, row in enumerate(rows, start=2):  # line numbers of the CSV (its header is line 1)
        keys = [(f"file {row[column]}",)]
        if place:  # described for the message, keyed by every column of the place
            keys.append((f"{row[slide]} at x={row['x']}, y={row['y']}", *(row[c] for c in place)))
        first = next(((key, seen[key]) for key in keys if key in seen), None)
        if first is None:
            seen.update(dict.fromkeys(keys, (n, row)))
            kept.append(row)
        elif first[1][1] != row:
            raise InputError(f"{path}: lines {first[1][0]} and {n} are the same tile ({first[0][0]}) with different "
                             f"values: keep one row per tile")
    if len(kept) < len(rows):
        print(f"note: {path}: {len(rows) - len(kept)} repeated rows, identical to others, read once", flush=True)
    return kept


class Tiles(namedtuple("Tiles", "kind items")):
    """What --tiles names: kind "files" (tile paths), "shards" (tar paths) or "slides" ((manifest rows,
    slides folder, resample kernel): tiles read from the slides)."""

    def describe(self):
        if self.kind == "slides":
            return f"{len(self.items[0]):,} tiles read from the slides in {self.items[1]}"
        return f"{len(self.items):,} {'tiles' if self.kind == 'files' else 'tar shards'}"


def find_slide_tiles(manifest, slides_dir):
    """--tiles MANIFEST --slides SLIDES_DIR -> Tiles("slides", (rows, slides_dir, resample)): tiles read from
    the slides themselves (slides.py), no PNG copy; the kernel is the tiling run's (tiling.json)."""
    manifest = tiling_manifest(manifest) or manifest
    if not (os.path.isfile(manifest) and manifest.lower().endswith(".csv")):
        raise InputError(f"--slides reads the tiles of a tiling.py manifest: --tiles must be tiling.py's output "
                         f"folder or its manifest.csv, got {manifest}")
    if not os.path.isdir(slides_dir):
        raise MissingInput(f"--slides {slides_dir}: no such folder (give the folder tiling.py read)")
    column, rows = read_manifest_rows(manifest)
    missing = [c for c in SLIDE_COLUMNS if c not in rows[0]]
    if missing:
        raise InputError(f"{manifest} has no {', '.join(missing)} column: tile the slides again with this "
                         f"tiling.py (it records where each tile lies in its slide)")
    absent = sorted({r["slide_file"] for r in rows if not os.path.exists(os.path.join(slides_dir, r["slide_file"]))})
    if absent:
        raise MissingInput(f"--slides {slides_dir} lacks {len(absent)} slide(s) of the manifest, e.g. "
                                f"{absent[0]}: pass the folder tiling.py read")
    settings = os.path.join(os.path.dirname(os.path.abspath(manifest)), "tiling.json")
    resample = "lanczos"
    if os.path.exists(settings):
        with open(settings) as f:
            recorded = json.load(f)
        resample = recorded.get("resize_kernel", recorded.get("resample", resample))  # "resample": older runs
    for r in rows:
        r["name"] = os.path.splitext(os.path.basename(r[column]))[0]
    return Tiles("slides", (rows, slides_dir, resample))


def tiling_manifest(folder):
    """tiling.py's output folder (manifest.csv and tiling.json inside) -> its manifest's path, else None."""
    manifest = os.path.join(folder, "manifest.csv")
    return manifest if os.path.isfile(manifest) and os.path.isfile(os.path.join(folder, "tiling.json")) else None


def find_tiles(data, slides=None):
    """--tiles (and --slides) -> Tiles: tile paths, tar paths, or a manifest's rows read from the slides;
    sorted so every rank agrees. tiling.py's output folder means its manifest's train rows."""
    if slides:
        return find_slide_tiles(data, slides)
    if os.path.isdir(data) and tiling_manifest(data):
        return Tiles("files", manifest_tile_paths(tiling_manifest(data)))
    if os.path.isfile(data) and data.lower().endswith(".csv"):
        return Tiles("files", manifest_tile_paths(data))
    if os.path.isfile(data) and data.lower().endswith(".tar"):
        return Tiles("shards", [data])
    if not os.path.isdir(data):
        raise MissingInput(f"--tiles {data}: not a folder of tiles, a manifest .csv or a .tar shard")
    parent = os.path.dirname(os.path.abspath(data))
    if tiling_manifest(parent):  # OUT_DIR/tiles of a tiling run: it also holds the val-in and val-out tiles
        raise InputError(f"--tiles {data} is the tiles folder of tiling.py's output {parent}, which also holds the "
                         f"val-in and val-out tiles: pass {parent}, whose manifest names the train rows")
    files, shards = [], []
    for root, dirs, names in os.walk(data, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                files.append(os.path.join(root, name))
            elif ext == ".tar":
                shards.append(os.path.join(root, name))
    if files and shards:
        raise InputError(f"{data} holds both image files and .tar shards; point --tiles at one kind")
    if not files and not shards:
        raise MissingInput(f"no PNG/JPEG tiles and no .tar shards under {data}")
    return Tiles("files", files) if files else Tiles("shards", shards)
