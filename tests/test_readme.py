"""The README cannot drift from the code: every flag in its runnable command blocks exists.

A block counts as runnable when the line before its opening fence is `<!-- runnable -->`. For each
`python X.py ...` or `torchrun ... X.py ...` command in such a block, the flags it uses must appear
in `python X.py --help` (for a script with subcommands, bench.py: in `python X.py SUB --help`).
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = {"bench.py"}  # scripts whose first word is a subcommand with flags of its own


def runnable_commands(text):
    """(script, [flags]) for every command in the README's runnable blocks."""
    blocks = re.findall(r"<!-- runnable -->\s*\n```[a-z]*\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0]) if line.strip() else []
            scripts = [w for w in words if w.endswith(".py") and (ROOT / w).exists()]
            if scripts:
                rest = words[words.index(scripts[0]) + 1:]
                script = scripts[0]
                if script in SUBCOMMANDS and rest and not rest[0].startswith("-"):
                    script, rest = f"{script} {rest[0]}", rest[1:]
                commands.append((script, [w.split("=")[0] for w in rest if w.startswith("--")]))
    return commands


def test_readme_has_runnable_blocks():
    commands = runnable_commands((ROOT / "README.md").read_text())
    scripts = {script.split()[0] for script, _ in commands}
    assert {"train.py", "sample.py", "metrics.py", "tiling.py", "bench.py", "demo.py"} <= scripts, scripts


def test_every_readme_flag_exists():
    commands = runnable_commands((ROOT / "README.md").read_text())
    helps = {}
    for script, flags in commands:
        if script not in helps:
            out = subprocess.run([sys.executable, *script.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, out.stderr[-500:]
            helps[script] = set(re.findall(r"--[a-z0-9][a-z0-9-]*", out.stdout))
        missing = [f for f in flags if f not in helps[script]]
        assert not missing, f"README uses {missing} but `python {script} --help` does not list them"


def test_the_checker_catches_a_missing_flag():
    text = "<!-- runnable -->\n```bash\npython train.py --no-such-flag 3\n```\n"
    assert runnable_commands(text) == [("train.py", ["--no-such-flag"])]


def test_the_checker_reads_subcommands():
    text = "<!-- runnable -->\n```bash\npython bench.py train --steps 3 --compile\n```\n"
    assert runnable_commands(text) == [("bench.py train", ["--steps", "--compile"])]


def documented_names(text):
    """(module, name) for every `file.py`: `name`, `name` cell of the README's map of the paper."""
    table = text.split("## The paper, file by file", 1)[1].split("\n## ", 1)[0]
    pairs = []
    for cell in re.findall(r"`(\w+)\.py`: ([^|]+)", table):
        module, names = cell
        pairs += [(module, n) for n in re.findall(r"`([\w.]+)`", names)]
    return pairs


def test_every_documented_name_is_importable_where_the_readme_says():
    import importlib
    pairs = documented_names((ROOT / "README.md").read_text())
    assert ("sit", "build_sit") in pairs or any(m == "sit" for m, _ in pairs)
    assert len(pairs) > 20
    for module, name in pairs:
        obj = importlib.import_module(module)
        for part in name.split("."):
            assert hasattr(obj, part), f"README says {module}.py has {name}"
            obj = getattr(obj, part)
