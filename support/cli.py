"""What every command line of the repo shares: settings checked at the boundary, outputs kept away from
inputs, and errors told in one line.

    number_in(float, 0, 1)         an argparse type: a finite number in a range; the error gives the range
    check_output_folder(out, ...)  refuse an output folder that is, or is inside, an input folder
    error_line(err)                the one line a user sees, also for an error raised in a DataLoader worker
    processes()                    the torchrun processes (rank, world size, device); one process without it

Left out: configuration files (run settings live in argparse with the paper's defaults).
"""
import argparse
import math
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

INF = float("inf")


def number_in(kind, low, high, open_low=False, open_high=False):
    """An argparse type: a finite `kind` in [low, high] (open ends where asked); the error says the range."""
    bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}; "
                                             f"give one in {bounds}") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text} is outside the allowed range {bounds}")
        return value
    parse.__name__ = f"{kind.__name__} in {bounds}"  # argparse names the type in its messages
    return parse


def inside(path, folder):
    """True when `path` is `folder` or lies somewhere under it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_folder(out, inputs, flag="--out"):
    """An output folder that is, or is inside, an input folder would mix generated files into real data
    (and a rerun would read them back): refused before anything is written. `inputs` maps a flag to
    paths (an existing file counts by its folder)."""
    for name, paths in inputs.items():
        for path in filter(os.path.exists, filter(None, paths or [])):  # a missing input fails on its own
            folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
            if inside(out, folder):
                raise ValueError(f"{flag} {out} is inside the input folder {folder} ({name}): outputs would mix "
                                 f"with the inputs; choose an output folder outside it")


def error_line(err):
    """The one line a user sees for an error. An error raised in a DataLoader worker comes back with the
    worker's traceback folded into its message: keep its last line, the error itself."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


@contextmanager
def processes(use_cuda=None):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; one process without it. Yields (rank, world, device)."""
    distributed = "RANK" in os.environ
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    owns_group = distributed and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        yield rank, world, device
    finally:
        if owns_group:
            dist.destroy_process_group()
