"""The repo reads as the issue asks: the method in front, the tool behind, one vocabulary, one error path.

- at most 16 top-level .py files; what serves them lives in support/;
- no two module-level functions or classes share a name across files (entry points aside);
- NOTE marks deviations from the paper or REPA-E, as `# NOTE:` comments only (greppable);
- nothing below a script's __main__ exits the process, except support.cli.run, which every __main__ calls;
- a flag name means one thing: the same type and range (or choices) in every tool that has it, and the
  old names are gone.
"""
import argparse
import ast
import io
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
from support import weights

ROOT = Path(__file__).resolve().parent.parent
CODE = sorted(ROOT.glob("*.py")) + sorted((ROOT / "support").glob("*.py"))
ENTRY_POINTS = {"main", "build_parser", "parse_args"}


def test_the_top_level_is_the_method_and_the_commands():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 16, top
    method = {"vae.py", "sit.py", "repa_loss.py", "sampler.py", "train.py", "sample.py", "metrics.py", "tiling.py",
              "vae_loss.py", "fld.py", "features.py", "evaluate.py", "demo.py", "bench.py"}
    assert method <= set(top) and (ROOT / "tests" / "synthetic_slide.py").exists()


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
            assert [w for _, w in exits(run)] == ["raise SystemExit", "raise SystemExit"]
            assert {ln for ln, _ in exits(tree)} == {ln for ln, _ in exits(run)}
            continue
        assert not exits(tree), f"{path.name} exits outside support.cli.run: {exits(tree)}"
        if mains:
            assert ast.unparse(mains[0].body[0]).strip() == "run(main)", path.name


def test_exits_finds_what_it_looks_for():
    assert len(exits(ast.parse("import sys\nraise SystemExit(1)\nsys.exit(2)\np.error('x')\nexit()"))) == 4


def parsers():
    """Every tool's argument parser, by name."""
    found = {"train.py": train.build_parser(), "sample.py": sample.build_parser(), "evaluate.py": evaluate.build_parser(),
             "features.py": features.build_parser(), "metrics.py": metrics.build_parser(),
             "tiling.py": tiling.build_parser(), "demo.py": demo.build_parser()}
    sub = next(a for a in bench.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found.update({f"bench.py {name}": p for name, p in sub.choices.items()})
    return found


def flags(parser):
    return {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"}


def kind(action):
    """What makes two flags of one name the same: the type of one value (with its range) and its choices. A
    comma-separated list (evaluate.py's several samplers) counts by its element."""
    element = getattr(action.type, "element", action.type)
    choices = getattr(action.type, "choices", None) or action.choices
    name = "str" if element in (None, str) else getattr(element, "__name__", repr(element))
    return name, tuple(choices or ()), type(action).__name__


def test_a_flag_name_means_one_thing_in_every_tool():
    owners = {}
    for tool, parser in parsers().items():
        for flag, action in flags(parser).items():
            owners.setdefault(flag, []).append((tool, kind(action)))
    shared = {f: o for f, o in owners.items() if len(o) > 1}
    for flag, tools in shared.items():
        kinds = {k for _, k in tools}
        assert len(kinds) == 1, f"{flag} differs between tools: {tools}"
    for flag in ("--sampler", "--num-sampling-steps", "--cfg-scale", "--guidance-low", "--guidance-high", "--seed",
                 "--device", "--precision", "--num-workers", "--out", "--batch-size", "--image-size"):
        assert len(shared.get(flag, [])) >= 3, (flag, shared.get(flag))


@pytest.mark.parametrize("old", ["--results-dir", "--workers", "--mode", "--steps", "--sample-cfg", "--sample-steps",
                                 "--bf16", "--fake", "--jpeg-fake", "--format", "--quality", "--size", "--resize-mpp"])
def test_old_names_are_gone(old):
    assert not [tool for tool, parser in parsers().items() if old in flags(parser)]


def test_tiling_slide_processes_have_their_own_name():
    assert "--slide-processes" in flags(tiling.build_parser()) and "--num-workers" not in flags(tiling.build_parser())


def test_the_weights_tool_is_a_module_of_support():
    assert weights.main.__module__ == "support.weights"
