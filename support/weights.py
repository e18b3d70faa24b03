"""Weights in and out: every file read weights-only, the readers that rebuild the SiT and the VAE from a
CytoSyn or a REPA-E checkpoint or an export for sampling (CytoSyn §3.1; REPA-E's checkpoint layout
{"model", "ema", "vae", "discriminator", "args", ...}), exports, and the weights a new run starts from
(train.py --init-from), its discriminator included.

Every file is read with torch.load(weights_only=True), so a crafted pickle cannot run code here; a file
that needs more (older checkpoints of this repo, REPA-E's with an argparse.Namespace) is refused in one
line, and one you trust is converted once, explicitly. An export holds what sampling needs: safetensors
and a config.json with each file's sha256, which loading verifies; a .pt file is checked against its
CKPT.pt.sha256 (train.py writes one with each checkpoint) before it is read, so that `export` never stamps
fresh sums on corrupt weights. Non-finite weights are refused.

    python -m support.weights convert IN.pt OUT.pt     # unpickles IN fully: only files you trust
    python -m support.weights export CKPT OUT_DIR [--sit-weights ema,raw] [--vae-weights ema,raw]
    python -m support.weights export CKPT OUT_DIR --format diffusers   # the release's layout (diffusers)
    python -m support.weights push OUT_DIR ORG/REPO [--report report.json] [--dry-run DIR]   # hf-hub:ORG/REPO
"""
import argparse
import hashlib
import json
import os
import pickle
import re
import zipfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from sit import SiT_models, build_sit
from support.cli import ArgumentParser, InputError, MissingInput, NonFinite, OutputConflict, comma_list, run
from support.diffusers_format import our_names, write_diffusers
from support.hub import hub_weights, push_export
from support.model_card import model_card
from vae import build_vae, convert_diffusers_state_dict, vae_models

