"""One source for every default: the command line, the Python API and the docs state the same value.

For every flag of every tool that has a default, the table below says where else the same setting lives: a
keyword of the Python API (called without it, it takes its default), a constant, the same flag of another tool,
or a statement in the docs. The parser's default (the command run without the flag) must equal all of them, and
what a flag's own help says it defaults to ("default X", "paper: X"). A flag with a default that the table does
not list fails the test, so that a new flag is placed too.
"""
import argparse
import inspect
import re
from pathlib import Path

import pytest

import bench
import demo
import evaluate
import features
import fld
import metrics
import sample
import tiling
import train
from support import slides, tile_features, weights
from support.tiles import TILE_MPP, TILE_SIZE

ROOT = Path(__file__).resolve().parent.parent


def keyword(function, name):
    """The default of a keyword of the Python API (a dataclass field counts)."""
    return inspect.signature(function).parameters[name].default


def doc(page, pattern, kind=float):
    """What a docs page states, the first group of a pattern (the statement must be there)."""
    found = re.search(pattern, (ROOT / page).read_text())
    assert found, f"{page} no longer states {pattern!r}"
    return kind(found.group(1))


SAMPLING = {  # the sampling flags -> SamplingSettings' field and the released pipeline's keyword
    "--sampler": ("sampler", "sampler"), "--num-sampling-steps": ("num_sampling_steps", "num_inference_steps"),
    "--cfg-scale": ("cfg_scale", "guidance_scale"), "--guidance-low": ("guidance_low", "guidance_low"),
    "--guidance-high": ("guidance_high", "guidance_high"),
}
METRIC_API = {  # the metric flags shared by metrics.py and evaluate.py -> the functions' keywords
    "--k": lambda: [keyword(metrics.precision_recall, "k")],
    "--bootstrap-draws": lambda: [keyword(metrics.bootstrap_fd, "draws"), doc("docs/evaluation.md", r"(\d+) draws")],
    "--fld-num-generated": lambda: [keyword(fld.fld, "gen_size"), 10_000],  # Jiralerspong et al.'s 10k
    "--batch-size": lambda: [keyword(tile_features.extract_features, "batch_size")],
    "--seed": lambda: [keyword(metrics.bootstrap_fd, "seed"), keyword(fld.fld, "seed")],
}
PAPER = {  # what the paper and README state for the sampler (CytoSyn §4.1)
    "--num-sampling-steps": lambda: doc("README.md", r"Samples come from (\d+) Euler-Maruyama steps", int),
    "--cfg-scale": lambda: doc("docs/sampling.md", r"guidance ([\d.]+) on t in", float),
    "--guidance-high": lambda: doc("docs/sampling.md", r"guidance [\d.]+ on t in \[0, ([\d.]+)\]", float),
}


def others(tool, flag):
    """Every other source of (tool, flag)'s default: a list of values, or None when the flag is not placed."""
    if tool in ("sample.py", "evaluate.py", "bench.py sample") and flag in SAMPLING:
        field, api = SAMPLING[flag]
        values = [keyword(sample.SamplingSettings, field), keyword(sample.Pipeline.__call__, api)]
        return values + ([PAPER[flag]()] if flag in PAPER else [])
    if tool in ("metrics.py", "evaluate.py") and flag in METRIC_API:
        return METRIC_API[flag]() + ([keyword(sample.SamplingSettings, "seed")] if flag == "--seed" else [])
    return TABLE.get((tool, flag))


