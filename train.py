"""CytoSyn training: the VAE and the SiT trained end to end with REPA-E (CytoSyn §3.3; REPA-E §3).

    torchrun --nproc_per_node=8 train.py --tiles TILES --out results/cytosyn   # 1..64 GPUs
    torchrun ... train.py --tiles TILES --out results/cytosyn --resume        # continue the run
    python train.py --tiles TILES --model SiT-T/2 --vae tiny --encoder tiny ...  # one process, CPU

One step, in the paper's order (CytoSyn §3.3), on every rank with the same t and eps in both passes:
  1. VAE forward: posterior, z ~ posterior, reconstruction.
  2. VAE update, SiT frozen and in eval mode (running BN statistics): L1 + LPIPS + 1e-6 KL
     + 0.1 hinge-GAN generator loss + 1.5 x REPA loss of the SiT's first `encoder_depth` blocks.
  3. Discriminator update (hinge loss) on the real tiles and the detached reconstructions.
  4. SiT update on z.detach() (batch BN statistics, synced across ranks): diffusion loss
     + 0.5 x REPA loss. The diffusion loss never reaches the VAE.
  5. EMA (0.9999) of the SiT, BatchNorm buffers included, and (CytoSyn's addition) of the VAE.

Outputs in --out: checkpoints/NNNNNNN.pt (and its .sha256), log.txt, metrics.csv, loss.png and samples/NNNNNNN.png
(conditioning tiles above EMA samples of their CLS features). A resumed run is bitwise identical on the CPU.
The run locks --out (.lock): a second run into it is refused while the first runs.

Left out: gradient accumulation, learning-rate schedules (REPA-E uses a constant 1e-4), data augmentation
(neither paper states any), REPA-E's lognormal time sampling and LeCam regulariser.
"""
import argparse
import copy
import os
import sys
from contextlib import contextmanager, nullcontext, suppress
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from features import ENCODERS, encoder_features, load_encoder
from repa_loss import diffusion_loss, interpolate, repa_loss, sample_t, velocity_target
from sample import Pipeline, SamplingSettings
from sit import SiT_models, build_sit, synced_batchnorm
from support.checkpoints import latest_checkpoint, save_all_ranks, start_or_resume
from support.cli import (
    IMAGE_SIZE,
    MAX_STEPS,
    SEED,
    ArgumentParser,
    DiskFull,
    InputError,
    Interrupted,
    Unavailable,
    add_device_args,
    add_sampling_args,
    add_workers_arg,
    check_guidance,
    number_in,
    processes,
    resolve_precision,
    run,
)
from support.data import feature_dim, first_tiles, training_batches
from support.logs import Logger, errors_to_log, save_training_grid
from support.manifests import find_tiles
from support.outputs import claim_output_folder
from support.tiles import TILE_SIZE
from support.trackers import TRACKERS, require
from vae import build_vae, vae_models
from vae_loss import LPIPS, NLayerDiscriminator, add_lpips_args, hinge_d_loss, hinge_g_loss

LOSS_WEIGHT = number_in(float, 0, 10 ** 6)  # a loss term's weight: 0 turns the term off


# -------- One training step (CytoSyn §3.3) --------------------------------------------------------

def train_step(nets, opts, images, feats, args):
    """One REPA-E step on a batch of uint8 tiles (B, 3, H, W) -> the loss terms of this rank (tensors).
    `feats` holds precomputed (B, 1 + T, D) H0-mini tokens, or is empty (then the encoder runs)."""
    batch = make_batch(nets, images, feats)
    z, recon, terms = vae_update(nets, opts["vae"], batch, args)             # steps 1-2
    if nets.disc is not None:
        terms.update(disc_update(nets, opts["disc"], batch.x, recon, args))  # step 3
    terms.update(sit_update(nets, opts["sit"], z, batch, args))              # step 4
    update_ema(nets.sit_ema, nets.sit, args.ema_decay)                        # step 5
    update_ema(nets.vae_ema, nets.vae, args.ema_decay)
    return terms