EXPORT_FORMAT = "cytosyn-export"
EXPORT_LAYOUTS = ("cytosyn", "diffusers")  # this project's folder; the release's, support/diffusers_format.py
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# A PatchGAN discriminator's tensors (vae_loss.NLayerDiscriminator; taming's, which REPA-E trains, has the same names).
DISC_TENSOR = re.compile(r"^main\.\d+\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
CHECKSUM_SUFFIX = ".sha256"  # CKPT.pt.sha256: train.py writes it with each checkpoint, every reader checks it
CHECKPOINT = re.compile(r"^(\d{7,})\.pt$")  # train.py's RUN/checkpoints/NNNNNNN.pt (support/checkpoints.py)
UNCHECKED = set()  # files read without a checksum, each noted once
SIT_CONFIG_KEYS = ("input_size", "in_channels", "cond_dim", "encoder_depth", "z_dim", "projector_dim",
                   "depth", "hidden_size", "patch_size", "num_heads")
# The training settings of a train.py checkpoint that its exports keep (a model card shows them): no paths.
TRAINING_KEYS = ("global_batch_size", "world_size", "max_steps", "lr", "vae_lr", "disc_lr", "adam_beta1", "adam_beta2",
                 "weight_decay", "max_grad_norm", "ema_decay", "proj_sit_weight", "proj_vae_weight", "l1_weight",
                 "lpips_weight", "kl_weight", "gan_weight", "no_gan", "no_lpips", "cond_dropout", "precision",
                 "random_weights")


class UnsafeCheckpoint(InputError):
    """A file torch.load(weights_only=True) refuses: it holds pickled Python objects, which could run code."""


def load_file(path, checked=True):
    """A torch.save'd file on the CPU, weights only (tensors and plain values: unpickling runs no code),
    memory-mapped (tensors are read as they are copied into the models, not all at once per rank); first
    checked against its PATH.sha256 when it has one (checked=False: a file this process just wrote)."""
    if path.endswith(CHECKSUM_SUFFIX):
        raise InputError(f"{path} is the sha256 sum of {path[:-len(CHECKSUM_SUFFIX)]}, not weights: give that file")
    if checked:
        verify_checksum(path)
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a readable PyTorch checkpoint (not a complete zip archive written by "
                         f"torch.save: truncated, or another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        needs = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise UnsafeCheckpoint(
            f"{path} holds Python objects besides tensors{f' ({needs.group(1)})' if needs else ''}: unpickling it "
            f"could run code, so it is not loaded. If you trust where it comes from, convert it once with "
            f"`python -m support.weights convert {path} SAFE.pt` and use SAFE.pt") from None
    except Exception as err:
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({str(err).splitlines()[0][:200]})") from err


def check_finite_weights(state_dict, what):
    """Refuse weights with a NaN or an inf, naming the first bad tensor (corrupt file or diverged run)."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise NonFinite(f"{what}: tensor {name} holds non-finite values (NaN or inf): the file is corrupt or "
                             f"the run diverged; use an earlier checkpoint")


# -- weights for sampling: a CytoSyn or a REPA-E checkpoint, or an export -> the SiT and the VAE ----------
def load_state_dict_checked(module, state_dict, what):
    """load_state_dict(strict=True), but a checkpoint from another model size or layout gets a
    ValueError that names the first mismatching tensors instead of a page of torch output; non-finite
    weights are refused."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
             for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        raise InputError(f"{what} does not match this model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} wrong shapes "
                         f"{wrong[:3]}. Is it a checkpoint of another preset?")
    check_finite_weights(state_dict, what)
    module.load_state_dict(state_dict, strict=True)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksum(file, path):
    """PATH.sha256 (sha256sum's format: `sha256sum -c` checks it too) with the sha256 of `file`'s bytes
    (`file`: PATH itself, or the temporary file about to be renamed to PATH)."""
    tmp = f"{path}{CHECKSUM_SUFFIX}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{sha256(file)}  {os.path.basename(path)}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path + CHECKSUM_SUFFIX)


def verify_checksum(path):
    """Refuse a file whose bytes differ from its PATH.sha256 (a flipped bit, a copy cut short), naming
    it; a file without one (written before checksums, or elsewhere) is read with a note, once."""
    if not os.path.isfile(path + CHECKSUM_SUFFIX):
        if os.path.isfile(path) and path not in UNCHECKED:
            UNCHECKED.add(path)
            print(f"note: {path} has no {os.path.basename(path)}{CHECKSUM_SUFFIX} beside it (written before "
                  f"checksums, or not by train.py): its bytes are not verified", flush=True)
        return
    with open(path + CHECKSUM_SUFFIX) as f:
        expected = (f.read().split() or [""])[0]
    if sha256(path) != expected:
        raise InputError(f"{path} does not match its checksum {path}{CHECKSUM_SUFFIX}: the file is corrupt (a "
                         f"flipped bit, a copy cut short) and is not used; take an earlier checkpoint, "
                         f"or copy it again")


def export_meta(folder):
    """An export folder's config.json (this project's record of it, in either layout), or None."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT else None


def read_export(folder):
    """An export folder (either layout) -> (config, step, get): get(name) reads and checks one .safetensors file,
    in our tensor names, or None."""
    meta = export_meta(folder)
    if meta is None:
        raise InputError(f"{folder} is not a CytoSyn export (no config.json with format {EXPORT_FORMAT!r}); make one "
                         f"with `python -m support.weights export CKPT {folder}`")

    def get(name):
        entry = meta["files"].get(name)
        if entry is None:
            return None
        file = os.path.normpath(os.path.join(folder, entry["file"]))  # a file of the folder, never outside it
        if os.path.relpath(file, folder).startswith(os.pardir) or not os.path.isfile(file) or \
                sha256(file) != entry["sha256"]:
            raise InputError(f"{file} is missing or does not match the sha256 in {folder}/config.json: the file is "
                             f"corrupt or was changed; export it again")
        return our_names(load_safetensors(file), entry.get("names"))
    return {**meta.get("training", {}), **meta["config"]}, meta.get("step"), get  # an export of it keeps both


def repae_config(ckpt, path):
    """REPA-E's args name ImageNet settings: the SiT's shape is read off its state dict instead."""
    sd = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    args = ckpt.get("args") or {}
    patch = sd["x_embedder.proj.weight"].shape[-1]
    vae = vae_preset_from_state_dict(ckpt["vae"], path)
    config = dict(model=sit_preset_from_state_dict(sd, path), vae=vae, encoder="h0-mini", seed=args.get("seed", 0),
                  input_size=int(round(sd["pos_embed"].shape[1] ** 0.5)) * patch,
                  z_dim=sd["projectors.0.4.weight"].shape[0], projector_dim=sd["projectors.0.0.weight"].shape[0])
    config["image_size"] = config["input_size"] * 2 ** (len(vae_models[vae]["ch_mult"]) - 1)  # the VAE's factor
    if "y_embedder.mlp.0.weight" in sd:
        config["cond_dim"] = sd["y_embedder.mlp.0.weight"].shape[1]
    if "encoder_depth" in args:
        config["encoder_depth"] = args["encoder_depth"]
    return config


def read_weights(path):
    """An export, a train.py checkpoint or a REPA-E one ({"model", "ema", "vae", "args"}) -> (layout,
    config, step, get): get("sit" | "sit_ema" | "vae" | "vae_ema") gives that state dict, or None. An export on
    the hub is hf-hub:ORG/REPO[@REVISION], read through huggingface_hub's cache."""
    path = hub_weights(path)
    if os.path.isdir(path):
        run_folder_is_not_a_checkpoint(path)
        return ("export", *read_export(path))
    if not os.path.isfile(path):
        raise MissingInput(f"checkpoint {path} not found: pass a .pt file written by train.py "
                                f"(results/<run>/checkpoints/NNNNNNN.pt), an export folder or a REPA-E checkpoint")
    ckpt = load_file(path)
    if isinstance(ckpt, dict) and all(k in ckpt for k in ("config", "sit", "sit_ema", "vae")):
        return "cytosyn", ckpt["config"], ckpt.get("step"), ckpt.get
    if isinstance(ckpt, dict) and all(k in ckpt for k in ("model", "vae")):
        names = {"sit": "model", "sit_ema": "ema", "vae": "vae", "disc": "discriminator"}
        return "repa-e", repae_config(ckpt, path), ckpt.get("steps"), lambda name: ckpt.get(names.get(name, ""))
    keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise InputError(f"{path} is not a CytoSyn checkpoint (keys config/sit/sit_ema/vae) nor a REPA-E one "
                     f"(model/ema/vae); found {keys}")


def run_folder_is_not_a_checkpoint(path):
    """A train.py run folder (or its checkpoints/) given where a checkpoint goes: one line naming its latest."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    for folder in (os.path.join(path, "checkpoints"), path):
        steps = sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else []) if CHECKPOINT.match(f))
        if steps:
            raise InputError(f"{path} is a train.py run folder, not a checkpoint or an export: give one of its "
                             f"checkpoints, e.g. its latest, {os.path.join(folder, steps[-1])}")


def pick(get, net, ema, path):
    """The EMA or raw weights of net ("sit" / "vae"); the VAE's raw ones when there is no EMA (REPA-E)."""
    sd = get(f"{net}_ema" if ema else net)
    if sd is None and net == "vae" and ema:
        sd = get("vae")
    if sd is None:
        kind, other = ("EMA", "raw") if ema else ("raw", "ema")
        raise InputError(f"{path} has no {kind} {net.upper()} weights: pass --{net}-weights {other} (or "
                         f"sit_weights/vae_weights='{other}'), or export them with --{net}-weights ema,raw")
    return sd


def build_from(config, get, path, sit_ema, vae_ema):
    """config + weights -> the SiT and the VAE (the SiT's BatchNorm statistics come with its weights)."""
    if config.get("model") not in SiT_models or config.get("vae") not in vae_models:
        raise InputError(f"{path}: config names model {config.get('model')!r} and VAE {config.get('vae')!r}; this "
                         f"code knows {list(SiT_models)} and {list(vae_models)}")
    sit_sd = pick(get, "sit", sit_ema, path)
    if "y_embedder.embedding_table.weight" in sit_sd:
        raise InputError(f"{path} is a class-conditional REPA-E checkpoint (no H0-mini conditioning embedder "
                         f"y_embedder.mlp.*); CytoSyn needs one trained on H0-mini CLS features")
    vae = build_vae(config["vae"])
    sit_kwargs = {k: config[k] for k in SIT_CONFIG_KEYS if k in config}
    if "input_size" not in sit_kwargs:  # the latent side: from the tile size the model was trained at
        if "image_size" not in config:
            raise InputError(f"{path}: its config gives neither input_size nor image_size, so the SiT's latent "
                             f"size is unknown; add the image_size it was trained at")
        sit_kwargs["input_size"] = config["image_size"] // vae.factor
    sit = build_sit(config["model"], **sit_kwargs)
    load_state_dict_checked(sit, sit_sd, f"{path}: SiT weights ({config['model']})")
    load_state_dict_checked(vae, pick(get, "vae", vae_ema, path), f"{path}: VAE weights ({config['vae']})")
    return sit, vae


def load_models(path, device="cpu", sit_ema=True, vae_ema=True):
    """Checkpoint or export -> SiT and VAE in eval mode on `device`, with the name and seed of the
    conditioning encoder. sit_ema / vae_ema pick each network's EMA or raw weights (CytoSyn §3.1, Table 2
    reports the EMA SiT with the raw VAE and with the EMA VAE)."""
    layout, config, step, get = read_weights(path)
    sit, vae = build_from(config, get, path, sit_ema, vae_ema)
    for module in (sit, vae):
        module.requires_grad_(False).eval().to(device)
    return SimpleNamespace(sit=sit, vae=vae, step=step, layout=layout, encoder=config.get("encoder", "h0-mini"),
                           seed=config.get("seed", 0))


def sit_preset_from_state_dict(sd, path):
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hidden, patch = sd["pos_embed"].shape[-1], sd["x_embedder.proj.weight"].shape[-1]
    for name, arch in SiT_models.items():
        if (arch["depth"], arch["hidden_size"], arch["patch_size"]) == (depth, hidden, patch):
            return name
    raise InputError(f"{path}: a SiT of depth {depth}, width {hidden}, patch {patch} matches no preset in "
                     f"{list(SiT_models)}")


def vae_preset_from_state_dict(sd, path):
    for name in vae_models:
        with torch.device("meta"):
            own = build_vae(name).state_dict()
        if own.keys() == sd.keys() and all(own[k].shape == sd[k].shape for k in own):
            return name
    raise InputError(f"{path}: its VAE matches none of the presets {list(vae_models)}")


# -- weights out: an export for sampling; a trusted pickle made weights-only ------------------------------
def export(path, out, sit_weights=("ema",), vae_weights=("ema",), layout="cytosyn"):
    """Checkpoint (or export) -> OUT/{sit_ema,sit,vae_ema,vae}.safetensors and OUT/config.json, which
    records the model config, the training settings, the step, the source and every file's sha256; layout
    "diffusers": the release's folder instead (support/diffusers_format.py), one SiT and one VAE. Everything is read
    and checked before the first file is written."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise OutputConflict(f"{out} already exists and is not an empty folder: choose another output folder")
    if layout == "diffusers" and (len(set(sit_weights)) > 1 or len(set(vae_weights)) > 1):
        raise InputError("--format diffusers holds one SiT and one VAE, as the release: pass --sit-weights ema or raw "
                         "and --vae-weights ema or raw")
    layout_in, config, step, get = read_weights(path)
    weights = {}
    for net, kinds in (("sit", sit_weights), ("vae", vae_weights)):
        for kind in dict.fromkeys(kinds):  # "ema,ema" is ema once
            name = f"{net}_ema" if kind == "ema" else net
            sd = get(name)
            if sd is None and name == "vae_ema":  # REPA-E keeps no EMA of the VAE: its raw one, as load_models
                name, sd = "vae", get("vae")
            if sd is None:
                raise InputError(f"{path} has no {kind} {net.upper()} weights: export --{net}-weights "
                                 f"{'raw' if kind == 'ema' else 'ema'}")
            weights[name] = {k: v.contiguous() for k, v in sd.items()}
            check_finite_weights(weights[name], f"{path}: {name}")
    sit, vae = build_from(config, weights.get, path, "sit_ema" in weights, "vae_ema" in weights)  # config fits them
    config = {**config, **{k: v for k, v in sit.config.items() if k in SIT_CONFIG_KEYS},  # the SiT's every argument
              "image_size": config.get("image_size", sit.input_size * vae.factor)}
    return write_export(out, weights, config, step, os.path.abspath(path), layout_in, layout)


def write_export(out, weights, config, step, source, source_layout, layout="cytosyn"):
    """{name: state dict} -> OUT/<name>.safetensors (layout "diffusers": the release's folder), then OUT/config.json
    with their sha256 and the training settings a model card shows (TRAINING_KEYS of a train.py checkpoint)."""
    keep = ("model", "vae", "encoder", "seed", "image_size", *SIT_CONFIG_KEYS)
    meta = {"format": EXPORT_FORMAT, "layout": layout, "source": source, "source_layout": source_layout,
            "step": step, "config": {k: config[k] for k in keep if k in config},
            "training": {k: config[k] for k in TRAINING_KEYS if k in config}}
    os.makedirs(out, exist_ok=True)
    if layout == "diffusers":
        sit_name, vae_name = (next(n for n in weights if n.startswith(net)) for net in ("sit", "vae"))
        written = write_diffusers(out, weights[sit_name], weights[vae_name],
                                  {k: meta["config"][k] for k in SIT_CONFIG_KEYS}, config["vae"], config["image_size"])
        files = {sit_name: written["sit"], vae_name: written["vae"]}
    else:
        files = {}
        for name, sd in weights.items():
            save_safetensors(sd, os.path.join(out, f"{name}.safetensors"))
            files[name] = {"file": f"{name}.safetensors"}
    meta["files"] = {name: {**entry, "sha256": sha256(os.path.join(out, entry["file"]))}
                     for name, entry in files.items()}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def plain(value):
    """A trusted file's Python objects as tensors and plain values: Namespace -> dict, numpy -> tensors."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.ndarray):  # unsigned ints (numpy's RNG keys) widen to int64, which torch stores
        return torch.from_numpy(np.ascontiguousarray(value.astype(np.int64) if value.dtype.kind == "u" else value))
    return value.item() if isinstance(value, np.generic) else value


def convert(src, dst):
    """The one full unpickle in the repo, run only when asked for by name: a trusted checkpoint ->
    a weights-only copy, checked by reading it back with weights_only=True."""
    try:
        # weights_only=False: this runs whatever the file's pickle asks for. Only for files you trust.
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InputError(f"{src} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    tmp = dst + ".tmp"
    torch.save(plain(obj), tmp)
    try:
        load_file(tmp, checked=False)
    except ValueError:
        os.remove(tmp)
        raise InputError(f"{src} holds objects that are neither tensors, numpy arrays nor plain values: not "
                         f"converted") from None
    write_checksum(tmp, dst)
    os.replace(tmp, dst)


# -- weights in for a new run: train.py --init-from ------------------------------------------------------
def diffusers_file(path):
    """A diffusers-layout VAE: the .safetensors / .bin file itself, or the one in the folder (or its vae/)."""
    if os.path.isfile(path):
        return path if path.endswith((".safetensors", ".bin")) else None
    files = [os.path.join(folder, name) for folder in (path, os.path.join(path, "vae")) for name in DIFFUSERS_FILES]
    return next((f for f in files if os.path.isfile(f)), None)


def discriminator_only(obj):
    """A discriminator's state dict alone (every name main.N.*: REPA-E's <vae>-discriminator-ckpt.pt, as its
    --disc-pretrained-ckpt loads it), or one nested under a single key ({"discriminator": ...}) -> it, else None."""
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and DISC_TENSOR.match(k) for k in obj):
        return obj
    return None


def init_sources(path):
    """-> (layout, {"sit": state dict or None, "vae": ..., "disc": ...}, notes): the EMA weights where there are
    some (a discriminator has none)."""
    path = hub_weights(path)
    if not os.path.exists(path):
        raise MissingInput(f"--init-from {path}: no such file or folder")
    file = None if export_meta(path) else diffusers_file(path)  # an export in diffusers' layout holds a vae/ too
    if file is not None:
        sd = load_safetensors(file) if file.endswith(".safetensors") else load_file(file)
        return "diffusers VAE", {"sit": None, "vae": convert_diffusers_state_dict(sd), "disc": None}, []
    disc = discriminator_only(load_file(path)) if os.path.isfile(path) else None
    if disc is not None:
        return "a discriminator's state dict", {"sit": None, "vae": None, "disc": disc}, []
    layout, config, step, get = read_weights(path)
    sit, vae = (get(f"{net}_ema") or get(net) for net in ("sit", "vae"))
    notes = ["exports hold no discriminator"] if layout == "export" else []
    if sit is not None and "y_embedder.embedding_table.weight" in sit:  # REPA-E's ImageNet class table
        sit = {k: v for k, v in sit.items() if not k.startswith("y_embedder.")}
        notes.append("its class table y_embedder.* is dropped (CytoSyn conditions on H0-mini features)")
    return f"{layout}, step {step}", {"sit": sit, "vae": vae, "disc": get("disc")}, notes


def copy_matching(module, sd, what):
    """Load every tensor of sd into module; the module's other tensors stay as initialised -> their names.
    A tensor of another shape, or one the module does not have, is refused."""
    own = module.state_dict()
    wrong = [f"{k} {tuple(sd[k].shape)} (this run: {tuple(own[k].shape)})" for k in own
             if k in sd and own[k].shape != sd[k].shape]
    unknown = [k for k in sd if k not in own]
    if wrong or unknown:
        raise InputError(f"{what} does not fit this run's model: {len(wrong)} tensors of another shape {wrong[:3]}, "
                         f"{len(unknown)} it does not have {unknown[:3]}; pass the --model, --vae, --encoder and "
                         f"--image-size it was trained with")
    check_finite_weights(sd, what)
    module.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)
    return [k for k in own if k not in sd]


