"""support/checkpoints.py and support/weights.py: reading checkpoints back, refusing what is not one, and the
sha256 written with each."""
import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from support import checkpoints, weights


def test_resume_from_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"model": {}, "ema": {}}, tmp_path / "repae.pt")  # another layout
    with pytest.raises(ValueError, match="junk.pt is not a readable PyTorch checkpoint"):
        checkpoints.read_for_resume(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match=r"repae.pt is not a train.py checkpoint \(no config, step"):
        checkpoints.read_for_resume(str(tmp_path / "repae.pt"))


def test_latest_checkpoint_readability_is_checked_without_loading(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"w": torch.zeros(1000)}, folder / "0000001.pt")
    torch.save({"w": torch.zeros(1000)}, folder / "0000002.pt")
    data = (folder / "0000002.pt").read_bytes()
    (folder / "0000003.pt").write_bytes(data[:len(data) // 2])  # truncated: its zip directory is gone
    assert checkpoints.readable(str(folder / "0000002.pt")) and not checkpoints.readable(str(folder / "0000003.pt"))
    latest = checkpoints.latest_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match=r"0000003.pt is unreadable .*newest readable one is .*0000002.pt"):
        checkpoints.resume_path(str(tmp_path), "latest", latest)
    assert checkpoints.resume_path(str(tmp_path), str(folder / "0000001.pt"), latest).endswith("0000001.pt")


def test_a_file_with_numpy_arrays_is_refused_as_unsafe(tmp_path):
    torch.save({"rng": np.random.get_state()}, tmp_path / "old.pt")
    with pytest.raises(weights.UnsafeCheckpoint, match=r"could run code.*support.weights convert .*old.pt SAFE.pt"):
        weights.load_file(str(tmp_path / "old.pt"))


def test_a_checkpoint_is_written_with_its_sha256_and_an_older_one_loads_with_a_note(tmp_path, capsys):
    nets = SimpleNamespace(**{name: torch.nn.Linear(3, 2) for name in ("sit", "sit_ema", "vae", "vae_ema")}, disc=None)
    opts = {net: torch.optim.SGD(getattr(nets, net).parameters(), lr=0.1) for net in ("sit", "vae")}
    path = checkpoints.checkpoint_path(str(tmp_path), 7)
    checkpoints.save_checkpoint(path, nets, opts, 7, {"model": "SiT-T/2"}, [checkpoints.rng_state(torch.device("cpu"))])
    # sha256sum's format: `sha256sum -c 0000007.pt.sha256` in the folder checks it too
    assert Path(path + ".sha256").read_text() == f"{hashlib.sha256(Path(path).read_bytes()).hexdigest()}  0000007.pt\n"
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["0000007.pt", "0000007.pt.sha256"]  # no .tmp left
    capsys.readouterr()
    assert checkpoints.read_for_resume(path)["step"] == 7 and "note" not in capsys.readouterr().out
    Path(path + ".sha256").unlink()  # as a checkpoint written before checksums
    assert checkpoints.read_for_resume(path)["step"] == 7 and checkpoints.read_for_resume(path)["step"] == 7
    notes = capsys.readouterr().out.strip().splitlines()
    assert notes == [f"note: {path} has no 0000007.pt.sha256 beside it (written before checksums, or not by train.py): "
                     f"its bytes are not verified"]  # said once
