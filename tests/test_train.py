"""train.py on the CPU with tiny presets: data, the REPA-E step's gradient routing, resume, DDP, guard rails.

The real H&E tiles of tests/data/tiles (224 px, cut from the CMU-1-Small-Region slide) are scaled to
32 px with --resize scale, so that a training step takes a fraction of a second.
"""
import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from support import data, manifests, weights

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TILES = REPO / "tests" / "data" / "tiles"
TINY = ["--tiles", str(TILES), "--image-size", "32", "--resize", "scale", "--model", "SiT-T/2", "--vae", "tiny",
        "--encoder", "tiny", "--no-lpips", "--global-batch-size", "2", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "0"]


def tiny_args(out, *extra):
    return train.parse_args(TINY + ["--out", str(out), *extra])



def tensors_equal(a, b):
    """Bitwise equality of two nested structures of tensors (state dicts, optimizer states)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def batch_of(x, cond, target, t, eps):
    return SimpleNamespace(x=x, cond=cond, target=target, t=t, eps=eps)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def read_metrics(results_dir):
    with open(Path(results_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_png(path, colour, size=32):
    Image.new("RGB", (size, size), colour).save(path)


# -- setup ----------------------------------------------------------------------------------------------
def test_global_batch_must_divide_by_world_size():
    assert train.local_batch_size(640, 64) == 10
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        train.local_batch_size(640, 3)


# -- the step ------------------------------------------------------------------------------------------
@pytest.fixture
def step_setup(tmp_path):
    """Tiny models, optimizers and one batch of real tiles with encoder targets."""
    args = tiny_args(tmp_path)
    m = train.build_models(args, torch.device("cpu"), 1, None)
    opts = train.build_optimizers(args, m)
    dataset = data.TileFolder(manifests.find_tiles(str(TILES)).items[:4], 32, resize="scale")
    images = torch.stack([dataset[i][0] for i in range(4)])
    cond, target = train.encoder_features(m.encoder, images, token_grid=m.sit.token_grid)
    x = images.float() / 127.5 - 1
    torch.manual_seed(0)
    t, eps = torch.rand(4), torch.randn(4, 4, 4, 4)
    return args, m, opts, x, cond, target, t, eps


def test_vae_align_pass_changes_no_sit_weight(step_setup):
    args, m, opts, x, cond, target, t, eps = step_setup
    sit_before, vae_before = snapshot(m.sit), snapshot(m.vae)
    z, recon, terms = train.vae_update(m, opts["vae"], batch_of(x, cond, target, t, eps), args)
    assert tensors_equal(snapshot(m.sit), sit_before)  # parameters and BN running statistics
    assert all(p.grad is None for p in m.sit.parameters())
    assert not tensors_equal(snapshot(m.vae), vae_before)
    assert terms["proj_vae"].item() < 0 and m.sit.training
    assert not m.sit.pos_embed.requires_grad and m.sit.blocks[0].attn.qkv.weight.requires_grad  # flags restored
    assert all(p.requires_grad for p in m.disc.parameters())


def test_vae_align_loss_reaches_the_encoder_through_the_sit(step_setup):
    """The 1.5 x REPA term alone moves the VAE encoder (and not its decoder: Adam's first step on a zero
    gradient is zero)."""
    args, m, opts, x, cond, target, t, eps = step_setup
    for name in ("l1_weight", "lpips_weight", "kl_weight", "gan_weight"):
        setattr(args, name, 0.0)
    encoder, decoder = snapshot(m.vae.encoder), snapshot(m.vae.decoder)
    train.vae_update(m, opts["vae"], batch_of(x, cond, target, t, eps), args)
    assert not tensors_equal(snapshot(m.vae.encoder), encoder)
    assert tensors_equal(snapshot(m.vae.decoder), decoder)
    assert all(p.grad is None for p in m.vae.parameters())  # freed right after the step


def test_paper_defaults():
    """CytoSyn §3.3 and REPA-E §3: the numbers a run gets without flags."""
    a = train.parse_args(["--tiles", "tiles"])
    assert (a.model, a.vae, a.encoder, a.image_size, a.global_batch_size) == ("SiT-XL/2", "f8d4", "h0-mini", 224, 640)
    assert (a.l1_weight, a.lpips_weight, a.kl_weight, a.gan_weight) == (1.0, 1.0, 1e-6, 0.1)
    assert (a.proj_vae_weight, a.proj_sit_weight, a.cond_dropout, a.ema_decay) == (1.5, 0.5, 0.1, 0.9999)
    assert (a.lr, a.vae_lr, a.disc_lr, a.adam_beta1, a.adam_beta2, a.weight_decay, a.max_grad_norm) == (
        1e-4, 1e-4, 1e-4, 0.9, 0.999, 0.0, 1.0)
    from vae_loss import LPIPS
    # LPIPS: the calibrated heads REPA-E trains with (not 1/C per channel), on the correct [-1, 1] range
    assert (a.no_lpips, a.lpips_heads, a.lpips_vgg_range_quirk) == (False, None, False)
    lpips = LPIPS(pretrained=False, heads=a.lpips_heads, vgg_range_quirk=a.lpips_vgg_range_quirk)
    sums = [round(float(getattr(lpips, f"head{k}").sum()), 2) for k in range(5)]
    assert lpips.calibrated and sums == [6.93, 8.86, 17.52, 51.52, 47.03]
    assert train.parse_args(["--tiles", "tiles", "--lpips-uniform"]).lpips_heads == "uniform"


def test_step_losses_are_the_weighted_sums_of_their_terms(step_setup):
    args, m, opts, x, cond, target, t, eps = step_setup
    args.kl_weight = 0.25  # large enough to show in the sum
    with torch.no_grad():
        kl = m.vae.encode(x).kl().mean()  # summed over C, H, W, batch mean (does not depend on the sample)
    z, recon, vt = train.vae_update(m, opts["vae"], batch_of(x, cond, target, t, eps), args)
    torch.testing.assert_close(vt["kl"], kl)
    assert "lpips" not in vt  # --no-lpips: the term is not computed, not logged, not plotted
    expected = vt["l1"] + 0.25 * vt["kl"] + 0.1 * vt["gan"] + 1.5 * vt["proj_vae"]
    torch.testing.assert_close(vt["vae_loss"], expected)
    st = train.sit_update(m, opts["sit"], z, batch_of(x, cond, target, t, eps), args)
    torch.testing.assert_close(st["sit_loss"], st["diffusion"] + 0.5 * st["proj_sit"])


def test_train_step_shares_t_and_eps_between_passes_and_updates_both_emas(step_setup, monkeypatch):
    args, m, opts, x, cond, target, t, eps = step_setup
    calls = []
    real = train.interpolate
    monkeypatch.setattr(train, "interpolate", lambda x0, e, tt: calls.append((e, tt)) or real(x0, e, tt))
    images = ((x + 1) * 127.5).round().to(torch.uint8)
    sit_ema, vae_ema = snapshot(m.sit_ema), snapshot(m.vae_ema)
    train.train_step(m, opts, images, torch.empty(0), args)
    assert len(calls) == 2  # the VAE-align pass, then the SiT pass
    assert calls[0][0] is calls[1][0] and calls[0][1] is calls[1][1]  # the same eps and t tensors
    assert not tensors_equal(snapshot(m.sit_ema), sit_ema) and not tensors_equal(snapshot(m.vae_ema), vae_ema)


def test_diffusion_loss_sends_no_gradient_into_the_vae(step_setup):
    args, m, opts, x, cond, target, t, eps = step_setup
    posterior, z, _ = m.vae(x)  # z still attached to the VAE graph, as in the training step
    vae_before, sit_before = snapshot(m.vae), snapshot(m.sit)
    terms = train.sit_update(m, opts["sit"], z, batch_of(x, cond, target, t, eps), args)
    assert all(p.grad is None for p in m.vae.parameters())
    assert tensors_equal(snapshot(m.vae), vae_before)
    assert not tensors_equal(snapshot(m.sit), sit_before)
    assert m.sit.bn.num_batches_tracked.item() == 1  # the SiT pass used (and updated) batch statistics
    assert math.isfinite(terms["diffusion"].item())


def test_ema_averages_parameters_and_bn_buffers():
    a = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
        a[1].running_mean.fill_(2.0)
        a[1].num_batches_tracked.fill_(7)
    before = snapshot(b)
    train.update_ema(b, a, decay=0.75)
    assert torch.allclose(b[0].weight, before["0.weight"] + 0.25)
    assert torch.allclose(b[1].running_mean, torch.full((2,), 0.5))
    assert b[1].num_batches_tracked.item() == 7


def test_sit_overfits_a_few_tiles(step_setup):
    """The SiT update alone, on fixed latents of 4 real tiles: the diffusion loss must fall well below
    its start (about 2 = E|eps - x|^2 for an untrained model) in 300 steps."""
    args, m, opts, x, cond, target, t, eps = step_setup
    args.lr = 3e-3
    opts = train.build_optimizers(args, m)
    with torch.no_grad():
        z = m.vae.encode(x).mean
    torch.manual_seed(0)
    losses = []
    for _ in range(300):
        t, eps = torch.rand(4), torch.randn_like(z)
        terms = train.sit_update(m, opts["sit"], z, batch_of(x, cond, target, t, eps), args)
        losses.append(terms["diffusion"].item())
    start, end = np.mean(losses[:10]), np.mean(losses[-30:])
    assert start > 1.5 and end < 0.5 * start, (start, end)


# -- whole runs ----------------------------------------------------------------------------------------
def test_smoke_run_on_real_tiles(tmp_path):
    """Full objective (random-VGG LPIPS, GAN): finite losses, checkpoint, samples, curves; it loads back."""
    args = train.parse_args(TINY + ["--out", str(tmp_path), "--max-steps", "2", "--ckpt-every", "2",
                                    "--random-weights", "--sample-every", "2", "--num-sampling-steps", "2",
                                    "--grid-tiles", "3"])
    args.no_lpips = False
    train.train(args)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2"]
    for key in ("diffusion", "proj_sit", "proj_vae", "l1", "lpips", "kl", "gan", "disc", "grad_sit", "grad_vae",
                "grad_disc"):
        assert math.isfinite(float(rows[-1][key])), key
    assert float(rows[-1]["lpips"]) > 0 and float(rows[-1]["disc"]) > 0

    ckpt = torch.load(tmp_path / "checkpoints" / "0000002.pt", map_location="cpu", weights_only=True)
    assert {"config", "step", "sit", "sit_ema", "vae", "vae_ema", "disc", "opt_sit", "opt_vae", "opt_disc",
            "rng"} <= set(ckpt)
    cfg = ckpt["config"]
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 1
    assert (cfg["model"], cfg["vae"], cfg["encoder"], cfg["image_size"]) == ("SiT-T/2", "tiny", "tiny", 32)
    # the checkpoint rebuilds its models from its own config, as sample.py reads it
    loaded = weights.load_models(str(tmp_path / "checkpoints" / "0000002.pt"))
    assert tensors_equal(loaded.sit.state_dict(), ckpt["sit_ema"]) and loaded.encoder == "tiny"
    assert loaded.vae.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 32, 32)
    assert Image.open(tmp_path / "samples" / "0000002.png").size == (3 * 32, 2 * 32)
    assert Image.open(tmp_path / "loss.png").size[0] > 0
    assert "step=2" in (tmp_path / "log.txt").read_text()
    with pytest.raises(FileExistsError, match="--resume"):  # never silently overwrite a run
        train.train(args)


def test_resume_is_bitwise_identical(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more (mid-epoch: 8 tiles / batch 2 = 4 steps per epoch)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.train(tiny_args(straight, "--max-steps", "6", "--ckpt-every", "100"))
    train.train(tiny_args(split, "--max-steps", "3", "--ckpt-every", "100"))
    train.train(tiny_args(split, "--max-steps", "6", "--ckpt-every", "100", "--resume"))
    a = torch.load(straight / "checkpoints" / "0000006.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "0000006.pt", weights_only=True)
    for key in ("sit", "sit_ema", "vae", "vae_ema", "disc", "opt_sit", "opt_vae", "opt_disc"):
        assert tensors_equal(a[key], b[key]), key
    assert not tensors_equal(a["sit"], torch.load(split / "checkpoints" / "0000003.pt", weights_only=True)["sit"])
    assert [r["diffusion"] for r in read_metrics(straight)] == [r["diffusion"] for r in read_metrics(split)]


def test_bad_data_is_one_line_before_any_model_is_built(tmp_path):
    """With the default H0-mini (a gated download), a missing --data must still be what the user hears."""
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--tiles", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"train.py: error: --tiles {tmp_path / 'nope'}: not a folder of "
                                                f"tiles, a manifest .csv or a .tar shard"]
    # the error that stopped the run is also the last line of its log, beside its history
    assert (tmp_path / "r" / "log.txt").read_text().strip().splitlines()[-1].endswith(proc.stderr.strip())


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = train.diffusion_loss

    def poisoned(v_pred, v_target):
        calls.append(1)
        loss = real(v_pred, v_target)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(train, "diffusion_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 3: diffusion=nan.*0000002\.pt"):
        train.train(tiny_args(tmp_path, "--max-steps", "5", "--ckpt-every", "2"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000002.pt", "0000002.pt.sha256"]  # and its sum
    ckpt = torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["sit"].values())


HELPER = """
import os, sys, torch, torch.distributed as dist
from support import data
import sit
import train
dist.init_process_group("gloo")
rank = dist.get_rank()
# SyncedLatentBatchNorm on each rank's half == BatchNorm2d on the whole batch.
z = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
bn = torch.nn.BatchNorm2d(4, eps=1e-4, affine=False)
synced = sit.synced_batchnorm(bn)
out = synced(z[2 * rank:2 * rank + 2])
ref = bn(z)
bn_ok = (torch.allclose(out, ref[2 * rank:2 * rank + 2], atol=1e-5)
         and torch.allclose(synced.running_mean, bn.running_mean)
         and torch.allclose(synced.running_var, bn.running_var))