def init_from(paths, nets):
    """train.py --init-from: a new run's SiT and VAE (and their EMAs) and its discriminator start from the
    weights in one path or several (an export, a train.py or REPA-E checkpoint, a diffusers VAE, a discriminator's
    state dict); a network found in two of them is refused -> the lines that say what was loaded."""
    paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
    found, lines = {}, []
    for path in paths:
        layout, sources, notes = init_sources(path)
        lines.append(f"--init-from {path} ({layout})" + "".join(f"; {n}" for n in notes))
        for net, sd in sources.items():
            if sd is not None and net in found:
                raise InputError(f"--init-from: both {found[net][0]} and {path} hold {net.upper()} weights; pass "
                                 f"each network's weights once")
            if sd is not None:
                found[net] = (path, sd)
    for net in ("sit", "vae", "disc"):
        module, (path, sd) = getattr(nets, net), found.get(net, (" or ".join(paths), None))
        if module is None:  # --no-gan
            lines += [f"DISC: the one in {path} is not loaded: this run has no discriminator (--no-gan)"] if sd else []
            continue
        if sd is None:
            lines.append(f"{net.upper()}: nothing in {path}; all left at initialisation")
            continue
        left = copy_matching(module, sd, f"--init-from {path}: {net.upper()} weights")
        if net != "disc":  # the discriminator has no EMA
            getattr(nets, f"{net}_ema").load_state_dict(module.state_dict())
        groups = ", ".join(f"{g} ({n})" for g, n in Counter(k.split(".")[0] for k in left).items())  # y_embedder (5)
        lines.append(f"{net.upper()}: {len(module.state_dict()) - len(left)} tensors loaded from {path}, {len(left)} "
                     f"left at initialisation{': ' + groups if left else ''}")
    return lines


