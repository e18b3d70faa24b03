"""The sets of tiles the benchmark scores (CytoSyn §4.1-§4.2), as evaluate.py lays them out in its folder.

    link_folder(folder, named_paths)   folder/<name><ext> -> the tile: links, not copies of 100k tiles; a rerun
                                       must find the same links there
    parse_ood / plan_ood / write_ood   --ood NAME=PATH (Table 3): an out-of-distribution cohort, a tiling output or
                                       a folder of tiles, split with the seed into a guidance half and a reference
                                       half, by slide when the manifest names the slides (split_cohort)

Left out: cohorts split by patient rather than by slide (TCGA's slides of one patient go to either half).
"""
import os
import re
from pathlib import Path

import numpy as np

from support.cli import InputError, MissingInput
from support.data import list_images
from support.manifests import check_listed_tiles, read_manifest_rows
from support.outputs import save_csv
from support.reports import VAL_SETS
from support.tile_features import Preprocess, check_one_size


def link_folder(folder, named_paths):
    """folder/<name><ext> -> the tile, as symbolic links (no copy of 100k tiles); an existing folder must
    hold the same links and no other tile (a resumed run), else it is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for name, path in named_paths:
        link = folder / (name + Path(path).suffix)
        target = os.path.abspath(path)
        wanted.add(link.name)
        if link.is_symlink() or link.exists():
            if os.path.realpath(link) != os.path.realpath(target):
                raise InputError(f"{link} points to {os.path.realpath(link)}, not {target}: {folder} is from another "
                                 f"run; choose another --out")
        else:
            os.symlink(target, link)
    extra = sorted(set(os.path.basename(p) for p in list_images(folder, recursive=False)) - wanted)
    if extra:
        raise InputError(f"{folder} holds {len(extra)} tile(s) of another run ({extra[0]} ...); choose another --out")
    return folder


# -------- Out-of-distribution cohorts (§4.2, Table 3) --------------------------------------------------------
def parse_ood(specs):
    """--ood NAME=PATH ... -> {NAME: PATH}."""
    cohorts = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise InputError(f"--ood {spec!r}: give NAME=PATH (a name for the report, then a tiling output or a "
                             f"folder of tiles)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in (*VAL_SETS, "guidance", *cohorts):
            raise InputError(f"--ood {spec!r}: NAME must be letters, digits, '.', '_' or '-', not val_in, val_out or "
                             f"guidance, and each cohort needs its own")
        cohorts[name] = Path(path)
    return cohorts


def cohort_tiles(name, path):
    """A cohort's tiles -> [{path, slide}]: a tiling output's rows (slide: their slide_id, if the manifest has
    one), or every tile of a folder (slide None)."""
    manifest = path / "manifest.csv" if path.is_dir() else path
    if manifest.is_file() and manifest.suffix == ".csv":
        column, rows = read_manifest_rows(manifest, split=None)
        tiles = [dict(path=str(manifest.parent / r[column]), slide=r.get("slide_id")) for r in rows]
        check_listed_tiles(manifest, [r[column] for r in rows], [t["path"] for t in tiles])
    elif path.is_dir():
        tiles = [dict(path=p, slide=None) for p in list_images(path)]
    else:
        raise MissingInput(f"--ood {name}={path}: neither a tiling output (manifest.csv) nor a folder of tiles")
    return tiles  # a tile that is not there: refused by plan_ood's size check (its header)


def split_cohort(tiles, seed, cap):
    """A cohort -> (guidance half, reference half, "slide" or "tile"), seeded. By slide where every tile has
    one: the slides, in a seeded order, each go whole to the half with fewer tiles so far, so no slide is in
    both halves; else tile by tile. Each half then keeps `cap` tiles at most (seeded), sorted by path."""
    rng = np.random.default_rng(seed)
    by = "slide" if all(t["slide"] is not None for t in tiles) else "tile"
    groups = {}
    for t in tiles:
        groups.setdefault(t["slide"] if by == "slide" else t["path"], []).append(t)
    keys, halves = sorted(groups), ([], [])
    for i in rng.permutation(len(keys)):
        halves[len(halves[1]) < len(halves[0])].extend(groups[keys[i]])
    kept = [[h[i] for i in sorted(rng.choice(len(h), min(cap, len(h)), replace=False))] for h in halves]
    return *(sorted(h, key=lambda t: t["path"]) for h in kept), by


def plan_ood(args):
    """Every --ood cohort split and checked (count, one tile size, halves big enough); nothing written."""
    plans = {}
    for name, path in args.ood.items():
        tiles = cohort_tiles(name, path)
        if len(tiles) < 4:
            raise InputError(f"--ood {name}={path} has {len(tiles)} tile(s); a guidance half and a reference half "
                             f"need 4 at least")
        check_one_size(f"--ood {name}={path}", [t["path"] for t in tiles],
                         Preprocess(crop=args.crop, resize_to_input=args.resize_to_input))
        guidance, reference, by = split_cohort(tiles, args.seed, args.num_ood)
        if min(len(guidance), len(reference)) <= args.k:
            raise InputError(f"--ood {name}={path}: split by {by}, a half has {min(len(guidance), len(reference))} "
                             f"tiles; precision / recall (--k {args.k}) need more: add tiles or slides")
        plans[name] = dict(path=str(path), split_by=by, seed=args.seed, num_ood=args.num_ood, n_tiles=len(tiles),
                           n_guidance=len(guidance), n_reference=len(reference), list=f"ood/{name}/split.csv",
                           slides={h: sorted({t["slide"] for t in half}) if by == "slide" else None
                                   for h, half in (("guidance", guidance), ("reference", reference))},
                           halves=dict(guidance=guidance, reference=reference))
    return plans


def write_ood(args, name, plan):
    """DIR/ood/NAME/guidance, /reference (links 000000.png ...) and split.csv."""
    folder = args.out / "ood" / name
    for half, tiles in plan["halves"].items():
        link_folder(folder / half, [(f"{i:06d}", t["path"]) for i, t in enumerate(tiles)])
    save_csv([dict(half=half, name=f"{i:06d}", slide_id=t["slide"] or "", file=t["path"])
              for half, tiles in plan["halves"].items() for i, t in enumerate(tiles)], folder / "split.csv",
             ["half", "name", "slide_id", "file"])