TABLE = {
    # sample.py: the Python API (load_pipeline, the pipeline's call) and the docs
    ("sample.py", "--seed"): [keyword(sample.SamplingSettings, "seed"), keyword(sample.Pipeline.__call__, "seed")],
    ("sample.py", "--batch-size"): [keyword(sample.Pipeline.__call__, "batch_size")],
    ("sample.py", "--sit-weights"): [keyword(sample.load_pipeline, "sit_weights")],
    ("sample.py", "--vae-weights"): [keyword(sample.load_pipeline, "vae_weights")],
    ("sample.py", "--precision"): [keyword(sample.load_pipeline, "precision")],
    ("sample.py", "--device"): ["auto"],
    ("sample.py", "--out"): ["samples"],
    # evaluate.py
    ("evaluate.py", "--num-guidance"): [doc("docs/evaluation.md", r"--num-guidance` training tiles of the tiling "
                                                                  r"manifest \(paper:\s+(\d+) k\)", int) * 1000],
    ("evaluate.py", "--num-ood"): [50_000],  # CytoSyn §4.2: 50k tiles per half
    ("evaluate.py", "--val-sets"): [list(evaluate.VAL_SETS)],
    ("evaluate.py", "--sit-weights"): [keyword(sample.load_pipeline, "sit_weights")],
    ("evaluate.py", "--vae-weights"): [keyword(sample.load_pipeline, "vae_weights")],
    ("evaluate.py", "--sample-batch-size"): [sample.build_parser().get_default("batch_size")],
    ("evaluate.py", "--extractors"): [evaluate.PAPER_EXTRACTORS],
    ("evaluate.py", "--device"): ["auto"], ("evaluate.py", "--precision"): ["auto"],
    ("evaluate.py", "--num-train"): [doc("docs/memorization.md", r"up to\s+`--num-train` in all \(default ([\d,]+)\)",
                                         lambda text: int(text.replace(",", "")))],
    # metrics.py
    ("metrics.py", "--extractors"): [["fid-inception"]],  # the paper's Inception (pytorch-fid), as evaluate.py
    ("metrics.py", "--metrics"): [["fd", "pr"]],
    ("metrics.py", "--fd-num-generated"): [metrics.FD_GENERATED_SIZE, 50_000],
    ("metrics.py", "--cache-dir"): [Path("results/features")],
    ("metrics.py", "--out"): ["results/metrics"],
    ("metrics.py", "--device"): ["auto"], ("metrics.py", "--precision"): ["auto"],
    # tiling.py: CytoSyn §3.2's tiles, read back by slides.SlideTileReader with the same kernel
    ("tiling.py", "--mpp"): [TILE_MPP], ("tiling.py", "--image-size"): [TILE_SIZE],
    ("tiling.py", "--resize-kernel"): [keyword(slides.SlideTileReader, "resample")],
    ("tiling.py", "--min-tissue"): [0.5], ("tiling.py", "--stratify"): ["none"],
    ("tiling.py", "--slide-processes"): [1], ("tiling.py", "--seed"): [0],
    ("tiling.py", "--no-ink-filter"): [True],  # pen ink is dropped unless asked
    ("tiling.py", "--context"): [0], ("tiling.py", "--val-in"): [0.0],  # off unless asked (docs/tiling.md asks)
    ("tiling.py", "--val-out-slides"): [0.0],
    # train.py: the paper's run (CytoSyn §3.3, REPA-E §3; docs/training.md)
    ("train.py", "--image-size"): [TILE_SIZE], ("train.py", "--model"): ["SiT-XL/2"], ("train.py", "--vae"): ["f8d4"],
    ("train.py", "--encoder"): [keyword(features.load_encoder, "name")],
    ("train.py", "--cond-dropout"): [0.1, keyword(__import__("sit").SiT, "cond_dropout")],
    ("train.py", "--global-batch-size"): [doc("docs/training.md", r"global batch (\d+)", int),
                                          doc("README.md", r"global batch (\d+), AdamW", int)],
    ("train.py", "--lr"): [doc("README.md", r"global batch \d+, AdamW ([\de.-]+)\)", float)],
    ("train.py", "--vae-lr"): [1e-4], ("train.py", "--disc-lr"): [1e-4],
    ("train.py", "--adam-beta1"): [0.9], ("train.py", "--adam-beta2"): [0.999], ("train.py", "--max-grad-norm"): [1.0],
    ("train.py", "--ema-decay"): [0.9999], ("train.py", "--weight-decay"): [0.0],
    ("train.py", "--proj-sit-weight"): [0.5], ("train.py", "--proj-vae-weight"): [1.5],
    ("train.py", "--l1-weight"): [1.0], ("train.py", "--lpips-weight"): [1.0], ("train.py", "--kl-weight"): [1e-6],
    ("train.py", "--gan-weight"): [0.1], ("train.py", "--max-steps"): [400_000],
    ("train.py", "--shuffle-buffer"): [1000], ("train.py", "--out"): ["results/cytosyn"], ("train.py", "--seed"): [0],
    ("train.py", "--log-every"): [100], ("train.py", "--ckpt-every"): [50_000],
    ("train.py", "--sample-every"): [10_000],
    ("train.py", "--grid-tiles"): [8], ("train.py", "--tf32"): [True],
    ("train.py", "--sampler"): ["ode"], ("train.py", "--num-sampling-steps"): [50],  # the sample grids: quick
    ("train.py", "--cfg-scale"): [keyword(sample.SamplingSettings, "cfg_scale")],
    ("train.py", "--guidance-low"): [keyword(sample.SamplingSettings, "guidance_low")],
    ("train.py", "--guidance-high"): [keyword(sample.SamplingSettings, "guidance_high")],
    ("train.py", "--device"): ["auto"], ("train.py", "--precision"): ["auto"],
    # features.py: the tokens train.py's defaults need
    ("features.py", "--encoder"): [train.build_parser().get_default("encoder")],
    ("features.py", "--model"): [train.build_parser().get_default("model")],
    ("features.py", "--vae"): [train.build_parser().get_default("vae")],
    ("features.py", "--image-size"): [TILE_SIZE], ("features.py", "--batch-size"): [64], ("features.py", "--seed"): [0],
    ("features.py", "--device"): ["auto"],
    # the weights tool: the API's export()
    ("python -m support.weights export", "--sit-weights"): [list(keyword(weights.export, "sit_weights"))],
    ("python -m support.weights export", "--vae-weights"): [list(keyword(weights.export, "vae_weights"))],
    ("python -m support.weights export", "--format"): [keyword(weights.export, "layout"), weights.EXPORT_LAYOUTS[0]],
    # demo.py: what the README says the first run does
    ("demo.py", "--max-steps"): [doc("README.md", r"python demo\.py\s+# tile, train (\d+) steps", int)],
    ("demo.py", "--n"): [doc("README.md", r"generates (\d+) tiles from each of", int)],
    ("demo.py", "--num-sampling-steps"): [doc("README.md", r"demo's checkpoint \(`sample.py --restain`[^)]*?, "
                                                           r"(\d+) SDE steps;", int)],  # the restaining run's too
    ("demo.py", "--out"): ["results/demo"],
    ("demo.py", "--num-guidance"): [demo.GUIDANCE],  # the benchmark's guidance tiles (at most the training tiles)
}
# bench.py's own measuring settings (its batch sizes, step counts, sizes): no other home; each figure in
# docs/performance.md states the command it came from. Its sampling flags follow the table above.
BENCH_OWN = {"--model", "--vae", "--encoder", "--image-size", "--batch-size", "--timed-steps", "--warmup", "--seed",
             "--num-vectors", "--dims", "--slides", "--resize-kernel", "--pyramid-px", "--rounds", "--device",
             "--precision", "--size", "--num-tiles", "--num-train"}
