"""Fixtures shared by the test modules: a tiny random train.py-format checkpoint, the one-line error check, and a
folder of random tiles.
pytest runs the tests in one process per core (pytest-xdist, pytest.ini): each keeps torch to one thread."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from features import load_encoder
from sit import build_sit
from vae import build_vae

torch.set_num_threads(1)  # one process per core already (pytest -n auto): more threads would only contend


def perturbed(module, seed, std=0.05):
    """A copy with every weight moved by noise: the zero-initialised adaLN / output layers of a fresh
    SiT would make the velocity 0 whatever the noise and the conditioning."""
    module = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A train.py-format checkpoint whose EMA weights and BN statistics differ from the raw ones."""
    torch.manual_seed(0)
    encoder = load_encoder("tiny", pretrained=False)  # seed 0, as train.py builds it
    sit = perturbed(build_sit("SiT-T/2", input_size=28, cond_dim=encoder.embed_dim, z_dim=encoder.embed_dim), 1)
    sit.y_embedder = perturbed(sit.y_embedder, 5, std=0.5)  # so that the conditioning visibly matters
    vae = perturbed(build_vae("tiny"), 2)
    sit_ema, vae_ema = perturbed(sit, 3), perturbed(vae, 4)
    sit_ema.bn.running_mean.fill_(0.5)
    sit_ema.bn.running_var.fill_(4.0)
    config = {"model": "SiT-T/2", "vae": "tiny", "encoder": "tiny", "image_size": 224, "seed": 0, **sit.config}
    path = str(tmp_path_factory.mktemp("ckpt") / "0000100.pt")
    torch.save({"config": config, "step": 100, "sit": sit.state_dict(), "sit_ema": sit_ema.state_dict(),
                "vae": vae.state_dict(), "vae_ema": vae_ema.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def ckpt_64px(tmp_path_factory):
    """The same kind of checkpoint for 64 px tiles (an 8 x 8 latent): for the benchmark, which samples many."""
    torch.manual_seed(0)
    encoder = load_encoder("tiny", pretrained=False)
    sit = perturbed(build_sit("SiT-T/2", input_size=8, cond_dim=encoder.embed_dim, z_dim=encoder.embed_dim), 1)
    vae = perturbed(build_vae("tiny"), 2)
    config = {"model": "SiT-T/2", "vae": "tiny", "encoder": "tiny", "image_size": 64, "seed": 0, **sit.config}
    path = str(tmp_path_factory.mktemp("ckpt_64px") / "0000100.pt")
    torch.save({"config": config, "step": 100, "sit": sit.state_dict(), "sit_ema": sit.state_dict(),
                "vae": vae.state_dict(), "vae_ema": vae.state_dict()}, path)
    return path


@pytest.fixture
def one_line_error(capsys):
    """run(main, argv) as a script's __main__ does -> the one error line it ends with on stderr (exit status 1,
    no traceback; warnings may come before it)."""
    from support.cli import run

    def error_of(main, argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run(main, argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert exit_.value.code == 1 and len(errors) == 1 and "Traceback" not in err, (exit_.value.code, err)
        assert err.strip().splitlines()[-1] == errors[0]  # the last thing the user reads
        return errors[0]
    return error_of


def write_tiles(folder, names, size=256, seed=0):
    """Random-noise RGB tiles NAME.png of size px in folder (made if missing) -> folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder
