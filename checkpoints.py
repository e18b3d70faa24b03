"""Weights in and out: CytoSyn checkpoints (what train.py writes, how it is written safely, how a run
resumes from it), and the readers that rebuild the SiT and the VAE from a CytoSyn or a REPA-E checkpoint
for sampling (CytoSyn §3.1; REPA-E's checkpoint layout {"model", "ema", "vae", "args"}).

One file per saved step, `<results_dir>/checkpoints/NNNNNNN.pt`, a dict:

    config                 every train.py argument and the SiT's architecture (sample.py needs nothing else)
    step                   optimizer steps done
    sit, sit_ema           the SiT and its EMA (BatchNorm running statistics included)
    vae, vae_ema           the VAE and its EMA (CytoSyn's addition to REPA-E)
    disc                   the PatchGAN discriminator (None with --no-gan)
    opt_sit, opt_vae, opt_disc   the three AdamW states
    rng                    every rank's torch / numpy / python / CUDA RNG state, for a bitwise resume
"""
import os
import random
import re
from types import SimpleNamespace

import numpy as np
import torch

from sit import SiT_models, build_sit
from vae import build_vae, vae_models

CHECKPOINT = re.compile(r"^(\d{7,})\.pt$")
RESUME_KEYS = ("config", "step", "sit", "sit_ema", "vae", "vae_ema", "opt_sit", "opt_vae", "rng")
SIT_CONFIG_KEYS = ("input_size", "in_channels", "cond_dim", "encoder_depth", "z_dim", "projector_dim",
                   "depth", "hidden_size", "patch_size", "num_heads")


def rng_state(device):
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_path(results_dir, step):
    return os.path.join(results_dir, "checkpoints", f"{step:07d}.pt")


def latest_checkpoint(results_dir):
    folder = os.path.join(results_dir, "checkpoints")
    steps = [int(mt.group(1)) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (mt := CHECKPOINT.match(f))]
    return checkpoint_path(results_dir, max(steps)) if steps else None


def save_checkpoint(path, m, opts, step, config, rngs):
    """torch.save to a temporary file, synced, then an atomic rename: a kill never leaves a broken checkpoint."""
    ckpt = {"config": config, "step": step,
            "sit": m.sit.state_dict(), "sit_ema": m.sit_ema.state_dict(),
            "vae": m.vae.state_dict(), "vae_ema": m.vae_ema.state_dict(),
            "disc": m.disc.state_dict() if m.disc is not None else None,
            "opt_sit": opts["sit"].state_dict(), "opt_vae": opts["vae"].state_dict(),
            "opt_disc": opts["disc"].state_dict() if "disc" in opts else None, "rng": rngs}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a node crash cannot leave an empty latest checkpoint
    os.replace(tmp, path)


def save_all_ranks(path, nets, opts, step, config, rank, world, device):
    """Every rank's RNG state (for an exact resume) into rank 0's checkpoint; call on every rank."""
    rngs = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rng_state(device))
    else:
        rngs = [rng_state(device)]
    if rank == 0:
        save_checkpoint(path, nets, opts, step, config, rngs)


def load_file(path):
    """Any torch.save'd file on the CPU, memory-mapped when it can be (tensors are then read as they are
    copied into the models, not all at once per rank). Raises whatever torch.load raises.
    NOTE: weights_only=False (configs hold argparse values, RNG states): load only files you trust."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # old (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=False)


def resume_path(results_dir, resume, latest):
    """Which checkpoint a run continues from: None for a new run. `resume` is --resume ("latest", a
    file, or None); `latest` the newest checkpoint in results_dir (rank 0 looks, every rank reads it)."""
    if resume:
        path = latest if resume == "latest" else resume
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {path}: no such checkpoint (a multi-node run needs --results-dir on "
                                    f"a filesystem every node shares)")
        return path
    if latest:
        raise FileExistsError(f"{results_dir} already holds checkpoints: pass --resume to continue that run, "
                              f"or choose another --results-dir")
    return None


def read_for_resume(path):
    """A train.py checkpoint, or a ValueError saying what the file is not."""
    try:
        ckpt = load_file(path)
    except Exception as err:  # not a checkpoint, truncated, pickled elsewhere
        raise ValueError(f"{path} is not a readable train.py checkpoint ({type(err).__name__}: {err})") from err
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (no {', '.join(missing)}); --resume continues a "
                         f"train.py run, sample.py reads other layouts")
    return ckpt


def check_resumable(ckpt, config, path):
    for key in ("model", "vae", "encoder", "image_size", "encoder_depth", "cond_dim", "z_dim"):
        if ckpt["config"].get(key) != config.get(key):
            raise ValueError(f"{path} was trained with {key}={ckpt['config'].get(key)!r}, this run has "
                             f"{key}={config.get(key)!r}; resume with the same settings or another --results-dir")
    if (ckpt["disc"] is None) != (config["no_gan"]):
        raise ValueError(f"{path}: --no-gan differs from the run that wrote it")


def load_checkpoint(ckpt, m, opts):
    m.sit.load_state_dict(ckpt["sit"])
    m.sit_ema.load_state_dict(ckpt["sit_ema"])
    m.vae.load_state_dict(ckpt["vae"])
    m.vae_ema.load_state_dict(ckpt["vae_ema"])
    opts["sit"].load_state_dict(ckpt["opt_sit"])
    opts["vae"].load_state_dict(ckpt["opt_vae"])
    if m.disc is not None:
        m.disc.load_state_dict(ckpt["disc"])
        opts["disc"].load_state_dict(ckpt["opt_disc"])


# -- weights for sampling: a CytoSyn or a REPA-E checkpoint -> the SiT and the VAE ---------------------
def load_state_dict_checked(module, state_dict, what):
    """load_state_dict(strict=True), but a checkpoint from another model size or layout gets a
    ValueError that names the first mismatching tensors instead of a page of torch output."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
             for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not match this model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} wrong shapes "
                         f"{wrong[:3]}. Is it a checkpoint of another preset?")
    module.load_state_dict(state_dict, strict=True)