WORKERS = "--num-workers"  # the machine's: checked by test_cli, not a constant


def parsers():
    found = {"train.py": train.build_parser(), "sample.py": sample.build_parser(),
             "evaluate.py": evaluate.build_parser(), "features.py": features.build_parser(),
             "metrics.py": metrics.build_parser(), "tiling.py": tiling.build_parser(), "demo.py": demo.build_parser()}
    for prefix, parser in (("bench.py", bench.build_parser()), ("python -m support.weights", weights.build_parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found.update({f"{prefix} {name}": p for name, p in sub.choices.items()})
    return found


def defaults():
    """(tool, flag, the default a command without the flag gets) of every flag with a default."""
    found = []
    for tool, parser in parsers().items():
        for action in parser._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            # (`is`, not `in (None, False)`: 0 == False, and seed 0 or weight decay 0.0 is a default to check)
            if flag and flag != "--help" and action.default is not None and action.default is not False \
                    and flag != WORKERS:
                found.append((tool, flag, action.default))
    return found


def scalar(value):
    """A several-valued flag's one default ([250]) is its value; tuples and lists compare alike."""
    value = list(value) if isinstance(value, tuple) else value
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def stated_in_help(action):
    """What a flag's help says its default is: "(default X)" or "(paper: X)" (k for thousands)."""
    found = re.search(r"[(;]\s*(?:default|paper)[: ]+([\d.e-]+k?)[);]", action.help or "")
    if not found:
        return None
    text = found.group(1)
    return float(text[:-1]) * 1000 if text.endswith("k") else float(text)


@pytest.mark.parametrize("tool, flag, default", defaults(), ids=lambda v: str(v)[:40])
def test_every_default_is_the_same_on_the_command_line_in_the_api_and_in_the_docs(tool, flag, default):
    if tool.startswith("bench.py") and flag not in SAMPLING:
        assert flag in BENCH_OWN, f"{tool} {flag}: a bench setting not placed"
        return
    sources = others(tool, flag)
    assert sources is not None, f"{tool} {flag} (default {default!r}) is not in the table: say where else it lives"
    for value in sources:
        assert scalar(default) == scalar(value), f"{tool} {flag}: the command line says {default!r}, not {value!r}"
    action = next(a for a in parsers()[tool]._actions if flag in a.option_strings)
    if (help_value := stated_in_help(action)) is not None and not isinstance(scalar(default), str):
        assert float(scalar(default)) == help_value, f"{tool} {flag}: its help says {help_value}"


def test_the_table_places_the_flags_of_every_tool():
    placed = {(tool, flag) for tool, flag, _ in defaults() if others(tool, flag) is not None}
    assert len(placed) > 90 and {tool for tool, _ in placed} >= {"train.py", "sample.py", "evaluate.py",
                                                                  "metrics.py", "tiling.py", "features.py", "demo.py"}


def test_restaining_and_samples_per_tile_resolve_to_the_documented_defaults():
    """--strength and --n default to None on the parser and are resolved by parse_args (they depend on the mode):
    the values a command without them gets equal the API's and the help's."""
    tile = str(ROOT / "tests" / "data" / "tiles" / "cmu_small_region_1120_1568.png")
    args = sample.parse_args(["--ckpt", "c", "--restain", tile, "--style", tile])
    assert args.strength == keyword(sample.Pipeline.__call__, "strength") == sample.STRENGTH
    assert args.strength == stated_in_help(next(a for a in sample.build_parser()._actions if a.dest == "strength"))
    args = sample.parse_args(["--ckpt", "c", "--cond", tile])
    assert args.n == sample.SAMPLES_PER_TILE == stated_in_help(next(a for a in sample.build_parser()._actions
                                                                  if a.dest == "n"))


def test_every_flag_the_table_places_still_has_a_default():
    """The table drives the test above only through the flags that have a default: a flag whose default is
    dropped (None) would leave it silently. Every flag placed must still be found with one."""
    found = {(tool, flag) for tool, flag, _ in defaults()}
    placed = set(TABLE) | {(tool, flag) for tool in ("sample.py", "evaluate.py", "bench.py sample")
                           for flag in SAMPLING}
    placed |= {(tool, flag) for tool in ("metrics.py", "evaluate.py") for flag in METRIC_API}
    assert not placed - found, f"flags placed in the table that no longer have a default: {sorted(placed - found)}"
