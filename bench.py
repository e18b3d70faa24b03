"""Benchmarks, one subcommand each; timing lives here, apart from the programs it times.

    python bench.py tiling [SLIDES_DIR]      # tiling.py and slides.py (CytoSyn §3.2)

`tiling` reports, on the slides of SLIDES_DIR (default tests/data: the CMU slide) and on a
synthetic 8192 px JPEG pyramid at 0.25 µm/px (40x) written by synthetic_slide.py:
  1. reading only: slides.read_tile_at against a plain per-tile read_region loop (same tiles,
     same kernel, a freshly opened slide each round);
  2. a whole single-process tiling run: masks, reads, PNG writes, previews, manifest;
  3. what one data worker (one process) gets for training: SlideTileReader.read(row) straight
     from the slide against decoding the PNG tiling.py wrote (files in the page cache), rows in
     shuffled order, a fresh reader each round.

Left out: multi-process scaling (each worker is one process; the figures are per worker),
cold-cache disk reads, remote storage.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import tiling
from slides import RESAMPLE, SlideError, SlideTileReader, open_slide, read_tile_at
from synthetic_slide import synthetic_tissue, write_pyramid_tiff


def time_methods(methods, rounds=3):
    """Best tiles/s of each method (name -> function returning the tiles it read); the methods
    take turns, so a busy machine slows them alike."""
    best, tiles = {name: 0.0 for name in methods}, {}
    for _ in range(rounds):
        for name, read_all in methods.items():
            start = time.perf_counter()
            tiles[name] = read_all()
            best[name] = max(best[name], len(tiles[name]) / (time.perf_counter() - start))
    return best, tiles


def read_tile_naive(slide, geo, x, y, context, resample):
    """The straightforward way: one read_region at the tile's corner and one resize per tile."""
    n = geo.size + 2 * context
    step0 = geo.scale * geo.downsample  # level-0 px per output px
    tile = slide.read_region((round(x - context * step0), round(y - context * step0)), geo.level,
                             (round(n * geo.scale),) * 2).convert("RGB")
    return np.asarray(tile if tile.size == (n, n) else tile.resize((n, n), resample))


def benchmark_reading(path, tiling_args, rounds):
    """Tiles/s of read_tile_at and of a plain per-tile read_region loop on one slide."""
    job = {"slide_id": path.stem, "path": str(path), "csv_mpp": None,
           "settings": tiling.run_settings(tiling_args)}
    _, geo, tissue, _ = tiling.prepare(job)
    corners, resample, c = list(zip(tissue.x, tissue.y)), RESAMPLE[tiling_args.resample], tiling_args.context

    def reader(read):
        def read_all():
            slide = open_slide(path)
            return [read(slide, geo, x, y, c, resample) for x, y in corners]
        return read_all

    speed, tiles = time_methods({"tiler": reader(read_tile_at), "loop": reader(read_tile_naive)}, rounds)
    diff = np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(tiles["tiler"], tiles["loop"])])
    print(f"{path.name}: {len(corners)} tiles from level {geo.level} (scale {geo.scale:g}), reading "
          f"only: tiler {speed['tiler']:.0f} tiles/s, read_region loop {speed['loop']:.0f} tiles/s "
          f"(mean |difference| {diff:.3f} grey levels)")


def benchmark_run(folder, out, args):
    """Tiles/s of a whole single-process tiling run; returns its manifest rows."""
    tiling_args = tiling.parse_args([str(folder), str(out), "--format", "png", "--resample", args.resample])
    start = time.perf_counter()
    tiling.run(tiling_args)
    rows = tiling.read_csv(out / "manifest.csv")
    print(f"{folder}: whole run, 1 worker, png: {len(rows)} tiles, "
          f"{len(rows) / (time.perf_counter() - start):.0f} tiles/s")
    return rows


def benchmark_training_reads(folder, out, rows, args):
    """Tiles/s one data worker gets from the slides (SlideTileReader) and from the PNGs."""
    rows = [rows[k] for k in np.random.default_rng(0).permutation(len(rows))]

    def from_slides():
        reader = SlideTileReader(folder, args.resample)
        tiles = [reader.read(row) for row in rows]
        reader.close()
        return tiles

    def from_png():
        return [np.asarray(Image.open(out / row["file"]).convert("RGB")) for row in rows]

    speed, tiles = time_methods({"slides": from_slides, "png": from_png}, args.rounds)
    same = all(np.array_equal(a, b) for a, b in zip(tiles["slides"], tiles["png"]))
    print(f"{folder}: one data worker, {len(rows)} tiles in shuffled order: from the slide "
          f"{speed['slides']:.0f} tiles/s, decoding PNGs {speed['png']:.0f} tiles/s "
          f"({'identical pixels' if same else 'PIXELS DIFFER'})")


def add_tiling_args(parser):
    parser.add_argument("slides_dir", nargs="?", default="tests/data",
                        help="folder of slides to time, besides the synthetic 40x pyramid")
    parser.add_argument("--work-dir", default=None,
                        help="scratch folder for the pyramid (~10 MB) and the tiles, kept afterwards; "
                             "unset: a temporary folder, removed")
    parser.add_argument("--resample", choices=list(RESAMPLE), default="lanczos")
    parser.add_argument("--pyramid-px", type=tiling.number_in(int, 1024, 65536), default=8192,
                        help="side of the synthetic pyramid's level 0, in pixels")
    parser.add_argument("--rounds", type=tiling.number_in(int, 1, 100), default=3,
                        help="each method's best of this many rounds is reported")


def bench_tiling(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_tiling_"))
    synthetic = work / "pyramid"
    synthetic.mkdir(parents=True, exist_ok=True)
    side = args.pyramid_px
    print(f"writing a {side} x {side} px pyramid at 0.25 µm/px (40x), levels 1 and 4, JPEG q80")
    write_pyramid_tiff(synthetic / "pyramid.tiff", synthetic_tissue(side), 0.25, (1, 4), jpeg_quality=80)
    tiling_args = tiling.parse_args([args.slides_dir, str(work), "--resample", args.resample])
    for k, folder in enumerate([Path(args.slides_dir), synthetic]):
        for path in tiling.sort_folder(folder)[0]:
            try:
                benchmark_reading(path, tiling_args, args.rounds)
            except SlideError as e:
                print(f"{path.name}: skipped, {e}")
        out = work / f"tiles_{k}"
        rows = benchmark_run(folder, out, args)
        benchmark_training_reads(folder, out, rows, args)
    if not args.work_dir:
        shutil.rmtree(work)
    return 0


COMMANDS = {"tiling": (add_tiling_args, bench_tiling)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _) in COMMANDS.items():
        add_args(commands.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     help=f"python bench.py {name} --help"))
    # `python bench.py --help` lists every subcommand's flags too (the README's flag check reads it)
    parser.epilog = "\n".join(commands.choices[name].format_help() for name in COMMANDS)
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
