"""checkpoints.py: reading checkpoints back, refusing what is not one."""
import torch
import pytest

import checkpoints


def test_resume_from_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"model": {}, "ema": {}}, tmp_path / "repae.pt")  # another layout
    with pytest.raises(ValueError, match="junk.pt is not a readable PyTorch checkpoint"):
        checkpoints.read_for_resume(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match=r"repae.pt is not a train.py checkpoint \(no config, step"):
        checkpoints.read_for_resume(str(tmp_path / "repae.pt"))
