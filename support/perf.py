"""Measuring speed for bench.py (and the per-step peak memory train.py logs): wall time and FLOPs per
phase, peak memory, and the GPU's dense bf16 peak, so that model FLOPs utilisation (MFU) is

    FLOPs counted by PyTorch's FlopCounterMode (matmuls, convolutions, attention) / seconds / peak.

The phase objects are context managers called with the phase's name, so one step function can be
run untimed (training), timed (benchmark) or counted (FLOPs) without a branch in it.
"""
import resource
import time
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks per GPU (vendor data sheets), the denominator of MFU. The first key found
# in the device's name wins, so the PCIe and NVL parts (lower clocks) come before their SXM siblings.
BF16_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def untimed(phase):
    """The timer of an ordinary step: times nothing."""
    return nullcontext()


class PhaseTimer:
    """Wall time per phase; synchronises the GPU around each phase, so only for benchmarks."""

    def __init__(self, device):
        self.device, self.totals = device, {}

    @contextmanager
    def __call__(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


class PhaseFlops:
    """Same interface as PhaseTimer, but counts the FLOPs of each phase: the numerator of MFU.
    FlopCounterMode cannot see inside a torch.compile'd graph: count on the eager modules."""

    def __init__(self):
        self.totals = {}

    @contextmanager
    def __call__(self, name):
        with FlopCounterMode(display=False) as counter:
            yield
        self.totals[name] = self.totals.get(name, 0) + counter.get_total_flops()


def peak_flops(device):
    """The GPU's dense bf16 peak in FLOP/s, or None (CPU, or a GPU not in the table: no MFU). Callers ask
    for it only when the network runs in bf16."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in name), None)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
