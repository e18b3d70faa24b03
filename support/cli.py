"""The command-line vocabulary of the repo and its one error path.

    CytoSynError and its kinds   what a user can cause; helpers raise them, and nothing below __main__ exits
    DiskFull, disk_full(err)     a write the disk refused (full, quota, file-size limit): what, how much, what next
    Interrupted                  Ctrl-C (SIGINT) or SIGTERM, raised where the program is, as KeyboardInterrupt is
    run(main)                    every script's __main__: an error becomes one line on stderr and exit status 1;
                                 an interruption one line and 130 (SIGINT) or 143 (SIGTERM), 128 + the signal
    ArgumentParser               every tool's parser: a bad flag is an InputError, so the same one line
    number_in(float, 0, 1)       an argparse type: a finite number in a range; the error gives the range
    add_sampling_args(p) ...     the flags several tools share, defined once so that a name means one thing
    default_workers()            --num-workers' default: this machine's CPUs less the main process, at most 8
    processes(device, workers)   the torchrun processes (rank, world size, device); one process without it;
                                 intra-op threads capped so that the processes' threads fit the CPUs

Left out: configuration files (run settings live in argparse with the paper's defaults).
"""
import argparse
import errno
import math
import os
import resource
import signal
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
    """Weights or a package that this machine does not have (a gated model, no network). `then`, when set, says
    how this tool runs without them; a tool whose flag for that differs sets its own."""

    def __init__(self, message, then=None):
        super().__init__(message, then)
        self.message, self.then = message, then

    def __str__(self):
        return self.message + (f"; {self.then}" if self.then else "")


RERUN = "rerun the same command: what is finished is kept"  # how every tool but train.py continues
FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file larger than the file-size limit (ulimit -f)"}
NEARLY_FULL = 1 << 20  # a write that fails without an errno (numpy's tofile) with less free than this: a full disk


class DiskFull(CytoSynError):
    """A write the disk refused: no space left, a quota, or the file-size limit. The message says what could not
    be written, how many bytes the write needed (`needed`, known `bound`: "about", "at most", or "at least" when
    the write stopped before its end), and how to continue (`then`; train.py's --resume sets its own)."""

    def __init__(self, path, reason, needed, bound="at least", then=RERUN):
        super().__init__(path, reason, needed, bound, then)
        self.path, self.reason, self.needed, self.bound, self.then = path, reason, needed, bound, then

    def __str__(self):
        where = "raise the limit" if "ulimit" in self.reason else "free space on its disk"
        return (f"could not write {self.path}: {self.reason} (the write needed {self.bound} "
                f"{human_bytes(self.needed)}); {where}, then {self.then}")


def human_bytes(n):
    """12146540 -> '12.1 MB' (decimal units, as df -H)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def chain(err):
    """An exception and those it was raised from or while handling, in order."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def full_disk_reason(err, path=None):
    """Why a write failed when the disk refused it -> FULL_DISK's words, else None. The errno of the error or of
    one it came from (torch, h5py and Pillow wrap the OSError, or only keep its text); else, for a write that
    failed without one (numpy's short write), the state of the disk: nearly no space left, or a file-size limit
    that the file has reached."""
    for e in chain(err):
        if getattr(e, "errno", None) in FULL_DISK:
            return FULL_DISK[e.errno]
        text = str(e)
        for code, reason in FULL_DISK.items():
            if os.strerror(code) in text or f"errno = {code}," in text:
                return reason
    if path is None or not any(isinstance(e, (OSError, RuntimeError)) for e in chain(err)):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    try:
        stats = os.statvfs(folder)
        if stats.f_bavail * stats.f_frsize < NEARLY_FULL:
            return FULL_DISK[errno.ENOSPC]
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and os.path.exists(path) and os.path.getsize(path) >= limit:
        return FULL_DISK[errno.EFBIG]
    return None