def build_parser():
    p = ArgumentParser(prog="python -m support.weights", description=__doc__[__doc__.index("Every file"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="unpickle IN fully (only a file you trust) and write a weights-only OUT")
    c.add_argument("source", metavar="IN", help="the trusted checkpoint")
    c.add_argument("dest", metavar="OUT", help="its weights-only copy")
    e = sub.add_parser("export", help="SiT and VAE weights as safetensors + config.json with sha256 sums")
    e.add_argument("source", metavar="CKPT", help="a train.py checkpoint, an export or a converted REPA-E checkpoint")
    e.add_argument("dest", metavar="OUT", help="the export folder (new or empty)")
    e.add_argument("--sit-weights", type=comma_list(("ema", "raw")), default=["ema"],
                   help="which SiT weights: ema, raw or ema,raw")
    e.add_argument("--vae-weights", type=comma_list(("ema", "raw")), default=["ema"],
                   help="which VAE weights: ema, raw or ema,raw")
    e.add_argument("--format", choices=EXPORT_LAYOUTS, default="cytosyn", help="cytosyn: this project's folder; "
                   "diffusers: the release's (a diffusers custom pipeline: DiffusionPipeline.from_pretrained(OUT, "
                   "custom_pipeline=OUT, trust_remote_code=True)), one SiT and one VAE")
    u = sub.add_parser("push", help="publish an export on the Hugging Face hub with a generated model card")
    u.add_argument("source", metavar="EXPORT", help="an export folder (either --format)")
    u.add_argument("repo", metavar="ORG/REPO", help="the hub repository (created if new)")
    u.add_argument("--report", metavar="REPORT_JSON", help="evaluate.py's OUT/report.json: its numbers go in the card")
    u.add_argument("--dry-run", metavar="DIR", help="write the folder that would be uploaded to DIR; upload nothing")
    u.add_argument("--private", action="store_true", help="create the repository private")
    return p


def push(source, repo, report=None, dry_run=None, private=False):
    """Every file of an export checked against its sha256, then it and its model card uploaded (dry_run: written
    to that folder) -> where they went. The config.json uploaded names its source file, not its folder here."""
    _, _, get = read_export(source)
    meta = export_meta(source)
    for name in meta["files"]:
        get(name)
    public = json.dumps({**meta, "source": os.path.basename(meta["source"])}, indent=1)
    return push_export(source, repo, {"README.md": model_card(meta, repo, report), "config.json": public}, dry_run,
                       private)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        convert(args.source, args.dest)
    elif args.command == "export":
        export(args.source, args.dest, args.sit_weights, args.vae_weights, args.format)
    else:
        args.dest = push(args.source, args.repo, args.report, args.dry_run, args.private)
    print(f"wrote {args.dest}")
    return 0


if __name__ == "__main__":
    run(main)
