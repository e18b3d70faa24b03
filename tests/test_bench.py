"""bench.py on the CPU with tiny presets: each subcommand runs and reports what it measured."""
import json

import numpy as np
import pytest

import bench
import metrics as M
from support import weights
from tests import synthetic_slide


def correlated(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mix) * scale + shift


def test_sample_counts_network_evaluations(tmp_path):
    record = bench.measure(["--out", str(tmp_path), "sample", "--model", "SiT-T/2", "--vae", "tiny",
                            "--batch-size", "2", "--num-sampling-steps", "10", "--image-size", "32"])
    # 10 SDE steps on linspace(1, 0.04, 10): 7 of them at t <= 0.75 are guided (2 rows each) -> 17
    assert record["nfe_per_image"] == 17 and record["img_per_s"] > 0
    line = json.loads((tmp_path / "bench.jsonl").read_text().splitlines()[-1])
    assert line["bench"] == "sample" and line["nfe_per_image"] == 17 and "torch" in line and "date" in line


def test_train_times_and_counts_every_phase(tmp_path):
    record = bench.measure(["--out", "", "train", "--model", "SiT-T/2", "--vae", "tiny", "--encoder", "tiny",
                            "--image-size", "32", "--batch-size", "2", "--timed-steps", "1", "--warmup", "0"])
    for phase in ("encoder", "vae", "vae_opt", "disc", "sit", "sit_opt", "ema"):
        assert record[f"ms_{phase}"] > 0, phase
    assert record["tflop_sit"] > 0 and record["tflop_vae"] > record["tflop_sit"]  # the VAE pass dominates
    assert "mfu_step" not in record  # no MFU without a bf16 GPU run


def test_fd_agrees_with_the_sqrtm_formula():
    record = bench.bench_fd(bench.argparse.Namespace(num_vectors=500, dims=16, seed=0))
    assert record["rel_diff"] < 1e-6 and record["fd_ours"] > 0


def test_sqrtm_reference_agrees_with_ours():
    rng = np.random.default_rng(5)
    x, y = correlated(rng, 2000, 16).astype(np.float32), correlated(rng, 2000, 16, 0.3).astype(np.float32)
    stats = (np.mean(x, 0), np.cov(x, rowvar=False), np.mean(y, 0), np.cov(y, rowvar=False))
    assert bench.fd_sqrtm_reference(*stats) == pytest.approx(M.fd(M.feature_stats(x), M.feature_stats(y)), rel=1e-6)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        bench.measure(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "sample", "fd", "tiling", "weights", "region", "nearest"))


def test_bench_tiling_runs_and_reads_identical_pixels(tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    synthetic_slide.write_pyramid_tiff(folder / "small.tiff", synthetic_slide.synthetic_tissue(1024), 0.5, (1,))
    record = bench.measure(["--out", "", "tiling", "--slides", str(folder), "--pyramid-px", "1024", "--rounds", "1",
                            "--work-dir", str(tmp_path / "work")])
    assert record["slides.identical_pixels"] and record["pyramid.identical_pixels"]
    assert record["slides.worker_slides_tiles_per_s"] > 0 and record["pyramid.run_tiles_per_s"] > 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "one data worker" in line]
    assert len(lines) == 2 and all("identical pixels" in line for line in lines)


def test_bench_weights_sizes_from_shapes_match_the_written_files(tmp_path):
    record = bench.measure(["--out", "", "weights", "--model", "SiT-T/2", "--vae", "tiny", "--work-dir", str(tmp_path)])
    on_disk = {f: (tmp_path / f).stat().st_size / 1e6 for f in ("sit_ema.safetensors", "vae_ema.safetensors")}
    assert 0 < on_disk["sit_ema.safetensors"] - record["sit_mb"] < 0.05  # the safetensors header, nothing more
    assert 0 < on_disk["vae_ema.safetensors"] - record["vae_mb"] < 0.05
    assert record["load_s"] > 0 and weights.load_models(str(tmp_path)).sit.config["model"] == "SiT-T/2"


def test_the_timed_step_is_train_step():
    """bench.py times train.train_step's calls one by one: from the same state they give the same weights."""
    import torch

    import train
    argv = ["--tiles", "unused", "--model", "SiT-T/2", "--vae", "tiny", "--encoder", "tiny", "--image-size", "32",
            "--global-batch-size", "2", "--random-weights"]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    states = []
    for step in ("train_step", "timed_step"):
        args = train.parse_args(argv)
        nets = train.wrap_models(train.build_models(args, torch.device("cpu"), 1), args, False)
        opts = train.build_optimizers(args, nets)
        before = {k: v.clone() for k, v in nets.sit.state_dict().items()}
        torch.manual_seed(1)
        if step == "train_step":
            train.train_step(nets, opts, images, torch.empty(0), args)
        else:
            bench.timed_step(nets, opts, images, torch.empty(0), args, bench.PhaseTimer(torch.device("cpu")))
        states.append({name: getattr(nets, name).state_dict() for name in ("sit", "sit_ema", "vae", "vae_ema", "disc")})
    for name, sd in states[0].items():
        assert all(torch.equal(sd[k], states[1][name][k]) for k in sd), name
    assert not torch.equal(states[0]["sit"]["final_layer.linear.weight"], before["final_layer.linear.weight"])


def test_region_decodes_a_twin_in_tiles_and_whole():
    tiled = bench.measure(["--out", "", "region", "--vae", "tiny", "--size", "640,96", "--device", "cpu"])
    whole = bench.measure(["--out", "", "region", "--vae", "tiny", "--size", "640,96", "--device", "cpu", "--whole"])
    assert tiled["decoding"] == "tiles of 512 px, 128 px overlap" and whole["decoding"] == "whole"
    assert tiled["size"] == [640, 96] and tiled["decode_s"] > 0 and tiled["peak_mem_gb"] > 0


def test_nearest_times_the_audits_search():
    record = bench.measure(["--out", "", "nearest", "--num-tiles", "30", "--num-train", "200", "--dims", "8",
                            "--device", "cpu"])
    assert record["num_tiles"] * record["num_train"] / record["search_s"] == pytest.approx(record["pairs_per_s"])
