"""GPU-only checks (skipped on machines without CUDA, so CI skips them): the sampling loops make no
host-device synchronisation, so a GPU never idles waiting for Python between network evaluations; the
--compile paths of sample.py and train.py compute what the eager code computes."""
import os
import re
import subprocess
import sys

import pytest
import torch

import sampler
from sample import Pipeline
from sit import build_sit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sampling_loops_never_synchronise():
    dev = torch.device("cuda")
    sit = build_sit("SiT-T/2", input_size=8, cond_dim=16).to(dev).eval()

    def velocity(x, t, c, drop=None):
        return sit(x, t, c, drop)[0]

    x, cond = torch.randn(4, 4, 8, 8, device=dev), torch.randn(4, 16, device=dev)
    gens = [torch.Generator(dev).manual_seed(i) for i in range(4)]
    runs = [lambda: sampler.euler_maruyama_sampler(velocity, x, cond, 10, 2.5, 0.0, 0.75, generator=gens),
            lambda: sampler.euler_sampler(velocity, x, cond, 10, 2.5, 0.0, 0.75, heun=True),
            lambda: sampler.euler_maruyama_sampler(velocity, x, None, 10, generator=gens[0])]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for run in runs:
            run()  # warm-up: first calls may synchronise while setting kernels up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
        try:
            for run in runs:
                run()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_compiled_velocity_matches_eager_and_never_synchronises():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sit = build_sit("SiT-S/2", input_size=8, cond_dim=16).to(dev).eval()
    with torch.no_grad():  # adaLN-Zero starts at exactly zero output; perturb so the test sees the blocks
        for p in sit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    eager, compiled = Pipeline(sit, None, dev).velocity, Pipeline(sit, None, dev, compile=True).velocity
    x, cond = torch.randn(4, 4, 8, 8, device=dev), torch.randn(4, 16, device=dev)

    def run(velocity):
        gens = [torch.Generator(dev).manual_seed(i) for i in range(4)]
        return sampler.euler_maruyama_sampler(velocity, x, cond, 10, 2.5, 0.0, 0.75, generator=gens)

    torch.backends.cuda.matmul.allow_tf32 = False
    reference = run(eager)
    run(compiled)  # compiles the unguided and the guided batch shape
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(compiled)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reference.abs().max() > 0.5  # a real output, not a zero field
    assert (out - reference).abs().max() < 1e-3


def test_compiled_training_step_runs_and_reports_the_sit_phase():
    argv = ["--out", "", "train", "--compile", "--model", "SiT-S/2", "--vae", "tiny", "--encoder", "tiny", "--no-lpips",
            "--image-size", "64", "--batch-size", "8", "--timed-steps", "2", "--warmup", "2"]
    proc = subprocess.run([sys.executable, "bench.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "bench train:" in ln)
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    assert fields["compile"] == "True"
    for phase in ("vae", "vae_opt", "sit", "sit_opt", "disc", "ema"):
        assert float(fields[f"ms_{phase}"]) > 0
    assert 0 < float(fields["mfu_sit"]) < 1
