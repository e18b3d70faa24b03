"""The command-line vocabulary of the repo and its one error path.

    CytoSynError and its kinds   what a user can cause; helpers raise them, and nothing below __main__ exits
    run(main)                    every script's __main__: an error becomes one line on stderr and exit status 1
    number_in(float, 0, 1)       an argparse type: a finite number in a range; the error gives the range
    add_sampling_args(p) ...     the flags several tools share, defined once so that a name means one thing
    processes(device, workers)   the torchrun processes (rank, world size, device); one process without it;
                                 intra-op threads capped so that the processes' threads fit the CPUs

Left out: configuration files (run settings live in argparse with the paper's defaults).
"""
import argparse
import math
import os
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

INF = float("inf")
SAMPLERS = ("sde", "ode", "heun")  # sampler.py: Euler-Maruyama (the paper's), Euler, Heun
PAPER_STEPS = 250  # Euler-Maruyama steps of the paper's samples (CytoSyn §4.1)


# -------- Errors: helpers raise these; run() turns them into one line ------------------------------------
class CytoSynError(Exception):
    """Something the user can fix. The message says what was wrong and what to do."""


class InputError(CytoSynError, ValueError):
    """A bad setting, or a file or table whose content is wrong or ambiguous."""


class MissingInput(CytoSynError, FileNotFoundError):
    """An input file or folder that is not there."""


class OutputConflict(CytoSynError, FileExistsError):
    """An output folder that would mix two runs, or lose what is already written."""


class NonFinite(CytoSynError, FloatingPointError):
    """A NaN or an inf where every number must be finite (a loss, weights, images)."""


class Unavailable(CytoSynError, RuntimeError):
    """Weights or a package that this machine does not have (a gated model, no network)."""


def error_line(err):
    """The one line a user sees for an error. An error raised in a DataLoader worker comes back with the
    worker's traceback folded into its message: keep its last line, the error itself."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def run(main, argv=None):
    """Every script's __main__: main(argv) returns an exit status; a CytoSynError ends the program with
    one line, `SCRIPT: error: ...`, on stderr and exit status 1. Other exceptions are bugs: a traceback."""
    prog = os.path.basename(sys.argv[0]) or "cytosyn"
    try:
        status = main(argv)
    except CytoSynError as err:
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    raise SystemExit(status or 0)


# -------- Numbers in a range --------------------------------------------------------------------------
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


def check_number(name, value, kind, low, high, open_low=False):
    """number_in for a Python keyword (the API's twin of a flag): an InputError that names the keyword."""
    try:
        return number_in(kind, low, high, open_low)(str(value))
    except argparse.ArgumentTypeError as err:
        raise InputError(f"{name}={value!r}: {err}") from None


def comma_list(choices=None, kind=str):
    """An argparse type: comma-separated values, each one of `choices` or parsed by `kind`."""
    def parse(text):
        values = []
        for item in text.split(","):
            try:
                values.append(kind(item))
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: {err}") from None
            if choices is not None and values[-1] not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: choose from {', '.join(choices)}")
        return values
    parse.__name__ = "comma-separated list"
    parse.element, parse.choices = kind, choices  # what one value is (tests compare it with the single flag)
    return parse


# -------- The shared flags: one definition each ---------------------------------------------------------
# The sampling settings' ranges, for the flags and for the Python API (sample.SamplingSettings) alike. The
# seed's fits every generator the repo seeds (torch, numpy, Python).
SAMPLING_RANGES = {"num_sampling_steps": (int, 1, 10_000), "cfg_scale": (float, 0.0, 100.0),
                   "guidance_low": (float, 0.0, 1.0), "guidance_high": (float, 0.0, 1.0), "seed": (int, 0, 2 ** 31 - 1)}
SEED = number_in(*SAMPLING_RANGES["seed"])
WORKERS = number_in(int, 0, 256)
# Types shared by flags of the same name in several tools (tests/test_layout.py checks every shared name).
BATCH_SIZE = number_in(int, 1, 65_536)
IMAGE_SIZE = number_in(int, 16, 4096)
MAX_STEPS = number_in(int, 1, 10 ** 10)
SAMPLES_PER_COND = number_in(int, 1, 10_000)


def add_sampling_args(p, several=False, sampler="sde", steps=PAPER_STEPS):
    """The sampler and its guidance, as sample.py, evaluate.py, train.py (its sample grids), bench.py and
    demo.py take them. several=True: comma-separated lists of samplers and step counts (Figure 4)."""
    kind = comma_list(SAMPLERS) if several else None
    p.add_argument("--sampler", type=kind, choices=None if several else SAMPLERS,
                   default=[sampler] if several else sampler,
                   help="sde: Euler-Maruyama (paper); ode: Euler; heun: ODE with Heun's correction"
                        + (" (several: comma-separated)" if several else ""))
    steps_type, unit = number_in(*SAMPLING_RANGES["num_sampling_steps"]), number_in(*SAMPLING_RANGES["guidance_low"])
    p.add_argument("--num-sampling-steps", type=comma_list(kind=steps_type) if several else steps_type,
                   default=[steps] if several else steps,
                   help=(f"sampling steps (paper: {PAPER_STEPS})" if steps == PAPER_STEPS else
                         f"sampling steps (default {steps}; the paper samples with {PAPER_STEPS})")
                   + ("; several: comma-separated, Figure 4" if several else ""))
    p.add_argument("--cfg-scale", type=number_in(*SAMPLING_RANGES["cfg_scale"]), default=2.5,
                   help="classifier-free guidance scale (paper: 2.5)")
    p.add_argument("--guidance-low", type=unit, default=0.0, help="guide where t >= this (t = 1: noise)")
    p.add_argument("--guidance-high", type=unit, default=0.75, help="guide where t <= this (paper: 0.75)")


def check_guidance(args):
    if args.guidance_low > args.guidance_high:
        raise InputError(f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}: the "
                         f"guidance window [low, high] is empty")


