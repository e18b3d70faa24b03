"""The repo reads from the paper down: the method in front, the tools behind, one vocabulary, one error path.

- at most 16 top-level .py files; what serves them lives in support/;
- imports point down and never in a circle: support/ imports no top-level file but the model builders sit.py
  and vae.py, a method file imports no command, and `import train` loads no slide reader, HDF5 or plots;
- no two module-level functions or classes share a name across files (entry points aside);
- NOTE marks deviations from the paper or REPA-E, as `# NOTE:` comments only (greppable);
- nothing below a script's __main__ exits the process, except support.cli.run, which every __main__ calls;
- one idea, one flag; one flag, one meaning: the same type and range (or choices) in every tool that has it,
  each shared flag stated in the table below with what it means, and the other spellings of an idea absent;
- the text speaks of the code: no pointer to an issue tracker that a reader does not have.
"""
import argparse
import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import bench
import demo
import evaluate
import features
import metrics
import sample
import tiling
import train
from sit import SiT_models
from support import manifests, weights
from support.logs import LOGGED_TERMS
from vae import vae_models

ROOT = Path(__file__).resolve().parent.parent
CODE = sorted(ROOT.glob("*.py")) + sorted((ROOT / "support").glob("*.py"))
ENTRY_POINTS = {"main", "build_parser", "parse_args"}
# The paper's method: what a reader of the paper opens. The other top-level files are the commands.
METHOD = {"vae", "sit", "repa_loss", "sampler", "vae_loss", "fld", "features", "extractors"}
COMMANDS = {"tiling", "train", "sample", "metrics", "evaluate", "demo", "bench"}
MODEL_BUILDERS = {"sit", "vae"}  # what support/weights.py needs to rebuild a checkpoint's networks
HEAVY = ("openslide", "h5py", "matplotlib")  # what a reader of the training step should not have to load


def test_the_top_level_is_the_method_and_the_commands():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert len(top) <= 16, sorted(top)
    assert top == METHOD | COMMANDS, top ^ (METHOD | COMMANDS)
    assert (ROOT / "tests" / "synthetic_slide.py").exists()