m = train.train(train.parse_args(sys.argv[1:]))
torch.save({"bn_ok": bn_ok, "sit": m.sit.state_dict(), "vae": m.vae.state_dict(), "disc": m.disc.state_dict(),
            "sit_ema": m.sit_ema.state_dict(), "vae_ema": m.vae_ema.state_dict()},
           os.path.join(m.results_dir, f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    (tmp_path / "helper.py").write_text(HELPER.replace("m.results_dir", repr(str(tmp_path))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "helper.py"), *TINY, "--global-batch-size", "4", "--max-steps", "2",
           "--ckpt-every", "2", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["bn_ok"] and r1["bn_ok"]
    for key in ("sit", "vae", "sit_ema", "vae_ema"):  # parameters and the synced latent BN statistics
        assert tensors_equal(r0[key], r1[key]), key
    params = [k for k in r0["disc"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0["disc"][k], r1["disc"][k]) for k in params)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000002.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert ckpt["config"]["world_size"] == 2
    assert not tensors_equal(ckpt["sit"], train.build_models(train.parse_args(TINY), torch.device("cpu"), 1,
                                                             None).sit.state_dict())


# -- what crosses a file boundary ---------------------------------------------------------------------
def test_each_network_gets_the_pixel_range_it_expects(step_setup, monkeypatch):
    """The tile decoder's uint8 pixels reach the encoder untouched (features.py scales them) and the VAE
    as x / 127.5 - 1 in [-1, 1], exactly; the REPA target and the condition are the encoder's."""
    args, m, opts, *_ = step_setup
    path = sorted(TILES.glob("*.png"))[0]
    pixels = np.array(Image.open(path).convert("RGB"))[96:128, 96:128]  # a 32 px crop of a real tile
    images = data.decode_tile(path, str(path), 32, resize="crop")[None]
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), pixels)  # the decoder changes no pixel
    seen = {}
    real_encoder = train.encoder_features
    monkeypatch.setattr(train, "encoder_features", lambda enc, x, token_grid: seen.setdefault("enc", x) is not None
                        and real_encoder(enc, x, token_grid=token_grid))
    batch = train.make_batch(m, images, torch.empty(0))
    assert seen["enc"].dtype == torch.uint8 and torch.equal(seen["enc"].cpu(), images)
    assert torch.equal(batch.x, images.float() / 127.5 - 1) and -1 <= batch.x.min() and batch.x.max() <= 1
    cond, target = real_encoder(m.encoder, images, token_grid=m.sit.token_grid)
    assert torch.equal(batch.cond, cond) and torch.equal(batch.target, target)
    vae_inputs = []
    m.forward.vae = lambda x: vae_inputs.append(x) or m.vae(x)
    train.vae_update(m, opts["vae"], batch, args)
    assert vae_inputs[0] is batch.x


def test_precomputed_tokens_are_split_into_condition_and_target(step_setup):
    args, m, opts, *_ = step_setup
    feats = torch.randn(2, 1 + m.sit.token_grid ** 2, 48)
    batch = train.make_batch(m, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), feats)
    assert torch.equal(batch.cond, feats[:, 0]) and torch.equal(batch.target, feats[:, 1:])


