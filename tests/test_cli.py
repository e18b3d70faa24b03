"""support/cli.py and the command lines: every numeric setting is range-checked at the boundary, outputs stay
out of inputs and one run writes a folder at a time, a DataLoader worker's error reaches the user as its own
last line, and threads fit the CPUs."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import sample
import tiling
import train
from support import cli, outputs


def bench_parsers():
    """bench.py's subcommand parsers, one per COMMANDS entry."""
    parsers = {}
    for name, (add_args, _) in bench.COMMANDS.items():
        parser = argparse.ArgumentParser()
        add_args(parser)
        parsers[f"bench.py {name}"] = parser
    return parsers


PARSERS = {"train.py": train.build_parser, "tiling.py": tiling.build_parser, "sample.py": sample.build_parser,
           **{name: (lambda p=p: p) for name, p in bench_parsers().items()}}


def numeric_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.type is not None and a.type not in (str,)]


@pytest.mark.parametrize("script", list(PARSERS))
def test_every_numeric_setting_is_range_checked(script):
    """No bare int/float: each numeric flag has a number_in range, which refuses nan, inf and text."""
    parser = PARSERS[script]()
    actions = numeric_actions(parser)
    assert actions
    for action in actions:
        assert action.type not in (int, float), f"{script} {action.option_strings[0]} has no range"
        if "in [" in getattr(action.type, "__name__", "") or "in (" in getattr(action.type, "__name__", ""):
            for bad in ("nan", "inf", "-inf", "x"):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(bad)


def test_number_in_says_the_range():
    lr = cli.number_in(float, 0, 1, open_low=True)
    assert lr("0.5") == 0.5 and lr("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"-1 is outside the allowed range \(0, 1\]"):
        lr("-1")
    with pytest.raises(argparse.ArgumentTypeError, match=r"outside the allowed range \(0, 1\]"):
        lr("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'2.5' is not an integer; give one in \[1, 4\]"):
        cli.number_in(int, 1, 4)("2.5")


def test_train_refuses_out_of_range_settings_in_one_line(one_line_error):
    for flag, value in [("--lr", "-1"), ("--ema-decay", "nan"), ("--cfg-scale", "-2"), ("--cond-dropout", "1")]:
        line = one_line_error(train.main, ["--tiles", "x", flag, value])
        assert f"argument {flag}" in line and "allowed range" in line, line


def test_output_inside_an_input_folder_is_refused(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "feats.npy").write_text("")
    for out in (tmp_path / "val", tmp_path / "val" / "gen"):
        with pytest.raises(ValueError, match="inside the input folder"):
            outputs.check_output_folder(str(out), {"--cond": [str(tmp_path / "val")]})
    # a folder holding an input file
    with pytest.raises(ValueError, match="holds the input file .*feats.npy \\(--features\\)"):
        outputs.check_output_folder(str(tmp_path), {"--features": [str(tmp_path / "feats.npy")]})
    # a single input file does not make its whole folder an input: the card's `--cond tile.png --out samples/tile`
    outputs.check_output_folder(str(tmp_path / "gen"), {"--features": [str(tmp_path / "feats.npy")]})
    outputs.check_output_folder(str(tmp_path.parent / "elsewhere"), {"--cond": [str(tmp_path / "val")]})
    outputs.check_output_folder(str(tmp_path / "val2"), {"--cond": [str(tmp_path / "val")]})  # a sibling, not inside


def test_a_worker_error_is_its_last_line():
    folded = ValueError("Caught TileError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1\ndata.TileError: tiles/a.png could not be decoded")
    assert cli.error_line(folded) == "tiles/a.png could not be decoded"
    assert cli.error_line(ValueError("one  line\n")) == "one line"


def test_train_refuses_a_results_folder_among_its_tiles(tmp_path):
    """Sample grids written inside a tile folder would be read back as training tiles."""
    (tmp_path / "tiles").mkdir()
    with pytest.raises(ValueError, match=r"--out .*inside the input folder .*tiles \(--tiles\)"):
        train.main(["--tiles", str(tmp_path / "tiles"), "--out", str(tmp_path / "tiles" / "run"), "--encoder", "tiny"])
    assert not (tmp_path / "tiles" / "run").exists()  # refused before anything is written


HOLDER = """
import sys, time
from support.outputs import claim_output_folder
claim_output_folder(sys.argv[1])
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_runs_lock_never_blocks(tmp_path):
    """One run per output folder: another process that holds OUT makes a claim fail in one line, naming
    it; once that process is killed (no chance to clean up), its .lock blocks nothing."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(cli.OutputConflict, match=rf"--out {out} is in use by another run \(pid {holder.pid} "):
            outputs.claim_output_folder(str(out))
        assert not outputs.claimed(str(out))
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").exists()  # left behind by the killed run: stale
    outputs.claim_output_folder(str(out))
    assert outputs.claimed(str(out)) and f"pid {os.getpid()} " in (out / ".lock").read_text()
    outputs.claim_output_folder(str(out))  # a process may claim what it holds (tests, demo.py, evaluate.py)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, unwritable even for root")
def test_an_unwritable_results_folder_is_found_before_anything_runs(tmp_path, one_line_error):
    """Found at the start, before the data is even read, not at the first checkpoint after the steps are spent."""
    line = one_line_error(train.main, ["--tiles", str(tmp_path / "no-tiles"), "--out", "/proc/self",
                                       "--encoder", "tiny"])
    assert "cannot create the output folder --out /proc/self, or write in it" in line
    assert "cannot create the output folder --out /proc/self/x" in one_line_error(
        tiling.main, ["--slides", str(Path(__file__).parent / "data"), "--out", "/proc/self/x"])


def test_intra_op_threads_fit_the_cpus(monkeypatch, tmp_path):
    """Data workers (one thread each) and torchrun's local ranks share the CPUs with the intra-op threads."""
    mine = cli.available_cpus()
    assert 1 <= mine <= (os.cpu_count() or 1)
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a container's quota: 1.5 CPUs -> 1
    assert cli.available_cpus(str(tmp_path / "cpu.max")) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cli.available_cpus(str(tmp_path / "cpu.max")) == mine
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "available_cpus", lambda: 8)
    try:
        for threads, workers, local_world, expected in [(8, 0, 1, 8), (8, 4, 1, 4), (8, 4, 2, 1), (8, 2, 2, 2),
                                                        (3, 0, 1, 3), (8, 16, 1, 1)]:
            torch.set_num_threads(threads)
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
            assert cli.cap_threads(workers) == expected == torch.get_num_threads(), (threads, workers, local_world)
        torch.set_num_threads(8)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        with cli.processes("cpu", num_workers=3) as (rank, world, device):  # every tool's processes are capped
            assert (rank, world, torch.get_num_threads()) == (0, 1, 5)
        monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's choice wins
        torch.set_num_threads(6)
        assert cli.cap_threads(4) == 6 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    workers = []  # train.py's --num-workers reaches the cap
    monkeypatch.setattr(cli, "cap_threads", workers.append)
    with pytest.raises(cli.MissingInput):
        train.main(["--tiles", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--num-workers", "3",
                    "--device", "cpu"])
    assert workers == [3]
