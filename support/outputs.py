"""Output folders that never mix or lose results: every file written atomically, outputs kept out of
inputs, and a folder's settings recorded so that a rerun with other settings is refused, not mixed in.

    atomic(path)                    write to a temporary name, then rename: a kill never leaves half a file, a
                                    full disk no temporary file and one line (support.cli.DiskFull)
    append_to(path, line)           a line at the end of a log; a full disk: one line
    save_png / save_json / save_csv / save_npy   the kinds of file the tools write, through atomic()
    check_output_folder(out, ...)   refuse an output folder that is, or is inside, an input folder
    claim_output_folder(out, ...)   that check, then the folder made, checked writable and locked for the run
    record_settings(out, settings)  OUT/settings.json: the settings that decide the folder's contents
"""
import csv
import fcntl
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager

import numpy as np
from PIL import Image

from support.cli import InputError, OutputConflict, disk_full

PNG_OVERHEAD = 1024  # a PNG's chunks around its pixels: it is at most its raw pixels and this
NPY_HEADER = 128  # bytes before a .npy file's data (numpy pads its header to a multiple of 64)
LOCK_FILE = ".lock"  # OUT/.lock: flock'ed by the run writing OUT; it says which process that is
_CLAIMED = {}  # real path of each folder this process holds -> its open lock file (held until the process ends)


@contextmanager
def atomic(path, size=0, bound="about"):
    """`with atomic(path) as tmp:` write tmp; on success it replaces path in one rename (a reader, or a resumed
    run, sees the old file or the new one, never half of one); on any error, an interruption included, tmp is
    removed, and a write the disk refused (full, quota, file-size limit) becomes a DiskFull naming the file and
    the bytes it needed (`size`, the whole file's, known `bound`, if the writer knows it; else what tmp had
    reached). No fsync: these are tiles, features and reports written by the thousand; checkpoints, the one
    thing a node crash must not empty, are synced by their own writer (support/checkpoints.py)."""
    path = str(path)
    base, ext = os.path.splitext(path)
    tmp = f"{base}.tmp{ext}"  # keeps the extension: writers that choose their format by it still can
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_full(err, path, tmp, size, bound)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise full from None
        raise


def append_to(path, line):
    """One line at the end of a text file (a log); a disk that refuses it is a DiskFull naming the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        full = disk_full(err, path, needed=len(line.encode()) + 1)
        if full:
            raise full from None
        raise


def save_png(array, path):
    """A lossless PNG of a uint8 (H, W, 3) array."""
    with atomic(path, array.nbytes + PNG_OVERHEAD, "at most") as tmp:
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
    with atomic(path, array.nbytes + NPY_HEADER) as tmp:
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


def claim_output_folder(out, inputs=None, flag="--out"):
    """A run's output folder, claimed before anything is written to it: kept out of the inputs
    (check_output_folder), created, checked writable (an unwritable folder is found now, not at the first
    checkpoint), and locked: an exclusive flock on OUT/.lock, held until this process ends, so that a second
    run into the same folder is refused in one line instead of mixing its files with the first's. The kernel
    drops the lock when its process dies, however it dies: a stale .lock never blocks. Under torchrun rank 0
    alone takes the lock (the other ranks write into rank 0's run); a process may claim a folder it holds
    again (tests, demo.py and evaluate.py run several tools in one process)."""
    check_output_folder(out, inputs or {}, flag)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # the run's first write, made now
            pass
        if os.environ.get("RANK", "0") != "0" or os.path.realpath(out) in _CLAIMED:
            return
        lock = open(os.path.join(out, LOCK_FILE), "a+")
    except OSError as err:
        raise InputError(f"cannot create the output folder {flag} {out}, or write in it ({err.strerror or err}): "
                         f"choose another {flag}, or make it writable") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise OutputConflict(f"{flag} {out} is in use by another run ({holder}): two runs in one folder would mix "
                             f"their files; wait for it to end, or choose another {flag}") from None
    except OSError as err:  # a filesystem without locks (some network mounts): run, but say so
        print(f"note: {flag} {out}: no lock ({err.strerror}); nothing stops a second run into it", flush=True)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    _CLAIMED[os.path.realpath(out)] = lock


def claimed(out):
    """True when this process holds the lock on `out` (claim_output_folder)."""
    return os.path.realpath(out) in _CLAIMED


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
