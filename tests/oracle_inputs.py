"""The oracle's inputs (tests/test_oracle.py): tiles that carry their set and a known vector in their pixels, the
test extractor that reads them back, and a tiling, an --ood cohort and another model's tiles made of them. Each
set gets its own mean, scale and size, so that one set's number under another's name cannot pass.
"""
import csv
import zlib

import numpy as np
import torch
from PIL import Image

import extractors

# -------- The known features: a tile's set in its pixels, and each set's own mean and scale ----------------
TILE, DIM = 64, 3
MAGIC = np.array([[17, 230, 5], [240, 11, 130], [3, 99, 250], [128, 7, 61]], np.uint8)  # row 0, pixels 0-3
SETS = ("train", "val_in", "val_out", "cohort", "model", "generated")  # "generated": no code (the model's tiles)
MEAN = {"train": (0.0, 0.0, 0.0), "val_in": (0.8, -0.4, 0.3), "val_out": (-0.6, 0.9, -0.5),
        "cohort": (1.6, 1.1, -1.3), "model": (-1.1, -0.7, 0.5), "generated": (0.4, 0.6, 1.0)}
SCALE = {"train": 1.0, "val_in": 1.4, "val_out": 0.7, "cohort": 1.8, "model": 0.9, "generated": 1.2}
COLOUR = {"train": (200, 120, 180), "val_in": (180, 90, 160), "val_out": (150, 140, 200), "cohort": (120, 90, 200),
          "model": (210, 170, 190)}
QUANTUM = 8192  # a coordinate is stored in two bytes: (value * QUANTUM + 32768)


def craft_tile(path, set_name, u, rng):
    """A PNG tile of the set's colour whose first row carries MAGIC, the set and the vector u (3 coordinates)."""
    tile = np.clip(np.array(COLOUR[set_name]) + rng.normal(0, 20, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
    tile[0, :4] = MAGIC
    tile[0, 4] = (SETS.index(set_name), 0, 0)
    q = np.clip(np.rint(u * QUANTUM) + 32768, 0, 65535).astype(np.int64)
    tile[0, 5:5 + DIM] = np.stack([q // 256, q % 256, np.zeros_like(q)], 1)
    Image.fromarray(tile).save(path)


def tile_feature(tile):
    """(H, W, 3) uint8 -> (DIM,) float32: MEAN[set] + SCALE[set] * u, with the set and u read from the tile's code;
    a tile without the code (a generated one) gets u from a generator seeded by its bytes."""
    if np.array_equal(tile[0, :4], MAGIC):
        set_name = SETS[tile[0, 4, 0]]
        u = (tile[0, 5:5 + DIM, 0].astype(np.float64) * 256 + tile[0, 5:5 + DIM, 1] - 32768) / QUANTUM
    else:
        set_name = "generated"
        u = np.random.default_rng(zlib.crc32(np.ascontiguousarray(tile).tobytes())).standard_normal(DIM)
    return (np.array(MEAN[set_name]) + SCALE[set_name] * u).astype(np.float32)


def features_of(paths):
    return np.stack([tile_feature(np.asarray(Image.open(p).convert("RGB"))) for p in paths])


class KnownExtractor:
    """What evaluate.py builds for the registered "oracle" extractor: tile_feature on each tile."""

    def embed(self, x, bf16=False):  # x: (B, 3, S, S) in [0, 1], the tile's uint8 / 255
        tiles = np.rint(x.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)  # (B, S, S, 3)
        return torch.from_numpy(np.stack([tile_feature(t) for t in tiles]))


SPEC = extractors.ExtractorSpec(None, "oracle (tests/test_oracle.py)", input_size=TILE, dim=DIM, backend="oracle")


# -------- The inputs: a tiling, an --ood cohort, another model's tiles and its --pairs --------------------------
def write_manifest(root, rows, fields):
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    (root / "tiling.json").write_text("{}")  # tiling.py's other output


def make_tiling(root, counts, rng):
    (root / "tiles").mkdir(parents=True)
    rows = []
    for split, n in counts.items():
        for i in range(n):
            tss, name = "AB"[i % 2], f"tiles/{split}_{i:02d}.png"
            craft_tile(root / name, split, rng.standard_normal(DIM), rng)
            rows.append(dict(slide_id=f"{tss}-{split}-{i % 3}", tss=tss, file=name, split=split))
    write_manifest(root, rows, ["slide_id", "tss", "file", "split"])
    return rows


def make_cohort(root, slide_sizes, rng):
    (root / "tiles").mkdir(parents=True)
    rows = []
    for s, n in enumerate(slide_sizes):
        for i in range(n):
            name = f"tiles/s{s}_{i:02d}.png"
            craft_tile(root / name, "cohort", rng.standard_normal(DIM), rng)
            rows.append(dict(slide_id=f"S{s}", file=name, split="train"))
    write_manifest(root, rows, ["slide_id", "file", "split"])
    return rows


def make_model(root, train_files, rng):
    """13 tiles of another model; 11 paired with 9 training tiles (two of them twice), 2 unpaired."""
    root.mkdir()
    pairs = []
    for i in range(13):
        craft_tile(root / f"gen_{i:02d}.png", "model", rng.standard_normal(DIM), rng)
        if i < 11:
            guidance = train_files[(0, 2, 3, 5, 6, 8, 9, 11, 12, 2, 8)[i]]
            pairs.append(dict(generated=f"gen_{i:02d}.png", guidance=guidance))
    with open(root.parent / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["generated", "guidance"])
        writer.writeheader()
        writer.writerows(pairs)
    return pairs
