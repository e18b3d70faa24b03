"""CytoSyn's training checkpoints: what train.py writes, how it is written safely, and how a run resumes
from it (or starts from other weights: --init-from).

One file per saved step, `<run folder (train.py --out)>/checkpoints/NNNNNNN.pt`, a dict:

    config                 every train.py argument and the SiT's architecture (sample.py needs nothing else)
    step                   optimizer steps done
    sit, sit_ema           the SiT and its EMA (BatchNorm running statistics included)
    vae, vae_ema           the VAE and its EMA (CytoSyn's addition to REPA-E)
    disc                   the PatchGAN discriminator (None with --no-gan)
    opt_sit, opt_vae, opt_disc   the three AdamW states
    rng                    every rank's torch / numpy / python / CUDA RNG state, for a bitwise resume

Beside each, NNNNNNN.pt.sha256 holds its sha256, checked whenever it is read (resume, sampling, export,
--init-from): a corrupt file is refused, naming it. Files are read weights-only (support/weights.py): a
crafted pickle cannot run code here.
"""
import os
import random
import zipfile

import numpy as np
import torch

from support.cli import InputError, MissingInput, OutputConflict, disk_full
from support.weights import CHECKPOINT, CHECKSUM_SUFFIX, check_finite_weights, init_from, load_file, write_checksum

RESUME_KEYS = ("config", "step", "sit", "sit_ema", "vae", "vae_ema", "opt_sit", "opt_vae", "rng")


def rng_state(device):
    """Tensors and plain values only (weights-only loadable): numpy's key array becomes an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, cached],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def checkpoints_in(run_dir):
    """The run's checkpoint files, oldest step first."""
    folder = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(mt.group(1)) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if (mt := CHECKPOINT.match(f)))
    return [checkpoint_path(run_dir, s) for s in steps]


def latest_checkpoint(run_dir):
    return (checkpoints_in(run_dir) or [None])[-1]


def save_checkpoint(path, nets, opts, step, config, rngs):
    """torch.save to a temporary file, synced, then an atomic rename: a kill never leaves a broken checkpoint.
    Its sha256 goes to PATH.sha256 before the rename, so every checkpoint has its sum, which readers check.
    On any error (a full disk, an interruption) the temporary files are removed: a full disk is a DiskFull
    that says how many bytes the checkpoint needed."""
    ckpt = {"config": config, "step": step,
            "sit": nets.sit.state_dict(), "sit_ema": nets.sit_ema.state_dict(),
            "vae": nets.vae.state_dict(), "vae_ema": nets.vae_ema.state_dict(),
            "disc": nets.disc.state_dict() if nets.disc is not None else None,
            "opt_sit": opts["sit"].state_dict(), "opt_vae": opts["vae"].state_dict(),
            "opt_disc": opts["disc"].state_dict() if "disc" in opts else None, "rng": rngs}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp, sums = path + ".tmp", path + CHECKSUM_SUFFIX
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a node crash cannot leave an empty latest checkpoint
        write_checksum(tmp, path)
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_full(err, path, tmp, tensor_bytes(ckpt))
        for leftover in (tmp, sums + ".tmp", *([sums] if not os.path.exists(path) else [])):
            if os.path.exists(leftover):
                os.remove(leftover)
        if full:
            raise full from None
        raise


