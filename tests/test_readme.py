"""The README and docs/*.md cannot drift from the code: every command of their runnable blocks parses.

A block counts as runnable when the line before its opening fence is `<!-- runnable -->`. For each
`python X.py ...`, `torchrun ... X.py ...` or `python -m support.weights ...` command in such a block, the
tool's own parser (its `build_parser()`, built in-process; for bench.py and support.weights, the
subcommand's parser) must list every flag the command uses, and must accept the whole command line.
The README also stays short (at most 3,000 words), links every page of docs/, and its map of the paper
names functions that exist where it says.
"""
import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from support.cli import InputError

ROOT = Path(__file__).resolve().parent.parent
MODULE_COMMANDS = {"support.weights"}  # tools run as `python -m MODULE`
README_MAX_WORDS = 3000
DOCS = sorted((ROOT / "docs").glob("*.md"))


def runnable_commands(text):
    """(tool, argv) for every command of the runnable blocks: tool is "X.py" or a module run with -m,
    argv the words after it (a subcommand included)."""
    blocks = re.findall(r"<!-- runnable -->\s*\n```[a-z]*\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0]) if line.strip() else []
            for i, word in enumerate(words):
                if word.endswith(".py") and (ROOT / word).exists():
                    commands.append((word, words[i + 1:]))
                    break
                if word == "-m" and i + 1 < len(words) and words[i + 1] in MODULE_COMMANDS:
                    commands.append((words[i + 1], words[i + 2:]))
                    break
    return commands


def flags_of(argv):
    return [w.split("=")[0] for w in argv if w.startswith("--")]


def subcommands(parser):
    """name -> parser of a parser's subcommands ({} when it has none)."""
    return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def option_strings(parser):
    return {s for a in parser._actions for s in a.option_strings}


def tool_parser(tool):
    """The parser a tool builds: X.py -> X.build_parser(); a -m module -> module.build_parser()."""
    return importlib.import_module(tool[:-3] if tool.endswith(".py") else tool).build_parser()


def missing_flags(parser, argv):
    """The flags of argv that neither the parser nor the subcommand argv names take."""
    known = option_strings(parser)
    sub = next((w for w in argv if w in subcommands(parser)), None)
    if sub is not None:
        known |= option_strings(subcommands(parser)[sub])
    return [f for f in flags_of(argv) if f not in known]


def parse_error(parser, argv):
    """None if the parser accepts argv (flags, values, required arguments), else argparse's message."""
    try:
        parser.parse_args(argv)
    except InputError as err:  # support.cli.ArgumentParser's way to refuse a command line
        return str(err)
    return None


def check_commands(name, text):
    commands = runnable_commands(text)
    parsers = {}
    for tool, argv in commands:
        parser = parsers.setdefault(tool, tool_parser(tool))
        if subcommands(parser):
            assert any(w in subcommands(parser) for w in argv), f"{name}: `{tool} {shlex.join(argv)}` has no subcommand"
        missing = missing_flags(parser, argv)
        assert not missing, f"{name} uses {missing} but {tool}'s parser does not have them: {tool} {shlex.join(argv)}"
        error = parse_error(parser, argv)
        assert error is None, f"{name}: `{tool} {shlex.join(argv)}` does not parse: {error}"
    return commands


def test_readme_has_a_runnable_block_per_tool():
    commands = runnable_commands((ROOT / "README.md").read_text())
    tools = {tool for tool, _ in commands}
    assert {"demo.py", "tiling.py", "train.py", "features.py", "sample.py", "metrics.py", "evaluate.py", "bench.py",
            "support.weights"} <= tools, tools
    bench = {argv[0] for tool, argv in commands if tool == "bench.py"}
    assert {"train", "sample", "fd", "tiling", "weights"} <= bench, bench
    weights = {argv[0] for tool, argv in commands if tool == "support.weights"}
    assert {"export", "convert"} <= weights, weights


def test_every_readme_command_parses():
    assert len(check_commands("README.md", (ROOT / "README.md").read_text())) >= 20


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_docs_command_parses(doc):
    check_commands(f"docs/{doc.name}", doc.read_text())


def test_the_docs_have_runnable_blocks():
    with_blocks = [d.name for d in DOCS if runnable_commands(d.read_text())]
    assert {"tiling.md", "training.md", "sampling.md", "evaluation.md", "weights.md", "performance.md"} <= set(
        with_blocks), with_blocks


def test_the_checker_catches_a_missing_flag():
    text = "<!-- runnable -->\n```bash\npython train.py --no-such-flag 3\n```\n"
    assert runnable_commands(text) == [("train.py", ["--no-such-flag", "3"])]
    assert missing_flags(tool_parser("train.py"), ["--tiles", "x", "--no-such-flag", "3"]) == ["--no-such-flag"]
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_commands("text", text)


def test_the_checker_catches_a_bad_value_and_a_missing_required_flag():
    with pytest.raises(AssertionError, match="does not parse"):  # --jpeg takes a quality in [1, 100]
        check_commands("text", "<!-- runnable -->\n```bash\npython tiling.py --slides S --out O --jpeg 101\n```\n")
    with pytest.raises(AssertionError, match="does not parse"):  # --ckpt is required
        check_commands("text", "<!-- runnable -->\n```bash\npython sample.py --cond t.png\n```\n")


def test_the_checker_reads_subcommands():
    text = ("<!-- runnable -->\n```bash\npython bench.py train --timed-steps 3 --compile\n"
            "python -m support.weights export CKPT OUT --sit-weights ema,raw   # a comment\n```\n")
    assert runnable_commands(text) == [("bench.py", ["train", "--timed-steps", "3", "--compile"]),
                                       ("support.weights", ["export", "CKPT", "OUT", "--sit-weights", "ema,raw"])]
    check_commands("text", text)
    bench = tool_parser("bench.py")
    assert missing_flags(bench, ["sample", "--timed-steps", "3"]) == ["--timed-steps"]  # train's flag, not sample's
    with pytest.raises(AssertionError, match="no subcommand"):
        check_commands("text", "<!-- runnable -->\n```bash\npython bench.py --out x\n```\n")


def test_the_readme_is_short_and_links_every_page_of_docs():
    text = (ROOT / "README.md").read_text()
    words = len(text.split())  # what `wc -w README.md` counts
    assert words <= README_MAX_WORDS, f"README.md has {words} words; at most {README_MAX_WORDS}"
    assert DOCS, "docs/ has no pages"
    links = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    unlinked = [f"docs/{d.name}" for d in DOCS if f"docs/{d.name}" not in links]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{d.name}" for d in DOCS])
def test_every_relative_link_exists(page):
    path = ROOT / page
    targets = re.findall(r"\]\(([^)#\s]+)", path.read_text())
    broken = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not broken, f"{page} links to missing files: {broken}"


def documented_names(text):
    """(module, name) for every `file.py`: `name`, `name` cell of the README's map of the paper (a file in
    support/ is the module support.X)."""
    table = text.split("## The paper, file by file", 1)[1].split("\n## ", 1)[0]
    pairs = []
    for path, names in re.findall(r"`([\w/]+)\.py`(?: \([^)]*\))?: ([^|;]+)", table):  # a cell may name two files
        pairs += [(path.replace("/", "."), n) for n in re.findall(r"`([\w.]+)`", names)]
    return pairs


def test_every_documented_name_is_importable_where_the_readme_says():
    pairs = documented_names((ROOT / "README.md").read_text())
    assert ("sit", "build_sit") in pairs and ("extractors", "EXTRACTORS") in pairs
    assert any(m == "evaluate" for m, _ in pairs)
    assert len(pairs) > 20
    for module, name in pairs:
        obj = importlib.import_module(module)
        for part in name.split("."):
            assert hasattr(obj, part), f"README says {module.replace('.', '/')}.py has {name}"
            obj = getattr(obj, part)


# -------- A number a command measures is stated once: in the README --------------------------------------------
MEASURED = {  # what a command measures -> how a text states it (the value is the pattern's group)
    "the demo's time on 2 cores, in minutes": r"demo\.py[^\n]*?about (\d+) min",
    "the demo's tissue tiles": r"(\d+) tissue tiles of 64 px",
    "the demo's val-in tiles": r"\((\d+) held out as val-in\)",
    "the demo model's parameters, in millions": r"([\d.]+) M-parameter SiT",
    "the test suite's time on 2 cores": r"the suite takes\s+(\d+ min \d+ s)",
}


def statements(text, pattern):
    return re.findall(pattern, text)


def texts_besides_the_readme():
    """The docs, every requirements file and every docstring and comment of the code: where a number restated
    by hand would drift from the README's."""
    texts = {f"docs/{d.name}": d.read_text() for d in DOCS}
    texts.update({p.name: p.read_text() for p in ROOT.glob("requirements*.txt")})
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in [*ROOT.glob("*.py"), *ROOT.glob("support/*.py")]})
    return texts