def test_training_from_the_slides_equals_training_from_the_pngs(tmp_path):
    """--slides reads each tile from its slide: the same pixels, so the same weights, bit for bit."""
    import tiling
    out = tmp_path / "tiles"
    assert tiling.main(["--slides", str(REPO / "tests" / "data"), "--out", str(out), "--max-tiles-per-slide", "8"]) == 0
    common = ["--tiles", str(out / "manifest.csv"), *TINY[2:], "--max-steps", "2", "--ckpt-every", "2"]
    train.main(common + ["--out", str(tmp_path / "png")])
    train.main(common + ["--out", str(tmp_path / "slides"), "--slides", str(REPO / "tests" / "data")])
    a, b = (torch.load(tmp_path / run / "checkpoints" / "0000002.pt", weights_only=False) for run in ("png", "slides"))
    for key in ("sit", "vae", "sit_ema", "vae_ema", "disc"):
        assert tensors_equal(a[key], b[key]), key
    assert "read from the slides in" in (tmp_path / "slides" / "log.txt").read_text()


# -- --init-from: a new run from existing weights (export, train.py, REPA-E, diffusers VAE) ---------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run: its checkpoint's EMA weights differ from a fresh initialisation."""
    results = tmp_path_factory.mktemp("trained")
    train.train(tiny_args(results, "--max-steps", "2", "--ckpt-every", "2"))
    return results / "checkpoints" / "0000002.pt"


def fresh_nets(tmp_path):
    return train.build_models(tiny_args(tmp_path), torch.device("cpu"), 1, None)


def test_init_from_a_checkpoint_and_its_export_loads_the_ema_weights(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    weights.export(str(trained), str(tmp_path / "export"))
    weights.export(str(trained), str(tmp_path / "release"), layout="diffusers")  # the release's layout too
    for source in (trained, tmp_path / "export", tmp_path / "release"):
        nets = fresh_nets(tmp_path)
        lines = weights.init_from(str(source), nets)
        assert "left at" in lines[1] and ", 0 left at initialisation" in lines[1], lines
        for net in ("sit", "sit_ema", "vae", "vae_ema"):
            assert tensors_equal(getattr(nets, net).state_dict(), ckpt[net.split("_")[0] + "_ema"]), (source, net)


def test_init_from_a_class_conditional_repae_checkpoint_leaves_the_conditioning_at_init(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    sit = {k: v for k, v in ckpt["sit"].items() if not k.startswith("y_embedder.")}
    sit["y_embedder.embedding_table.weight"] = torch.randn(1001, 64)  # ImageNet's class table
    torch.save({"model": sit, "ema": sit, "vae": ckpt["vae"], "opt": {}, "args": {"seed": 0}}, tmp_path / "repae.pt")
    nets = fresh_nets(tmp_path)
    init = snapshot(nets.sit)
    lines = weights.init_from(str(tmp_path / "repae.pt"), nets)
    assert "class table" in lines[0] and "left at initialisation: y_embedder (5)" in lines[1], lines
    for k, v in nets.sit.state_dict().items():
        assert torch.equal(v, init[k] if k.startswith("y_embedder.") else ckpt["sit"][k]), k
    assert tensors_equal(nets.vae.state_dict(), ckpt["vae"]) and tensors_equal(nets.vae_ema.state_dict(), ckpt["vae"])


def test_init_from_a_diffusers_vae_converts_it_and_leaves_the_sit(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    torch.manual_seed(1)
    ref = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  block_out_channels=[32] * 4, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=32)
    (tmp_path / "vae").mkdir()
    save_file(ref.state_dict(), tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    nets = fresh_nets(tmp_path)
    sit = snapshot(nets.sit)
    lines = weights.init_from(str(tmp_path), nets)  # the folder holding vae/diffusion_pytorch_model.*
    assert "diffusers VAE" in lines[0] and "SIT: nothing" in lines[1] and ", 0 left at" in lines[2], lines
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(nets.vae_ema.decode(nets.vae.encode(x).mean), ref.decode(ref.encode(x).latent_dist.mean)
                              .sample, atol=1e-5)
    assert tensors_equal(snapshot(nets.sit), sit)


def test_init_from_round_trips_the_discriminator(trained, tmp_path):
    """train.py's `disc`, REPA-E's `discriminator` (its checkpoint, its -discriminator-ckpt.pt alone, or nested under
    one key); an export holds none, and says so."""
    ckpt = torch.load(trained, weights_only=True)
    torch.save(ckpt["disc"], tmp_path / "disc.pt")
    torch.save({"discriminator": ckpt["disc"]}, tmp_path / "nested.pt")
    torch.save({"model": ckpt["sit"], "ema": ckpt["sit_ema"], "vae": ckpt["vae"], "discriminator": ckpt["disc"],
                "args": {}, "steps": 2}, tmp_path / "repae.pt")
    for source in (trained, tmp_path / "disc.pt", tmp_path / "nested.pt", tmp_path / "repae.pt"):
        nets = fresh_nets(tmp_path)
        assert not tensors_equal(nets.disc.state_dict(), ckpt["disc"])
        lines = weights.init_from(str(source), nets)
        assert tensors_equal(nets.disc.state_dict(), ckpt["disc"]), source
        assert (lines[-1].startswith(f"DISC: {len(ckpt['disc'])} tensors loaded from")
                and ", 0 left at" in lines[-1]), lines
    weights.export(str(trained), str(tmp_path / "export"))
    nets = fresh_nets(tmp_path)
    init = snapshot(nets.disc)
    lines = weights.init_from([str(tmp_path / "export"), str(tmp_path / "disc.pt")], nets)  # one network each
    assert "exports hold no discriminator" in lines[0] and "discriminator's state dict" in lines[1], lines
    assert tensors_equal(nets.sit.state_dict(), ckpt["sit_ema"]) and tensors_equal(nets.disc.state_dict(), ckpt["disc"])
    lines = weights.init_from(str(tmp_path / "export"), nets := fresh_nets(tmp_path))
    assert lines[-1].startswith("DISC: nothing in") and tensors_equal(snapshot(nets.disc), init), lines
    with pytest.raises(ValueError, match=r"both .*0000002.pt and .*disc.pt hold DISC weights"):
        weights.init_from([str(trained), str(tmp_path / "disc.pt")], fresh_nets(tmp_path))
    no_gan = train.build_models(tiny_args(tmp_path, "--no-gan"), torch.device("cpu"), 1, None)
    assert "not loaded: this run has no discriminator" in weights.init_from(str(trained), no_gan)[-1]


def test_init_from_a_discriminator_of_another_width_names_the_tensors(trained, tmp_path):
    from vae_loss import NLayerDiscriminator
    torch.save(NLayerDiscriminator(ndf=32).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"DISC weights does not fit .*main.0.weight \(32, 3, 4, 4\)"):
        weights.init_from(str(tmp_path / "narrow.pt"), fresh_nets(tmp_path))


def test_init_from_weights_of_another_size_names_the_tensors(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["sit_ema"]["pos_embed"] = torch.zeros(1, 4, 96)
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(ValueError,
                       match=r"SIT weights does not fit .*pos_embed \(1, 4, 96\) \(this run: \(1, 4, 64\)\)"):
        weights.init_from(str(tmp_path / "other.pt"), fresh_nets(tmp_path))


def test_init_from_starts_a_new_run_and_excludes_resume(trained, tmp_path, capsys):
    train.train(tiny_args(tmp_path / "run", "--max-steps", "1", "--init-from", str(trained)))
    assert "--init-from" in (tmp_path / "run" / "log.txt").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == ["1"]  # step 0 + 1: a new run
    with pytest.raises(ValueError, match="--init-from starts a new run, --resume continues one"):
        tiny_args(tmp_path, "--resume", "--init-from", str(trained))


def test_truncated_latest_checkpoint_names_the_newest_readable_one(trained, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    good = tmp_path / "checkpoints" / "0000002.pt"
    good.write_bytes(trained.read_bytes())
    (tmp_path / "checkpoints" / "0000004.pt").write_bytes(trained.read_bytes()[:5000])  # killed mid-copy
    with pytest.raises(ValueError, match=rf"0000004.pt is unreadable .* newest readable one is {good}: pass --resume"):
        train.train(tiny_args(tmp_path, "--max-steps", "6", "--resume"))