def disk_full(err, path, tmp=None, needed=0, bound="about", then=RERUN):
    """A failed write of `path` (through the temporary file `tmp`, if any) -> a DiskFull when the disk refused it,
    else None. The bytes it needed: `needed` (the whole file's, known `bound`) or, when larger or unknown, what
    tmp had reached when the disk refused the rest. Call it before removing tmp."""
    reason = full_disk_reason(err, tmp or path)
    if reason is None:
        return None
    written = os.path.getsize(tmp) if tmp and os.path.exists(tmp) else 0
    if written > needed or not needed:
        needed, bound = written, "at least"
    return DiskFull(str(path), reason, needed, bound, then)


def error_line(err):
    """The one line a user sees for an error. An error raised in a DataLoader worker comes back with the
    worker's traceback folded into its message: keep its last line, the error itself."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


SIGNALS = {signal.SIGINT: "Ctrl-C, SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, as a cluster scheduler sends before it kills a job. A KeyboardInterrupt, so
    that it passes every `except Exception` and DataLoader workers end on it quietly. `where` and `then`, when a
    tool sets them, say where the work stopped and how to continue."""

    def __init__(self, signum=signal.SIGINT, where="", then=RERUN):
        super().__init__(signum, where, then)
        self.signum, self.where, self.then = signum, where, then

    @property
    def status(self):
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self):
        return f"interrupted{' ' + self.where if self.where else ''} ({SIGNALS[self.signum]}); {self.then}"


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run(main, argv=None):
    """Every script's __main__: main(argv) returns an exit status; a CytoSynError ends the program with
    one line, `SCRIPT: error: ...`, on stderr and exit status 1. Ctrl-C and SIGTERM end it with one line,
    `SCRIPT: interrupted ...`, and 128 + the signal, once the code they interrupted has removed its temporary
    files. A write the disk refused in code that does not say which file (a library's own write) still gets
    one line. Other exceptions are bugs: a traceback."""
    prog = os.path.basename(sys.argv[0]) or "cytosyn"
    handlers = {signum: signal.signal(signum, raise_interrupted) for signum in SIGNALS}
    line, newline = None, ""
    try:
        status = main(argv)
    except CytoSynError as err:
        line, status = f"error: {error_line(err)}", 1
    except KeyboardInterrupt as err:
        err = err if isinstance(err, Interrupted) else Interrupted()
        newline = "\n" if sys.stderr.isatty() else ""  # off the line of the terminal's ^C, or of a progress bar
        line, status = error_line(err), err.status
    except Exception as err:  # torch, h5py and safetensors wrap the OSError, or keep only its text
        if full_disk_reason(err) is None:
            raise
        line, status = (f"error: could not write {getattr(err, 'filename', None) or 'a file'}: "
                        f"{full_disk_reason(err)}; free space on its disk, then {RERUN}"), 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if line:
        print(f"{newline}{prog}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(status or 0)


class ArgumentParser(argparse.ArgumentParser):
    """Every tool's parser (its subcommands' too): a flag argparse refuses (out of range, unknown, missing) is an
    InputError, so it ends in the one line and status of every other error (argparse would print its usage and
    exit with 2)."""

    def error(self, message):
        hint = f"; `{self.prog} --help` lists the flags" if "unrecognized" in message or "required" in message else ""
        raise InputError(message + hint)


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
MAX_DEFAULT_WORKERS = 8  # the default's ceiling (features.py's and metrics.py's before it); more: --num-workers
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


def default_workers(cap=MAX_DEFAULT_WORKERS):
    """--num-workers' default: this process's share of the CPUs (available_cpus, split between torchrun's local
    ranks) less one for the process itself, at most `cap`: no more than the machine has (PyTorch warns, and
    the workers would only wait for each other), none on one CPU."""
    share = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(cap, max(0, share - 1))


def add_workers_arg(p):
    default = default_workers()
    p.add_argument("--num-workers", type=WORKERS, default=default, help=f"data-loader worker processes (default "
                   f"{default}: this machine's CPUs less one, at most {MAX_DEFAULT_WORKERS})")


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