@pytest.mark.parametrize("what", list(MEASURED))
def test_a_measured_number_is_stated_once_in_the_readme_and_nowhere_else_otherwise(what):
    readme = statements((ROOT / "README.md").read_text(), MEASURED[what])
    assert len(readme) == 1, f"the README states {what} {len(readme)} times"
    drifted = {name: found for name, text in texts_besides_the_readme().items()
               if (found := statements(text, MEASURED[what])) and set(found) != set(readme)}
    assert drifted == {}, f"{what}: the README says {readme[0]}"


def test_the_statement_checker_finds_a_drifted_copy():
    planted = "    python demo.py                       # about 9 minutes on a 2-core CPU"
    assert statements(planted, MEASURED["the demo's time on 2 cores, in minutes"]) == ["9"]


def test_the_demo_models_have_the_parameters_the_readme_states():
    import torch

    import demo
    import train
    value = float(statements((ROOT / "README.md").read_text(), MEASURED["the demo model's parameters, in millions"])[0])
    args = train.parse_args(["--tiles", "unused", "--no-lpips", *demo.flags(demo.TRAIN)])
    nets = train.build_models(args, torch.device("meta"), 1)
    for net in (nets.sit, nets.vae):  # "a 0.37 M-parameter SiT (`SiT-T/2`) and VAE (`tiny`)": each
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == value