def tensor_bytes(obj):
    """The bytes of every tensor in a nested structure: about the size of its torch.save file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_all_ranks(out, step, nets, opts, config, rank, world, device):
    """Every rank's RNG state (for an exact resume) into rank 0's checkpoint; call on every rank -> its path."""
    rngs = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rng_state(device))
    else:
        rngs = [rng_state(device)]
    path = checkpoint_path(out, step)
    if rank == 0:
        save_checkpoint(path, nets, opts, step, config, rngs)
    return path


def readable(path):
    """Cheap: the zip's central directory opens (a truncated file has lost it); no tensor is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def resume_path(out, resume, latest):
    """Which checkpoint a run continues from: None for a new run. `resume` is --resume ("latest", a
    file, or None); `latest` the newest checkpoint in out (rank 0 looks, every rank reads it)."""
    if resume:
        path = latest if resume == "latest" else resume
        if path and not os.path.isfile(path):
            raise MissingInput(f"--resume {path}: no such checkpoint (a multi-node run needs --out on "
                               f"a filesystem every node shares)")
        if path and resume == "latest" and not readable(path):
            good = next((p for p in reversed(checkpoints_in(out)) if readable(p)), None)
            fallback = f"the newest readable one is {good}: pass --resume {good}" if good else "no other is readable"
            raise InputError(f"the latest checkpoint {path} is unreadable (truncated or corrupt); {fallback}")
        return path
    if latest:
        raise OutputConflict(f"{out} already holds checkpoints: pass --resume to continue that run, "
                              f"or choose another --out")
    return None


def read_for_resume(path):
    """A train.py checkpoint, or a ValueError saying what the file is not."""
    ckpt = load_file(path)
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"{path} is not a train.py checkpoint (no {', '.join(missing)}); --resume continues a "
                         f"train.py run, --init-from starts one from other weights")
    return ckpt


def check_resumable(ckpt, config, path):
    for key in ("model", "vae", "encoder", "image_size", "encoder_depth", "cond_dim", "z_dim"):
        if ckpt["config"].get(key) != config.get(key):
            raise InputError(f"{path} was trained with {key}={ckpt['config'].get(key)!r}, this run has "
                             f"{key}={config.get(key)!r}; resume with the same settings or another --out")
    if (ckpt["disc"] is None) != (config["no_gan"]):
        raise InputError(f"{path}: --no-gan differs from the run that wrote it")


def load_checkpoint(ckpt, nets, opts):
    for name in ("sit", "sit_ema", "vae", "vae_ema"):
        check_finite_weights(ckpt[name], f"checkpoint {name}")
        getattr(nets, name).load_state_dict(ckpt[name])
    opts["sit"].load_state_dict(ckpt["opt_sit"])
    opts["vae"].load_state_dict(ckpt["opt_vae"])
    if nets.disc is not None:
        nets.disc.load_state_dict(ckpt["disc"])
        opts["disc"].load_state_dict(ckpt["opt_disc"])


def seed_everything(seed, rank, world, ckpt, device):
    """A different random stream per rank; a resumed run continues each rank's own stream -> a note, or None."""
    torch.manual_seed(seed * world + rank)
    np.random.seed(seed * world + rank)
    random.seed(seed * world + rank)
    if ckpt and len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    elif ckpt:
        return f"checkpoint written by {len(ckpt['rng'])} processes, now {world}: RNG streams restart"
    return None


def start_or_resume(args, rank, world, device, build):
    """A run's start, in one call: the checkpoint --resume names is read first (rank 0 picks it, every rank
    reads it), so that a bad one is refused before any model is built; then build() -> (nets, opts, config)
    and the weights: the checkpoint's, --init-from's, or the initialisation; then each rank's random stream.
    -> (nets, opts, config, the step to start from, the lines the log should say)."""
    latest = [latest_checkpoint(args.out) if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(latest, src=0)
    path = resume_path(args.out, args.resume, latest[0])
    ckpt = read_for_resume(path) if path else None
    nets, opts, config = build()
    lines = [f"resuming from {path}" if ckpt else "new run"]
    if ckpt:
        check_resumable(ckpt, config, path)
        load_checkpoint(ckpt, nets, opts)
    elif args.init_from:  # a new run (step 0, fresh optimizers) from existing weights: fine-tuning
        lines += init_from(args.init_from, nets)
    lines.append(seed_everything(args.seed, rank, world, ckpt, device))
    if nets.lpips is not None and not nets.lpips.calibrated:
        lines.append("WARNING: --lpips-uniform weighs VGG's channels 1/C, not the calibrated LPIPS the paper "
                     "trains with")
    return nets, opts, config, (ckpt["step"] if ckpt else 0), [line for line in lines if line]