def read_checkpoint(path):
    """-> (layout, dict): 'cytosyn' (train.py) or 'repa-e' ({"model", "ema", "vae", "args"})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found: pass a .pt file written by train.py "
                                f"(results/<run>/checkpoints/NNNNNNN.pt) or a REPA-E checkpoint")
    try:
        ckpt = load_file(path)
    except Exception as err:
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(ckpt, dict) and all(k in ckpt for k in ("config", "sit", "sit_ema", "vae")):
        return "cytosyn", ckpt
    if isinstance(ckpt, dict) and all(k in ckpt for k in ("model", "vae")):
        return "repa-e", ckpt
    keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"{path} is not a CytoSyn checkpoint (keys config/sit/sit_ema/vae) nor a REPA-E one "
                     f"(model/ema/vae); found {keys}")


def models_from_cytosyn(ckpt, path, sit_ema, vae_ema):
    cfg = ckpt["config"]
    if cfg.get("model") not in SiT_models or cfg.get("vae") not in vae_models:
        raise ValueError(f"{path}: config names model {cfg.get('model')!r} and VAE {cfg.get('vae')!r}; this code "
                         f"knows {list(SiT_models)} and {list(vae_models)}")
    vae = build_vae(cfg["vae"])
    sit_kwargs = {k: cfg[k] for k in SIT_CONFIG_KEYS if k in cfg}
    sit_kwargs.setdefault("input_size", cfg.get("image_size", 224) // vae.factor)
    sit = build_sit(cfg["model"], **sit_kwargs)
    load_state_dict_checked(sit, ckpt["sit_ema" if sit_ema else "sit"], f"{path}: SiT weights ({cfg['model']})")
    vae_sd = ckpt["vae_ema"] if vae_ema and ckpt.get("vae_ema") is not None else ckpt["vae"]
    load_state_dict_checked(vae, vae_sd, f"{path}: VAE weights ({cfg['vae']})")
    return sit, vae, dict(encoder=cfg.get("encoder", "h0-mini"), seed=cfg.get("seed", 0))


def sit_preset_from_state_dict(sd, path):
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hidden, patch = sd["pos_embed"].shape[-1], sd["x_embedder.proj.weight"].shape[-1]
    for name, arch in SiT_models.items():
        if (arch["depth"], arch["hidden_size"], arch["patch_size"]) == (depth, hidden, patch):
            return name
    raise ValueError(f"{path}: a SiT of depth {depth}, width {hidden}, patch {patch} matches no preset in "
                     f"{list(SiT_models)}")


def vae_preset_from_state_dict(sd, path):
    for name in vae_models:
        with torch.device("meta"):
            own = build_vae(name).state_dict()
        if own.keys() == sd.keys() and all(own[k].shape == sd[k].shape for k in own):
            return name
    raise ValueError(f"{path}: its VAE matches none of the presets {list(vae_models)}")


def models_from_repae(ckpt, path, sit_ema, vae_ema):
    """REPA-E's layout; the SiT's shape is read off its state dict, since REPA-E's args name ImageNet
    settings. It must hold CytoSyn's H0-mini conditioning embedder, not a class table. REPA-E keeps no
    EMA of the VAE, so `vae_ema` has nothing to choose."""
    if sit_ema and ckpt.get("ema") is None:
        raise ValueError(f"{path} has no EMA weights ('ema'); pass --sit-weights raw to use the raw ones ('model')")
    sd = ckpt["ema"] if sit_ema else ckpt["model"]
    if "y_embedder.mlp.0.weight" not in sd:
        raise ValueError(f"{path} is a class-conditional REPA-E checkpoint (no H0-mini conditioning embedder "
                         f"y_embedder.mlp.*); CytoSyn needs one trained on H0-mini CLS features")
    args = ckpt.get("args") or {}
    args = args if isinstance(args, dict) else vars(args)
    patch = sd["x_embedder.proj.weight"].shape[-1]
    sit_kwargs = dict(input_size=int(round(sd["pos_embed"].shape[1] ** 0.5)) * patch,
                      cond_dim=sd["y_embedder.mlp.0.weight"].shape[1],
                      z_dim=sd["projectors.0.4.weight"].shape[0],
                      projector_dim=sd["projectors.0.0.weight"].shape[0])
    if "encoder_depth" in args:
        sit_kwargs["encoder_depth"] = args["encoder_depth"]
    name = sit_preset_from_state_dict(sd, path)
    sit = build_sit(name, **sit_kwargs)
    load_state_dict_checked(sit, sd, f"{path}: SiT weights ({name})")
    vae = build_vae(vae_preset_from_state_dict(ckpt["vae"], path))
    load_state_dict_checked(vae, ckpt["vae"], f"{path}: VAE weights")
    return sit, vae, dict(encoder="h0-mini", seed=args.get("seed", 0))


def load_models(path, device="cpu", sit_ema=True, vae_ema=True):
    """Checkpoint -> SiT and VAE in eval mode on `device`, with the name and seed of the conditioning
    encoder. sit_ema / vae_ema pick each network's EMA or raw weights (CytoSyn §3.1, Table 2 reports
    the EMA SiT with the raw VAE and with the EMA VAE); the SiT's BatchNorm statistics come with it."""
    layout, ckpt = read_checkpoint(path)
    build = models_from_cytosyn if layout == "cytosyn" else models_from_repae
    sit, vae, info = build(ckpt, path, sit_ema, vae_ema)
    for module in (sit, vae):
        module.requires_grad_(False).eval().to(device)
    return SimpleNamespace(sit=sit, vae=vae, step=ckpt.get("step", ckpt.get("steps")), layout=layout, **info)
