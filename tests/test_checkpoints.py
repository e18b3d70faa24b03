"""support/checkpoints.py and support/weights.py: reading checkpoints back, refusing what is not one."""
import numpy as np
import torch
import pytest

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