def device_name_type(text):
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a device: give auto, cpu, cuda or cuda:N") from None
    return text


def add_device_args(p, precision=True):
    """--device and --precision, as every tool that runs a network takes them."""
    p.add_argument("--device", type=device_name_type, default="auto",
                   help="auto: the GPU when there is one (under torchrun, each rank's own), else the CPU; or cpu, "
                        "cuda, cuda:N")
    if precision:
        p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto: bf16 autocast on GPU, fp32 on the CPU")


def add_workers_arg(p, default=4):
    p.add_argument("--num-workers", type=WORKERS, default=default, help="data-loader worker processes")


def resolve_precision(precision, device):
    """--precision auto -> bf16 on a GPU, fp32 on the CPU."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def autocast(device, precision):
    """bf16 autocast when asked for, otherwise nothing (the networks run in float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# -------- Processes -------------------------------------------------------------------------------------
def available_cpus(cpu_max="/sys/fs/cgroup/cpu.max"):
    """The CPUs this process may run on: its affinity mask, and the cgroup's CPU quota (a container's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def cap_threads(num_workers=0):
    """Cap torch's intra-op threads so that one node's threads fit its CPUs -> the thread count.

    torch starts one thread per core in every process, so the processes of one node (torchrun's local
    ranks) and their data workers (one thread each: DataLoader sets it) ask for more threads than there
    are cores, and oversubscribed threads spin and wait: a training step on a busy 2-core machine ran 9x
    slower with torch's default threads than with one. Decided: each process takes its share of the CPUs
    (affinity and cgroup quota) less its data workers, at least 1 and never more than torch's default.
    OMP_NUM_THREADS, when set, is the user's choice and wins (torchrun sets it to 1 for several ranks)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    share = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, min(torch.get_num_threads(), share - num_workers))
    torch.set_num_threads(threads)
    return threads


@contextmanager
def processes(device="auto", num_workers=0):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; one process without it. Yields (rank, world, device):
    with --device auto or cuda, each rank's own GPU (LOCAL_RANK); cpu runs gloo. Each process's intra-op
    threads are capped first (cap_threads: its share of the CPUs, less its `num_workers` data workers)."""
    cap_threads(num_workers)
    use_cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    distributed = "RANK" in os.environ
    owns_group = distributed and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if not use_cuda:
            device = torch.device("cpu")
        elif device in ("auto", "cuda") or distributed:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = torch.device(device)
        if use_cuda:
            torch.cuda.set_device(device)
        yield rank, world, device
    finally:
        if owns_group:
            dist.destroy_process_group()
