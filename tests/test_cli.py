"""support/cli.py and the command lines: every numeric setting is range-checked at the boundary, outputs stay
out of inputs, and a DataLoader worker's error reaches the user as its own last line."""
import argparse

import pytest

import bench
from support import cli, outputs
import sample
import tiling
import train


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


def test_train_refuses_out_of_range_settings_in_one_line(capsys):
    for flag, value in [("--lr", "-1"), ("--ema-decay", "nan"), ("--cfg-scale", "-2"), ("--cond-dropout", "1")]:
        with pytest.raises(SystemExit):
            train.parse_args(["--data", "x", flag, value])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {flag}" in err and "allowed range" in err, err


def test_output_inside_an_input_folder_is_refused(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "feats.npy").write_text("")
    for out in (tmp_path / "val", tmp_path / "val" / "gen"):
        with pytest.raises(ValueError, match="inside the input folder"):
            outputs.check_output_folder(str(out), {"--cond": [str(tmp_path / "val")]})
    with pytest.raises(ValueError, match="holds the input file .*feats.npy \\(--features\\)"):  # a folder holding an input file
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
    with pytest.raises(ValueError, match=r"--out .*inside the input folder .*tiles \(--data\)"):
        train.main(["--data", str(tmp_path / "tiles"), "--out", str(tmp_path / "tiles" / "run"), "--encoder", "tiny"])
    assert not (tmp_path / "tiles" / "run").exists()  # refused before anything is written
