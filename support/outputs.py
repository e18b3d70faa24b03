"""Output folders that never mix or lose results: every file written atomically, outputs kept out of
inputs, and a folder's settings recorded so that a rerun with other settings is refused, not mixed in.

    atomic(path)                    write to a temporary name, then rename: a kill never leaves half a file
    save_png / save_json / save_csv / save_npy   the kinds of file the tools write, through atomic()
    check_output_folder(out, ...)   refuse an output folder that is, or is inside, an input folder
    record_settings(out, settings)  OUT/settings.json: the settings that decide the folder's contents
"""
import csv
import json
import os
from contextlib import contextmanager

import numpy as np
from PIL import Image

from support.cli import InputError


@contextmanager
def atomic(path):
    """`with atomic(path) as tmp:` write tmp; on success it replaces path in one rename (a reader sees the old
    file or the new one, never half of one), flushed to disk first; on an error tmp is removed."""
    path = str(path)
    base, ext = os.path.splitext(path)
    tmp = f"{base}.tmp{ext}"  # keeps the extension: writers that choose their format by it still can
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(array, path):
    """A lossless PNG of a uint8 (H, W, 3) array."""
    with atomic(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def save_csv(rows, path, fields):
    """Rows (dicts) as a CSV with the given columns; the folder is made if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_npy(array, path):
    with atomic(path) as tmp:
        np.save(tmp, array)


def inside(path, folder):
    """True when `path` is `folder` or lies somewhere under it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_folder(out, inputs, flag="--out"):
    """Outputs must not mix with inputs (a rerun, or metrics.py, would read them back): refused before anything
    is written, when `out` is or lies inside an input folder, or holds an input file. `inputs` maps a flag
    to its paths. A single input file does not make its whole folder an input."""
    for name, paths in inputs.items():
        for path in filter(os.path.exists, filter(None, paths or [])):  # a missing input fails on its own
            if os.path.isdir(path) and inside(out, path):
                raise InputError(f"{flag} {out} is inside the input folder {path} ({name}): outputs would mix "
                                 f"with the inputs; choose an output folder outside it")
            if not os.path.isdir(path) and inside(path, out):
                raise InputError(f"{flag} {out} holds the input file {path} ({name}): outputs would mix with the "
                                 f"inputs; choose an output folder that does not contain it")


def record_settings(out, settings, rank=0):
    """OUT/settings.json records what decides the folder's contents. A folder written with other settings is
    refused (resuming would mix two runs); the first run writes the file (rank 0 alone)."""
    path = os.path.join(out, "settings.json")
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = [f"{k}: {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise InputError(f"{out} holds the output of another run ({'; '.join(changed)}); resuming would mix "
                             f"them: choose another --out, or delete {out}")
    elif rank == 0:
        save_json(settings, path)