def make_batch(nets, images, feats):
    """Tiles -> the step's inputs: x in [-1, 1] for the VAE, the CLS condition and the REPA target,
    and one t and eps shared by both passes."""
    device = nets.device
    images = images.to(device, non_blocking=True)
    if feats.numel():                                      # precomputed (B, 1 + T, D)
        feats = feats.to(device, non_blocking=True).float()
        cond, target = feats[:, 0], feats[:, 1:]
    else:
        with nets.autocast:
            cond, target = encoder_features(nets.encoder, images, token_grid=nets.sit.token_grid)  # (B, D), (B, T, D)
    x = images.float() / 127.5 - 1.0                       # (B, 3, H, W) in [-1, 1]: the VAE's range
    t = sample_t(x.shape[0], device=device)                # (B,)
    eps = torch.randn(len(x), nets.vae.z_channels, *(n // nets.vae.factor for n in x.shape[2:]),
                      device=device)  # (B, 4, h, w)
    return SimpleNamespace(x=x, cond=cond, target=target, t=t, eps=eps)


def vae_loss(nets, batch, args):
    """Steps 1-2's forward: the VAE loss through the frozen, eval-mode SiT (REPA-E §3) -> (loss, z, recon,
    terms). The SiT's and the discriminator's weights take no gradient from it."""
    sit, x = nets.sit, batch.x
    sit.eval()  # running BN statistics; no conditioning dropout
    with frozen(sit), frozen(nets.disc) if nets.disc is not None else nullcontext(), nets.autocast:
        posterior, z, recon = nets.forward.vae(x)                                # z (B, 4, h, w), recon (B, 3, H, W)
        terms = dict(l1=(recon.float() - x).abs().mean())
        # NOTE: LPIPS and the discriminator run under the same bf16 autocast; REPA-E runs them in fp32.
        if nets.lpips is not None:
            terms["lpips"] = nets.lpips(recon.float(), x).mean()
        terms["kl"] = posterior.kl().float().mean()                            # summed over C, H, W; batch mean
        if nets.disc is not None:
            terms["gan"] = hinge_g_loss(nets.disc(recon).float())
        x_t = interpolate(sit.normalize(z.float()), batch.eps, batch.t)        # (B, 4, h, w): (1 - t) x + t eps
        _, proj = nets.forward.sit_align(x_t, batch.t, batch.cond, align_only=True)  # (B, T, D), blocks 1..8
        terms["proj_vae"] = repa_loss(proj, batch.target)
        weights = dict(l1=args.l1_weight, kl=args.kl_weight, lpips=args.lpips_weight, gan=args.gan_weight,
                       proj_vae=args.proj_vae_weight)  # each term's weight is the flag --TERM-weight
        terms["vae_loss"] = sum(weights[k] * v for k, v in terms.items())
    sit.train()
    return terms["vae_loss"], z, recon, terms


def vae_update(nets, opt, batch, args):
    """Steps 1-2: the VAE loss, its backward and the VAE's optimizer step -> (z, recon) detached, terms."""
    loss, z, recon, terms = vae_loss(nets, batch, args)
    loss.backward()
    terms["grad_vae"] = optimizer_step(nets.vae, opt, args.max_grad_norm)
    return z.detach(), recon.detach(), terms


def disc_loss(nets, x, recon):
    """Step 3's forward: hinge loss on real tiles vs detached reconstructions (taming / REPA-E)."""
    with nets.autocast:
        logits_real = nets.forward.disc(x).float()         # (B, 1, h', w')
        logits_fake = nets.forward.disc(recon).float()
        loss = hinge_d_loss(logits_real, logits_fake)
    return loss, dict(disc=loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())


def disc_update(nets, opt, x, recon, args):
    loss, terms = disc_loss(nets, x, recon)
    loss.backward()
    return {**terms, "grad_disc": optimizer_step(nets.disc, opt, args.max_grad_norm)}


def sit_loss(nets, z, batch, args):
    """Step 4's forward on z.detach() with batch BN statistics: diffusion + 0.5 x REPA (REPA-E §3)."""
    with nets.autocast:
        x0 = nets.sit.normalize(z.detach().float())          # (B, 4, h, w), batch statistics (train mode)
        x_t = interpolate(x0, batch.eps, batch.t)            # the same t and eps as the VAE-align pass
        v, proj = nets.forward.sit(x_t, batch.t, batch.cond)  # (B, 4, h, w), (B, T, D)
        diff = diffusion_loss(v, velocity_target(x0, batch.eps))
        proj_sit = repa_loss(proj, batch.target)
        loss = diff + args.proj_sit_weight * proj_sit
    return loss, dict(diffusion=diff, proj_sit=proj_sit, sit_loss=loss)


def sit_update(nets, opt, z, batch, args):
    loss, terms = sit_loss(nets, z, batch, args)
    loss.backward()
    return {**terms, "grad_sit": optimizer_step(nets.sit, opt, args.max_grad_norm)}


def optimizer_step(module, opt, max_norm):
    """Clip the gradient norm (REPA-E: 1.0), step, and free the gradients right away, so their memory is
    free for the next pass -> the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


@contextmanager
def frozen(module):
    """No gradient reaches `module`'s parameters from what runs inside the block; their flags are restored
    after (the autograd graph records them at forward time, so a later backward respects them)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model for every trained parameter and float buffer (the BN
    running statistics, as REPA-E); frozen parameters and integer buffers are copied."""
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    ema_sd, averaged, current = ema.state_dict(), [], []
    for name, value in model.state_dict().items():
        if value.is_floating_point() and name not in frozen_names:
            averaged.append(ema_sd[name])
            current.append(value)
        else:
            ema_sd[name].copy_(value)
    torch._foreach_lerp_(averaged, current, 1.0 - decay)


# -------- Setup helpers ---------------------------------------------------------------------------

def build_models(args, device, world, feature_dim_=None):
    """SiT, VAE, their EMAs, the discriminator, LPIPS and the encoder; the same init on every rank.
    Each network has one handle, the module (`nets.sit` ...); `nets.forward` holds how the training passes
    call them (`wrap_models`: through DDP and/or torch.compile), the modules themselves until then."""
    torch.manual_seed(args.seed)
    encoder, pretrained = None, not args.random_weights
    if feature_dim_ is None:
        encoder = load_encoder(args.encoder, pretrained=pretrained, seed=args.seed).to(device)
        feature_dim_ = encoder.embed_dim
    vae = build_vae(args.vae).to(device)
    if args.image_size % (vae.factor * 2):
        raise InputError(f"--image-size {args.image_size} must be a multiple of {vae.factor * 2} "
                         f"(VAE factor {vae.factor} x SiT patch 2)")
    sit_kwargs = dict(input_size=args.image_size // vae.factor, cond_dim=feature_dim_, z_dim=feature_dim_,
                      cond_dropout=args.cond_dropout)
    if args.encoder_depth is not None:
        sit_kwargs["encoder_depth"] = args.encoder_depth
    sit = build_sit(args.model, **sit_kwargs).to(device)
    sit_ema = copy.deepcopy(sit).requires_grad_(False).eval()
    vae_ema = copy.deepcopy(vae).requires_grad_(False).eval()
    if world > 1:
        sit.bn = synced_batchnorm(sit.bn)  # the EMA keeps a plain BatchNorm2d (same state-dict names)
    disc = None if args.no_gan else NLayerDiscriminator().to(device)
    try:
        lpips = None if args.no_lpips else LPIPS(pretrained, args.lpips_heads, args.lpips_vgg_range_quirk).to(device)
    except Unavailable as err:
        err.then = "or train without it: --no-lpips (no LPIPS term) or --random-weights (a pipeline check)"
        raise
    # NOTE: bf16 autocast where REPA-E uses fp16 (no loss scaler needed, same speed on A100/H100).
    bf16 = resolve_precision(args.precision, device) == "bf16" and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    return SimpleNamespace(sit=sit, sit_ema=sit_ema, vae=vae, vae_ema=vae_ema, disc=disc, lpips=lpips,
                           encoder=encoder, device=device, autocast=autocast,
                           forward=SimpleNamespace(sit=sit, sit_align=sit, vae=vae, disc=disc))


def wrap_models(nets, args, distributed):
    """DDP averages the gradients of the three trained networks over ranks; the frozen passes (VAE-align
    through the SiT, GAN loss through the discriminator) use the bare modules. Then train mode."""
    forward = nets.forward
    if distributed:
        ids = [nets.device.index] if nets.device.type == "cuda" else None
        forward.sit = DDP(nets.sit, device_ids=ids, broadcast_buffers=False)  # BN stats synced, not broadcast
        forward.vae = DDP(nets.vae, device_ids=ids, broadcast_buffers=False)
        if nets.disc is not None:
            forward.disc = DDP(nets.disc, device_ids=ids)
    if args.compile:
        forward.sit, forward.vae = torch.compile(forward.sit), torch.compile(forward.vae)
        forward.sit_align = torch.compile(nets.sit)  # the frozen, eval-mode pass: its own graph
    for module in (nets.sit, nets.vae, nets.disc):
        if module is not None:
            module.train()
    return nets


def build_optimizers(args, nets):
    """AdamW for the SiT, the VAE and the discriminator (REPA-E: lr 1e-4, betas (0.9, 0.999), no decay)."""
    def adamw(params, lr):
        # fused: one kernel for all parameters on GPU (same update; the SiT has 683 M parameters)
        return torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                 weight_decay=args.weight_decay, fused=torch.cuda.is_available())

    opts = {"sit": adamw([p for p in nets.sit.parameters() if p.requires_grad], args.lr),  # not the frozen pos_embed
            "vae": adamw(nets.vae.parameters(), args.vae_lr)}
    if nets.disc is not None:
        opts["disc"] = adamw(nets.disc.parameters(), args.disc_lr)
    return opts


def local_batch_size(global_batch, world):
    """The tiles each rank takes per step; the global batch must divide evenly."""
    if global_batch % world:
        raise InputError(f"--global-batch-size {global_batch} is not divisible by the {world} processes: "
                         f"choose a multiple of {world}")
    return global_batch // world


# -------- main ------------------------------------------------------------------------------------

def train(args):
    """Train CytoSyn; returns the models (tests and demo.py read them)."""
    with processes(args.device, args.num_workers) as (rank, world, device):
        # Setup processes and precision.
        local_batch = local_batch_size(args.global_batch_size, world)
        if device.type == "cuda":  # TF32 matmuls and convolutions: REPA-E's default
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32

        # Setup the results folder, then the data: a wrong --tiles fails before any model is built. A results
        # folder among the tiles (its grids would be read back as tiles) or in use by another run is refused.
        claim_output_folder(args.out, {"--tiles": [args.tiles], "--tokens": [args.tokens], "--slides": [args.slides]})
        tiles = find_tiles(args.tiles, args.slides)

        # Setup models and optimizers (the same initialisation on every rank), from a checkpoint (--resume),
        # other weights (--init-from) or the initialisation.
        def build():
            nets = build_models(args, device, world, feature_dim(args.tokens) if args.tokens else None)
            return nets, build_optimizers(args, nets), {**vars(args), **nets.sit.config, "world_size": world}
        nets, opts, config, start_step, lines = start_or_resume(args, rank, world, device, build)
        log = Logger(args.out, rank, start_step, world, args.log_every, args.global_batch_size, device, args.tracker,
                     config)
        for line in [f"{world} process(es) on {device.type}, {local_batch} tiles per process", *lines]:
            log.info(line)
        log.info(f"SiT {args.model}: {sum(p.numel() for p in nets.sit.parameters()) / 1e6:.2f} M parameters; "
                 f"VAE {args.vae}: {sum(p.numel() for p in nets.vae.parameters()) / 1e6:.2f} M")
        wrap_models(nets, args, distributed=world > 1)

        # Setup data loading, and the fixed tiles whose CLS features condition every sample grid.
        dataset, data = training_batches(
            tiles, size=args.image_size, resize=args.resize, features=args.tokens,
            tokens=nets.sit.token_grid ** 2, rank=rank, world=world, local_batch=local_batch, seed=args.seed,
            num_workers=args.num_workers, shuffle_buffer=args.shuffle_buffer, start_step=start_step,
            pin_memory=device.type == "cuda")
        log.info(f"data: {tiles.describe()} from {args.tiles}")
        if rank == 0 and args.sample_every:
            fixed, fixed_feats = first_tiles(dataset, args.grid_tiles)
            with nets.autocast:
                fixed_cond = (fixed_feats[:, 0].to(device) if fixed_feats.numel() else
                              encoder_features(nets.encoder, fixed.to(device), nets.sit.token_grid)[0])
            grid_pipe = Pipeline(nets.sit_ema, nets.vae_ema, device, resolve_precision(args.precision, device))
            grid_settings = SamplingSettings.from_args(args)

        # Train. On a terminal, rank 0 shows a progress bar with its rate and ETA (silent in a log file).
        step = start_step
        bar = tqdm(total=args.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                   disable=rank != 0 or not sys.stderr.isatty())
        try:
            while step < args.max_steps:
                images, feats = next(data)
                terms = train_step(nets, opts, images, feats, args)
                step += 1
                last = step == args.max_steps
                log.step(step, terms, last)  # averaged over ranks, checked finite, written every --log-every steps
                saving = step % args.ckpt_every == 0 or last
                sampling = args.sample_every > 0 and (step % args.sample_every == 0 or last)
                if saving:
                    path = save_all_ranks(args.out, step, nets, opts, config, rank, world, device)
                    log.info(f"saved {path}")
                if sampling and rank == 0:
                    samples = grid_pipe.generate(fixed_cond, list(range(len(fixed_cond))), grid_settings)
                    grid = os.path.join(args.out, "samples", f"{step:07d}.png")
                    save_training_grid(fixed, samples, grid)
                    log.image("samples", grid, step)
                if world > 1 and (saving or sampling):
                    dist.barrier()  # the other ranks wait for rank 0's files
                bar.update()
        except (DiskFull, KeyboardInterrupt) as err:
            with suppress(Exception):  # what the tracker holds is written; the fault is what is told
                log.close()
            raise where_it_stopped(err, args.out, step) from None
        finally:
            bar.close()
        log.info(f"done: {step} steps")
        log.close()
        return nets


def where_it_stopped(err, out, step):
    """A full disk or an interruption (Ctrl-C, SIGTERM) during training -> the same error, saying after which
    step the run stopped, which checkpoint is the last, and to continue with --resume. No checkpoint is saved
    on the way out: see docs/training.md (Interruptions)."""
    latest = latest_checkpoint(out)
    last = (f"the last checkpoint is step {int(os.path.basename(latest).split('.')[0])}" if latest
            else "no checkpoint was written yet")
    if isinstance(err, DiskFull):
        err.then = f"continue with --resume ({last})"
        return err
    err = err if isinstance(err, Interrupted) else Interrupted()
    err.where, err.then = f"after step {step}", f"{last}; continue with --resume"
    return err


def main(argv=None):
    args = parse_args(argv)
    with errors_to_log(args.out):  # the error that stops a run is also the last line of its log.txt
        train(args)
    return 0


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.init_from and args.resume:
        raise InputError("--init-from starts a new run, --resume continues one: pass one of them")
    check_guidance(args)
    if args.tracker:
        require(args.tracker)  # a missing package is said now, before the run starts
    return args


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--tiles", required=True, help="the training tiles: tiling.py's output folder or its "
                   "manifest.csv (the train rows), a folder of PNG/JPEG tiles (recursive), or .tar shards")
    p.add_argument("--slides", default=None, metavar="SLIDES_DIR",
                   help="read each tile of the --tiles manifest from its slide (the folder tiling.py read): "
                        "no PNG copy")
    p.add_argument("--tokens", default=None, metavar="TOKENS_DIR",
                   help="folder of precomputed <tile stem>.npy H0-mini tokens (features.py's output)")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=TILE_SIZE)
    p.add_argument("--resize", choices=["crop", "scale"], default=None,
                   help="what to do with tiles of another size (default: stop with an error)")
    add_workers_arg(p)
    p.add_argument("--shuffle-buffer", type=number_in(int, 1, 10 ** 8), default=1000,
                   help="tiles held for shuffling a tar stream")
    # models
    p.add_argument("--model", choices=list(SiT_models), default="SiT-XL/2")
    p.add_argument("--vae", choices=list(vae_models), default="f8d4")
    p.add_argument("--encoder", choices=ENCODERS, default="h0-mini")
    p.add_argument("--encoder-depth", type=number_in(int, 1, 64), default=None,
                   help="REPA block (default: the preset's, 8)")
    p.add_argument("--cond-dropout", type=number_in(float, 0, 1, open_high=True), default=0.1,
                   help="probability that a tile's condition is dropped to the null embedding (for guidance)")
    # optimisation (REPA-E's defaults; CytoSyn's global batch)
    p.add_argument("--global-batch-size", type=number_in(int, 1, 10 ** 7), default=640)
    p.add_argument("--max-steps", type=MAX_STEPS, default=400_000)
    p.add_argument("--lr", type=number_in(float, 0, 1, open_low=True), default=1e-4, help="SiT learning rate")
    p.add_argument("--vae-lr", type=number_in(float, 0, 1, open_low=True), default=1e-4)
    p.add_argument("--disc-lr", type=number_in(float, 0, 1, open_low=True), default=1e-4)
    p.add_argument("--adam-beta1", type=number_in(float, 0, 1, open_high=True), default=0.9)
    p.add_argument("--adam-beta2", type=number_in(float, 0, 1, open_high=True), default=0.999)
    p.add_argument("--weight-decay", type=number_in(float, 0, 10), default=0.0)
    p.add_argument("--max-grad-norm", type=number_in(float, 0, 10 ** 6, open_low=True), default=1.0)
    p.add_argument("--ema-decay", type=number_in(float, 0, 1), default=0.9999)
    # loss weights (CytoSyn §3.3, REPA-E §3)
    p.add_argument("--proj-sit-weight", type=LOSS_WEIGHT, default=0.5, help="REPA weight in the SiT loss")
    p.add_argument("--proj-vae-weight", type=LOSS_WEIGHT, default=1.5, help="REPA weight in the VAE loss")
    p.add_argument("--l1-weight", type=LOSS_WEIGHT, default=1.0)
    p.add_argument("--lpips-weight", type=LOSS_WEIGHT, default=1.0)
    p.add_argument("--kl-weight", type=LOSS_WEIGHT, default=1e-6)
    p.add_argument("--gan-weight", type=LOSS_WEIGHT, default=0.1)
    p.add_argument("--no-gan", action="store_true", help="ablation / smoke run: no discriminator")
    add_lpips_args(p)
    p.add_argument("--random-weights", action="store_true", help="seeded random weights instead of the hub's for "
                   "the frozen networks (the encoder, LPIPS's VGG16): smoke runs, offline")
    # run
    p.add_argument("--out", default="results/cytosyn", help="the run's folder: checkpoints, logs, samples")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in --out, or from the given file")
    p.add_argument("--init-from", nargs="+", metavar="PATH", help="start a new run from these weights: an export (also "
                   "hf-hub:ORG/REPO), a train.py or REPA-E checkpoint, a diffusers VAE, a discriminator (REPA-E's "
                   "-discriminator-ckpt.pt)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--tracker", choices=TRACKERS, default=None, help="also send metrics.csv's numbers, the sample "
                   "grids and the settings to TensorBoard (OUT/tensorboard) or Weights & Biases (docs/training.md)")
    p.add_argument("--log-every", type=number_in(int, 1, 10 ** 10), default=100)
    p.add_argument("--ckpt-every", type=number_in(int, 1, 10 ** 10), default=50_000)
    p.add_argument("--sample-every", type=number_in(int, 0, 10 ** 10), default=10_000, help="0: no sample grids")
    p.add_argument("--grid-tiles", type=number_in(int, 1, 64), default=8, help="tiles in each sample grid")
    add_sampling_args(p, sampler="ode", steps=50)  # the sample grids' sampler
    add_device_args(p)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the SiT and the VAE (GPU)")
    return p


if __name__ == "__main__":
    run(main)
