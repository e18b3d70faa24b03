"""The extractors' networks: what each registered one returns, and pytorch-fid's Inception rebuilt offline.

Every registered extractor is built with random weights and must return its documented width; the ViT-g/H/L
ones are built on the `meta` device, where the forward pass computes shapes only. The paper's Inception is
compared with pytorch-fid's own construction, given the same weights, and with its FID weights read from the
torch hub cache; an extractor receives the decoded tile in [0, 1] and nothing else.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import extractors as F
from support import tile_features as T

torch.set_num_threads(1)

BIG = {"h-optimus-0", "uni2-h", "virchow2", "uni"}  # ViT-g / ViT-H / ViT-L: shapes on `meta`


@pytest.mark.parametrize("name", list(F.EXTRACTORS))
def test_extractor_returns_documented_dim(name):
    spec = F.EXTRACTORS[name]
    if spec.backend == "none":
        with pytest.raises(F.Unavailable, match=name):
            F.build_extractor(name, pretrained=False)
        return
    device = "meta" if name in BIG else "cpu"
    extractor = F.build_extractor(name, pretrained=False, device=device)
    x = torch.rand(2, 3, spec.input_size, spec.input_size, device=device)
    assert extractor.embed(x).shape == (2, spec.dim)


def test_virchow_pooling_is_cls_and_patch_mean_without_registers():
    cls, registers, patches = torch.tensor([[1.0, 1.0]]), torch.full((4, 2), 1e3), torch.tensor(
        [[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]])
    tokens = torch.cat([cls, registers, patches])[None]  # (1, 8, 2)
    assert F.pool_tokens(tokens, "cls+patch_mean", 5).tolist() == [[1.0, 1.0, 2.0, 2.0]]


def test_unknown_extractor_and_missing_weights_give_one_clear_line():
    with pytest.raises(ValueError, match="choose from"):
        F.build_extractor("resnet")
    with pytest.raises(F.Unavailable, match="--random-weights"):
        F.build_extractor("tiny", pretrained=True)
    with pytest.raises(F.Unavailable, match="phikon-v2: not available in this build: needs `transformers`"):
        F.build_extractor("phikon-v2")


def test_fid_inception_is_pytorch_fids_network_built_without_weights():
    """The paper's Inception: pytorch-fid's FID blocks and 1008-class graph, 2048-d pool3, built offline."""
    pytest.importorskip("pytorch_fid")
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionE_2, InceptionV3
    extractor = F.build_extractor("fid-inception", pretrained=False, seed=0)
    model = extractor.model
    assert isinstance(model, InceptionV3) and model.resize_input and model.normalize_input
    from unittest import mock  # pytest-fid's own build (its weight download skipped): the same tensors
    with mock.patch("pytorch_fid.inception.load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch("torchvision.models.Inception3.load_state_dict", lambda *a, **k: None):
        reference = InceptionV3([3], resize_input=True, normalize_input=True)
    assert ({k: v.shape for k, v in model.state_dict().items()}
            == {k: v.shape for k, v in reference.state_dict().items()})
    assert isinstance(model.blocks[2][0], FIDInceptionA) and isinstance(model.blocks[3][2], FIDInceptionE_2)
    x = torch.rand(2, 3, 224, 224)  # a tile at its own size: the network resizes to 299 itself
    feats = extractor.embed(x)
    assert feats.shape == (2, 2048) == (2, F.EXTRACTORS["fid-inception"].dim)
    assert torch.equal(feats, F.build_extractor("fid-inception", pretrained=False, seed=0).embed(x))
    # pytorch-fid's network given our weights computes our features: the same blocks in the same places
    # (FID's blocks pool without the padding, so a torchvision block in their place would differ here)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        # (random weights shrink the features to about 1e-8: compared relative to their size, not to 1e-5)
        torch.testing.assert_close(reference.eval()(x)[0].flatten(1), model(x)[0].flatten(1), rtol=1e-4, atol=0)
    assert F.EXTRACTORS["fid-inception"].resize_inside and F.EXTRACTORS["fid-inception"].kernel == "bilinear"


def test_fid_inception_with_the_fid_weights_in_the_hub_cache_is_the_network_built_without(tmp_path, monkeypatch):
    """The users' path: pytorch-fid's FID weights already in TORCH_HOME (here a random file of that name and
    layout, as pytorch-fid's fid_inception_v3 builds it) load offline into the network the random-weight path
    builds: both give the same features from the same weights."""
    pytest.importorskip("pytorch_fid")
    from unittest import mock

    from pytorch_fid import inception
    with mock.patch("pytorch_fid.inception.load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch("torchvision.models.Inception3.load_state_dict", lambda *a, **k: None):
        torch.manual_seed(3)
        weights = inception.fid_inception_v3().state_dict()  # Inception3's keys, fc of 1008 classes
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(weights, tmp_path / "hub" / "checkpoints" / os.path.basename(inception.FID_WEIGHTS_URL))
    monkeypatch.setattr(F, "reachable", lambda url: pytest.fail("the cached file must be enough"))
    pretrained = F.build_extractor("fid-inception", pretrained=True)
    model = pretrained.model
    assert model.resize_input and model.normalize_input and model.output_blocks == [3]
    assert torch.equal(model.blocks[0][0].conv.weight, weights["Conv2d_1a_3x3.conv.weight"])
    built = F.build_extractor("fid-inception", pretrained=False, seed=0)
    built.model.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(pretrained.embed(x), built.embed(x), rtol=1e-4, atol=0)  # features ~1e-8


def test_extractors_receive_the_decoded_tile_in_0_1(tmp_path):
    """What crosses from the tile decoder to an extractor: the PNG's pixels / 255, nothing else."""
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "t.png")
    seen = []

    class Recorder:
        def embed(self, x, bf16=False):
            seen.append(x)
            return torch.zeros(len(x), F.EXTRACTORS["tiny"].dim)

    T.extract_features(tmp_path, F.EXTRACTORS["tiny"], T.Preprocess(), lambda: Recorder(),
                       identity=dict(extractor="tiny", weights="test"))
    expected = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(seen[0], expected)
