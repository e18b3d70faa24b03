"""The release's format: an export as a diffusers custom pipeline, the way CytoSyn is published and LazySlide loads
it (CytoSyn §3.1; the sampler of §4.1).

    OUT/model_index.json               the components, [library, class] each, and the pipeline class
    OUT/pipeline.py                    CytoSynPipeline: vae.py, sampler.py and sample.py's noise_seed, then the class
    OUT/transformer/                   the SiT: config.json, diffusion_pytorch_model.safetensors, cytosyn_transformer.py
    OUT/vae/                           a plain diffusers AutoencoderKL: config.json, diffusion_pytorch_model.safetensors
    OUT/config.json                    this project's own record (support/weights.py): config, step, sha256 sums

    pipe = DiffusionPipeline.from_pretrained(OUT, custom_pipeline=OUT, trust_remote_code=True)
    pipe(h0_mini_embeds=feats, num_inference_steps=250, guidance_scale=2.5, seed=0)["images"]

The shipped code is assembled from the project's own source text: sit.py, vae.py and sampler.py whole (less their
docstrings), sample.py's noise_seed, and the two classes of support/diffusers_template.py; so there is one copy
of the SiT and of the sampler in the repository, and the export runs where the repository is not installed.

The tensor names: the SiT's are REPA-E's under `sit.` (TRANSFORMER_NAMES, one table read one way to export and
the other to load); the VAE's are diffusers' (vae.DIFFUSERS_NAMES). CytoSyn's own release names its tensors in a
layout we have not seen: reading it is one such table away. Left out: writing in diffusers' older layouts.
"""
import ast
import json
import os
from importlib import metadata

from safetensors.torch import save_file

from support.cli import InputError
from vae import convert_diffusers_state_dict, to_diffusers_state_dict, vae_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, whose sources are shipped
TEMPLATE = "support/diffusers_template.py"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained names a component's weights
TRANSFORMER_MODULE, TRANSFORMER_CLASS = "cytosyn_transformer", "CytoSynTransformer"
PIPELINE_MODULE, PIPELINE_CLASS = "pipeline", "CytoSynPipeline"
DIFFUSERS_VERSION = "0.42.1"  # the version the export is tested with, written when diffusers is not installed
# Our SiT's tensor names -> the exported transformer's, as prefixes: the transformer holds the SiT as `sit`.
TRANSFORMER_NAMES = (("", "sit."),)


def renamed_prefixes(sd, table, reverse=False):
    """Rename every key by the first row of (ours, theirs) prefixes that it starts with (reverse: theirs -> ours);
    a key that fits no row is an error, so that a table that misses part of a layout cannot load half of it."""
    rows = [(b, a) if reverse else (a, b) for a, b in table]
    out = {}
    for key, value in sd.items():
        old, new = next(((old, new) for old, new in rows if key.startswith(old)), (None, None))
        if old is None:
            raise InputError(f"tensor {key} fits no row of the name table {rows}: not an export of this code's")
        out[new + key[len(old):]] = value
    return out


def vae_config(preset, image_size):
    """Our VAE preset as diffusers' AutoencoderKL config: the same network (LDM's), with no scaling of the latents
    (CytoSyn's SiT normalises them with its own BatchNorm, which travels with the transformer)."""
    arch = vae_models[preset]
    levels = len(arch["ch_mult"])
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels,
                block_out_channels=[arch["ch"] * m for m in arch["ch_mult"]],
                layers_per_block=arch["num_res_blocks"], act_fn="silu", latent_channels=arch["z_channels"],
                norm_num_groups=32, sample_size=image_size, scaling_factor=1.0, shift_factor=None, force_upcast=False,
                use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


# -------- the shipped code: the project's own source text --------------------------------------------------------
def source_parts(path):
    """A source file of the repository -> (its import lines, its body without the docstring, {name: a top-level
    function's or class's source})."""
    text = open(os.path.join(ROOT, path)).read()
    tree, lines = ast.parse(text), text.splitlines()
    first = tree.body[0].end_lineno if ast.get_docstring(tree) is not None else 0
    imports = [ast.get_source_segment(text, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    defs = {n.name: "\n".join(lines[min([n.lineno] + [d.lineno for d in n.decorator_list]) - 1:n.end_lineno])
            for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return "\n".join(imports), "\n".join(lines[first:]), defs


def shipped_code():
    """{relative path: source} of the exported folder's two files of code."""
    template_imports, _, template = source_parts(TEMPLATE)
    body = {path: source_parts(path)[1] for path in ("sit.py", "vae.py", "sampler.py")}
    pieces = {f"transformer/{TRANSFORMER_MODULE}.py": [("sit.py", body["sit.py"]),
                                                       (TEMPLATE, template[TRANSFORMER_CLASS])],
              f"{PIPELINE_MODULE}.py": [("vae.py", body["vae.py"]), ("sampler.py", body["sampler.py"]),
                                        ("sample.py", source_parts("sample.py")[2]["noise_seed"]),
                                        (TEMPLATE, template[PIPELINE_CLASS])]}
    code = {}
    for path, parts in pieces.items():
        head = (f'"""CytoSyn ({path}): diffusers custom code written by `python -m support.weights export --format '
                f'diffusers` of the CytoSyn reference implementation, from its files {", ".join(p for p, _ in parts)}. '
                f'Needs torch, numpy, pillow and diffusers."""')
        code[path] = "\n\n".join([head, template_imports] + [f"# ---- {p} ----\n{body}" for p, body in parts]) + "\n"
    return code


# -------- writing ------------------------------------------------------------------------------------------------
def diffusers_version():
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return DIFFUSERS_VERSION


def write_json(data, path):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_diffusers(out, sit_sd, vae_sd, sit_args, vae_preset, image_size):
    """One SiT and one VAE state dict (our names) and the SiT's constructor arguments -> the folder above, less
    its config.json -> {"sit" | "vae": {"file": its weights, relative to out, "names": how they are named}}."""
    version = diffusers_version()
    for folder in ("transformer", "vae"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    save_file(renamed_prefixes(sit_sd, TRANSFORMER_NAMES), os.path.join(out, "transformer", WEIGHTS_FILE))
    save_file(to_diffusers_state_dict(vae_sd), os.path.join(out, "vae", WEIGHTS_FILE))
    write_json({"_class_name": TRANSFORMER_CLASS, "_diffusers_version": version, **sit_args},
               os.path.join(out, "transformer", "config.json"))
    write_json({"_class_name": "AutoencoderKL", "_diffusers_version": version, **vae_config(vae_preset, image_size)},
               os.path.join(out, "vae", "config.json"))
    for path, text in shipped_code().items():
        with open(os.path.join(out, path), "w") as f:
            f.write(text)
    write_json({"_class_name": [PIPELINE_MODULE, PIPELINE_CLASS], "_diffusers_version": version,
                "transformer": [TRANSFORMER_MODULE, TRANSFORMER_CLASS], "vae": ["diffusers", "AutoencoderKL"]},
               os.path.join(out, "model_index.json"))
    return {"sit": {"file": f"transformer/{WEIGHTS_FILE}", "names": "transformer"},
            "vae": {"file": f"vae/{WEIGHTS_FILE}", "names": "diffusers-vae"}}


# -------- reading ------------------------------------------------------------------------------------------------
def our_names(sd, names):
    """A component's tensors as an export stores them ("names": "transformer", "diffusers-vae" or ours) -> our names."""
    if names == "transformer":
        return renamed_prefixes(sd, TRANSFORMER_NAMES, reverse=True)
    if names == "diffusers-vae":
        return convert_diffusers_state_dict(sd)
    return sd