# -------- Imports point down, never in a circle ---------------------------------------------------------------
def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def project_imports(path, known):
    """The project modules a file imports, anywhere in it (a function's lazy import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph():
    files = CODE + sorted((ROOT / "tests").glob("*.py"))
    known = {module_name(p) for p in CODE} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    return {(module_name(p) if p.parent != ROOT / "tests" else p.stem): project_imports(p, known) for p in files}


def cycles(graph):
    """Every import cycle of a {module: imported modules} graph, as the list of its modules (Tarjan's SCCs)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward(graph):
    """(importer, imported) of every import that points up: support/ -> a top-level file (but the model
    builders), or a method file -> a command."""
    bad = []
    for module, imported in graph.items():
        for name in imported:
            if module.startswith("support.") and "." not in name and name not in MODEL_BUILDERS:
                bad.append((module, name))
            if module in METHOD and name in COMMANDS:
                bad.append((module, name))
    return sorted(bad)


def test_imports_point_down_and_never_in_a_circle():
    graph = import_graph()
    assert len(graph) > 40 and "support.weights" in graph["sample"]
    assert upward(graph) == []
    assert cycles(graph) == []


def test_the_import_checks_find_what_they_look_for():
    graph = {"support.data": {"support.slides"}, "support.slides": {"support.data", "tiling"}, "features": {"train"},
             "train": {"features"}, "sample": {"sit"}, "support.weights": {"sit", "vae"}}
    assert cycles(graph) == [["features", "train"], ["support.data", "support.slides"]]
    assert upward(graph) == [("features", "train"), ("support.slides", "tiling")]


def test_import_train_loads_no_slide_reader_hdf5_or_plotting_library():
    code = f"import sys, train; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


# -------- Names, NOTEs, exits ------------------------------------------------------------------------------
def test_one_meaning_per_name():
    seen = {}
    for path in CODE:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in ENTRY_POINTS:
                assert node.name not in seen, f"{node.name} is defined in {seen.get(node.name)} and {path.name}"
                seen[node.name] = path.name
    assert len(seen) > 200


def test_note_marks_deviations_as_comments_only():
    count = 0
    for path in CODE:
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if "NOTE" in tok.string:
                assert tok.type == tokenize.COMMENT and tok.string.lstrip().startswith("# NOTE:"), \
                    f"{path.name}:{tok.start[0]}: NOTE outside a `# NOTE:` comment"
                count += 1
    assert count >= 15


def exits(tree):
    """(line, what) of every raise SystemExit, sys.exit(), exit(), quit() and parser .error() in a tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                found.append((node.lineno, "raise SystemExit"))
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    (f.value.id, f.attr) in {("sys", "exit"), ("p", "error"), ("parser", "error"), ("os", "_exit")}:
                found.append((node.lineno, f"{f.value.id}.{f.attr}"))
            if isinstance(f, ast.Name) and f.id in ("exit", "quit"):
                found.append((node.lineno, f.id))
    return found


def test_one_error_path():
    for path in CODE:
        tree = ast.parse(path.read_text())
        mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        if path.name == "cli.py":  # run() is the one place that ends the process
            run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
            assert [w for _, w in exits(run)] == ["raise SystemExit"]
            assert {ln for ln, _ in exits(tree)} == {ln for ln, _ in exits(run)}
            continue
        assert not exits(tree), f"{path.name} exits outside support.cli.run: {exits(tree)}"
        if mains:
            assert ast.unparse(mains[0].body[0]).strip() == "run(main)", path.name


def test_exits_finds_what_it_looks_for():
    assert len(exits(ast.parse("import sys\nraise SystemExit(1)\nsys.exit(2)\np.error('x')\nexit()"))) == 4


# -------- One idea, one flag; one flag, one meaning -------------------------------------------------------
def subparsers(parser, prefix):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {f"{prefix} {name}": p for name, p in sub.choices.items()}


def parsers():
    """Every tool's argument parser, by name (subcommands each their own)."""
    found = {"train.py": train.build_parser(), "sample.py": sample.build_parser(),
             "evaluate.py": evaluate.build_parser(), "features.py": features.build_parser(),
             "metrics.py": metrics.build_parser(),
             "tiling.py": tiling.build_parser(), "demo.py": demo.build_parser()}
    found.update(subparsers(bench.build_parser(), "bench.py"))
    found.update(subparsers(weights.build_parser(), "python -m support.weights"))
    return found


def flags(parser):
    return {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"}


def kind(action):
    """What makes two flags of one name the same: the type of one value (with its range), its choices and what
    the flag does when given. A comma-separated list (evaluate.py's several samplers) counts by its element."""
    element = getattr(action.type, "element", action.type)
    choices = getattr(action.type, "choices", None) or action.choices
    name = "str" if element in (None, str) else getattr(element, "__name__", repr(element))
    return name, tuple(choices or ()), type(action).__name__, action.dest


# Every flag that two tools share, and what it means in all of them.
MEANINGS = {
    "--tiles": "the input tiles: tiling.py's output (its manifest's rows), a manifest, a tile folder or tar shards",
    "--slides": "the slides: tiling.py's input, or the folder a manifest's tiles are read back from",
    "--out": "the folder a run writes, locked while it runs",
    "--generated": "generated tiles to score",
    "--ckpt": "a checkpoint or export to sample from",
    "--features": "an (N, D) array of H0-mini CLS features to condition on",
    "--model": "the SiT preset",
    "--vae": "the VAE preset",
    "--encoder": "the conditioning and alignment encoder",
    "--image-size": "the tile side in pixels",
    "--resize": "what to do with a tile of another size: crop or scale",
    "--random-weights": "seeded random weights instead of the hub's, for every frozen network the tool loads",
    "--resize-kernel": "the Pillow kernel that resizes a tile",
    "--sit-weights": "the SiT's EMA or raw weights",
    "--vae-weights": "the VAE's EMA or raw weights",
    "--sampler": "the sampler: sde, ode or heun",
    "--num-sampling-steps": "the sampler's steps",
    "--cfg-scale": "the guidance scale",
    "--guidance-low": "guidance applies where t >= this",
    "--guidance-high": "guidance applies where t <= this",
    "--seed": "the seed every random choice of the run comes from",
    "--batch-size": "items per forward pass, per process",
    "--num-workers": "data-loader worker processes",
    "--device": "auto, cpu, cuda or cuda:N",
    "--precision": "auto, fp32 or bf16",
    "--compile": "torch.compile the networks",
    "--no-lpips": "no LPIPS term",
    "--no-gan": "no discriminator",
    "--jpeg-val": "re-encode the val tiles as JPEG at this quality",
    "--jpeg-guidance": "re-encode the guidance tiles as JPEG at this quality",
    "--jpeg-generated": "re-encode the generated tiles as JPEG at this quality",
    "--crop": "centre-crop every tile to this side",
    "--resize-to-input": "resize every tile straight to the extractor's input",
    "--k": "nearest neighbours of precision and recall",
    "--bootstrap-draws": "draws of the bootstrap of FD",
    "--bootstrap-num-generated": "generated samples per bootstrap draw",
    "--fld-num-generated": "generated samples FLD's mixture is centred on, at most",
    "--extractors": "the feature spaces the numbers are measured in",
    "--max-steps": "optimizer steps of a run",
    "--n": "images generated per conditioning",
    "--num-guidance": "training tiles that guide the benchmark's samples",
    "--work-dir": "bench.py's scratch folder",
    "--tracker": "where the run's numbers also go, live: tensorboard or wandb",
    "--slide-mpp": "µm per level-0 pixel of the slide(s), overriding their metadata",
    "--size": "a region twin's size in pixels at 0.5 µm/px, W or W,H",
    "--num-train": "training tiles (their features) each generated tile is compared with",
    "--dims": "bench.py's feature dimension",
}
# One idea, one spelling: a flag that matches an idea's pattern must be that idea's flag (or one of them).
IDEAS = {
    "the input tiles": (r"^--(data|real|input|images|train|tiles|tiles-dir|tile-dir)$", {"--tiles"}),
    "random weights": (r"random|untrained|pretrained", {"--random-weights"}),
    "the resize kernel": (r"resample|kernel|interpolation", {"--resize-kernel"}),
    "a set's JPEG quality": (r"jpeg", {"--jpeg", "--jpeg-val", "--jpeg-guidance", "--jpeg-generated"}),
    "a metric's sample budget": (r"gen-size|generated-size|bootstrap-size|num-generated",
                                 {"--fd-num-generated", "--fld-num-generated", "--bootstrap-num-generated"}),
    "a loss weight": (r"coeff|-weight$", {f"--{term.replace('_', '-')}-weight" for term in LOGGED_TERMS}),
    "EMA or raw weights": (r"^--sit$|^--(sit|vae)-(weights|kinds?|ema|raw)$", {"--sit-weights", "--vae-weights"}),
    "precomputed training tokens": (r"token", {"--tokens"}),
}


def owners():
    found = {}
    for tool, parser in parsers().items():
        for flag, action in flags(parser).items():
            found.setdefault(flag, []).append((tool, kind(action)))
    return found


def test_a_flag_name_means_one_thing_in_every_tool():
    shared = {f: o for f, o in owners().items() if len(o) > 1}
    for flag, tools in shared.items():
        assert len({k for _, k in tools}) == 1, f"{flag} differs between tools: {tools}"
        assert MEANINGS.get(flag), f"{flag} is shared by {[t for t, _ in tools]}: state its one meaning in MEANINGS"
    for flag in ("--sampler", "--num-sampling-steps", "--cfg-scale", "--guidance-low", "--guidance-high", "--seed",
                 "--device", "--precision", "--num-workers", "--out", "--batch-size", "--image-size", "--tiles",
                 "--random-weights", "--resize-kernel", "--sit-weights", "--vae-weights"):
        assert len(shared.get(flag, [])) >= 3, (flag, shared.get(flag))


def test_one_idea_has_one_spelling_in_every_tool():
    every = owners()
    for idea, (pattern, spellings) in IDEAS.items():
        found = {flag for flag in every if re.search(pattern, flag)}
        assert found <= spellings, f"{idea}: {sorted(found - spellings)} (the one spelling: {sorted(spellings)})"
        assert found, idea


def test_architecture_flags_name_presets_and_weight_flags_name_ema_or_raw():
    for tool, parser in parsers().items():
        found = flags(parser)
        if "--vae" in found:
            assert tuple(found["--vae"].choices) == tuple(vae_models), tool
        if "--model" in found:
            assert tuple(found["--model"].choices) == tuple(SiT_models), tool
        for flag in ("--sit-weights", "--vae-weights"):
            if flag in found:
                assert set(kind(found[flag])[1]) == {"ema", "raw"}, (tool, flag)


def test_every_loss_weight_is_the_flag_of_the_term_it_weighs():
    """train.py's --TERM-weight flags weigh the terms that log.txt, metrics.csv and loss.png call TERM."""
    found = [f for f in flags(train.build_parser()) if f.endswith("-weight")]
    assert len(found) == 6
    for flag in found:
        assert flag[2:-len("-weight")].replace("-", "_") in LOGGED_TERMS, flag
    used = set(re.findall(r"args\.(\w+)_weight\b", (ROOT / "train.py").read_text()))
    assert used == {f[2:-len("-weight")].replace("-", "_") for f in found}


def test_tiles_means_the_same_folder_in_every_tool(tmp_path):
    """A tiling output given as --tiles: train.py and features.py read its train rows, evaluate.py its splits."""
    out = tmp_path / "tiling"
    (out / "tiles").mkdir(parents=True)
    (out / "tiling.json").write_text("{}")
    rows = [("a", "train"), ("b", "train"), ("c", "val_in"), ("d", "val_out")]
    (out / "manifest.csv").write_text("file,split,tss\n" + "".join(f"tiles/{n}.png,{s},AA\n" for n, s in rows))
    for name, _ in rows:
        (out / "tiles" / f"{name}.png").write_bytes(b"")
    for parse in (train.parse_args, lambda a: features.build_parser().parse_args(a)):
        args = parse(["--tiles", str(out), "--out", str(tmp_path / "o")])
        assert manifests.find_tiles(args.tiles).items == [str(out / "tiles" / "a.png"), str(out / "tiles" / "b.png")]
    args = evaluate.parse_args(["--ckpt", "c", "--tiles", str(out), "--out", str(tmp_path / "e"), "--num-guidance",
                                "2"])
    guidance, _, vals = evaluate.select_tiles(args)
    assert [r["file"] for r in guidance] == ["tiles/a.png", "tiles/b.png"]
    assert {k: [r["file"] for r in v] for k, v in vals.items()} == {"val_in": ["tiles/c.png"],
                                                                    "val_out": ["tiles/d.png"]}


@pytest.mark.parametrize("old", ["--results-dir", "--workers", "--mode", "--steps", "--sample-cfg", "--sample-steps",
                                 "--bf16", "--fake", "--jpeg-fake", "--quality", "--resize-mpp", "--data", "--real",
                                 "--train", "--resample", "--random-encoder", "--lpips-random", "--proj-coeff",
                                 "--vae-align-coeff", "--fd-generated-size", "--fld-gen-size", "--bootstrap-size"])
def test_old_names_are_gone(old):
    assert not [tool for tool, parser in parsers().items() if old in flags(parser)]


def test_tiling_slide_processes_have_their_own_name():
    assert "--slide-processes" in flags(tiling.build_parser()) and "--num-workers" not in flags(tiling.build_parser())


def test_the_weights_tool_is_a_module_of_support():
    assert weights.main.__module__ == "support.weights"


# -------- The text speaks of the code ----------------------------------------------------------------------
TEXT_FILES = ("*.py", "*.md", "*.txt", "*.ini", "*.toml", "*.cfg", "run")
PROCESS_WORDS = re.compile(r"\bissues?\b|tools/mutate", re.IGNORECASE)


def test_no_text_points_to_an_issue_tracker():
    """A reader has the code and the paper, not our tracker: a comment gives its reason, never an issue number."""
    skip = {".git", ".venv", "mutants", "results", "__pycache__"}
    files = [p for pattern in TEXT_FILES for p in ROOT.rglob(pattern) if not skip & set(p.relative_to(ROOT).parts)]
    assert len(files) > 50
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
            if PROCESS_WORDS.search(line) and p.name != "test_layout.py"]
    assert hits == []
    assert PROCESS_WORDS.search("as the Issue asks") and not PROCESS_WORDS.search("tissue mask")
