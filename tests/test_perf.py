"""support/perf.py: the numerator (FLOPs per phase) and the denominator (the GPU's bf16 peak) of MFU."""
import torch

from support import perf


def test_phase_flops_counts_each_phase_apart():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    flops = perf.PhaseFlops()
    with flops("matmul"):
        a @ b
    with flops("matmul"):  # a phase seen twice adds up
        a @ b
    with flops("elementwise"):
        a + 1  # not a matmul, convolution or attention: not counted
    assert flops.totals == {"matmul": 2 * (2 * 4 * 8 * 16), "elementwise": 0}


def test_peak_flops_by_device_name(monkeypatch):
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert perf.peak_flops(cuda) == peak, name
    assert perf.peak_flops(torch.device("cpu")) is None
