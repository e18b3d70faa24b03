"""features.py's precomputed tokens are what train.py would compute on the fly (CytoSyn §3.1); hub models
fail at once offline; a names file must fit its array."""
import json
import os
import re
import tarfile
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import features as F
from support import data, hub
from support.cli import Unavailable

torch.set_num_threads(1)


def write_tiles(folder, n, size=64, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"tile{i}.png")
    return folder


def run(tiles, out, *extra):
    return F.main(["--tiles", str(tiles), "--out", str(out), "--encoder", "tiny", "--random-weights", "--image-size",
                   "64", "--num-workers", "0", "--batch-size", "3", "--device", "cpu", *extra])


def test_precomputed_tokens_equal_the_on_the_fly_ones(tmp_path):
    tiles, out = write_tiles(tmp_path / "tiles", 5), tmp_path / "feats"
    assert run(tiles, out) == 0
    paths = sorted(str(p) for p in tiles.iterdir())
    grid = 4  # the SiT-XL/2's token grid on a 64 px tile through f8d4: 8 x 8 latents, patch 2
    dataset = data.TileFolder(paths, 64, features=str(out), tokens=grid * grid)  # train.py's reader
    encoder = F.load_encoder("tiny", pretrained=False, seed=0)
    for i in range(len(paths)):
        image, stored = dataset[i]
        cls, patches = F.encoder_features(encoder, image[None], grid)
        on_the_fly = torch.cat([cls[:, None], patches], 1)[0]  # (1 + T, D)
        assert stored.shape == (1 + grid * grid, 48) and np.load(out / f"tile{i}.npy").dtype == np.float16
        assert torch.allclose(stored, on_the_fly, rtol=1e-3, atol=1e-3)  # fp16 on disk
    cls_array = np.load(out / F.CLS_FILE)
    names = (out / F.NAMES_FILE).read_text().split()
    assert names == [f"tile{i}" for i in range(5)] and cls_array.shape == (5, 48)
    assert np.array_equal(cls_array[2], np.load(out / "tile2.npy")[0].astype(np.float32))


def test_resume_skips_finished_tiles_and_shards_give_the_same_tokens(tmp_path):
    tiles, out = write_tiles(tmp_path / "tiles", 4), tmp_path / "feats"
    run(tiles, out)
    os.remove(out / "tile3.npy")
    before = os.stat(out / "tile0.npy").st_mtime_ns
    run(tiles, out)
    assert os.stat(out / "tile0.npy").st_mtime_ns == before and (out / "tile3.npy").exists()
    shard = tmp_path / "shard.tar"  # the same tiles as a tar shard: the same tokens
    with tarfile.open(shard, "w") as tar:
        for p in sorted(tiles.iterdir()):
            tar.add(p, arcname=p.name)
    run(shard, tmp_path / "from_tar")
    for i in range(4):
        assert np.array_equal(np.load(out / f"tile{i}.npy"), np.load(tmp_path / "from_tar" / f"tile{i}.npy"))


def test_lazyslide_trident_features_give_their_cls_half(tmp_path, capsys, one_line_error):
    pooled = np.random.default_rng(0).standard_normal((6, 1536)).astype(np.float32)
    np.save(tmp_path / "lazyslide.npy", pooled)
    assert F.main(["--pooled", str(tmp_path / "lazyslide.npy"), "--out", str(tmp_path / "out")]) == 0
    assert np.array_equal(np.load(tmp_path / "out" / F.CLS_FILE), pooled[:, :768])
    assert "took the first 768 of 1536 dims" in capsys.readouterr().out
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f["features"], f["coords"] = pooled, np.arange(12).reshape(6, 2)
    F.main(["--pooled", str(tmp_path / "trident.h5"), "--out", str(tmp_path / "out2")])
    assert (tmp_path / "out2" / F.NAMES_FILE).read_text().split()[1] == "2_3"
    np.save(tmp_path / "bad.npy", pooled[:, :100])
    assert re.search(r"error: .*bad.npy has shape \(6, 100\)",
                     one_line_error(F.main, ["--pooled", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "out3")]))


def test_ranks_split_the_tiles_and_rank_0_writes_the_cls_array(tmp_path, monkeypatch):
    """torchrun's rank r takes tiles r, r + world, ...; only rank 0 assembles cls.npy, after the barrier."""
    tiles, out = write_tiles(tmp_path / "tiles", 5), tmp_path / "feats"
    for name in ("init_process_group", "barrier", "destroy_process_group"):
        monkeypatch.setattr(F.dist, name, lambda *a, **k: None)
    monkeypatch.setattr(F.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(F.dist, "get_rank", lambda: int(os.environ["RANK"]))  # what torchrun's group would say
    monkeypatch.setattr(F.dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))  # (F.dist is torch's)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run(tiles, out)
    assert sorted(p.name for p in out.iterdir()) == ["tile1.npy", "tile3.npy"]
    monkeypatch.setenv("RANK", "0")
    run(tiles, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"tile{i}.npy" for i in range(5)]
                                                           + [F.CLS_FILE, F.NAMES_FILE])
    assert np.load(out / F.CLS_FILE).shape == (5, 48)


def test_a_failed_download_says_network_or_access():
    """Offline and no-licence are different problems with different fixes: the message tells them apart."""
    offline = hub.hub_failure(OSError("Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure)"))
    gated = hub.hub_failure(OSError("401 Client Error. GatedRepoError: access to model is restricted"))
    assert offline.startswith("network unreachable") and gated.startswith("no access")
    assert "network" not in gated and "access" not in offline


def test_tokens_from_the_slides_equal_tokens_from_the_pngs(tmp_path):
    """--slides: a cohort precomputes its tokens without a PNG copy, and they are the PNGs' tokens."""
    import tiling
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert tiling.main(["--slides", os.path.join(repo, "tests", "data"), "--out", str(tmp_path / "tiles"),
                        "--max-tiles-per-slide", "4"]) == 0
    manifest = tmp_path / "tiles" / "manifest.csv"
    common = ["--tiles", str(manifest), "--encoder", "tiny", "--random-weights", "--image-size", "224",
              "--num-workers", "0", "--batch-size", "3", "--device", "cpu"]
    assert F.main([*common, "--out", str(tmp_path / "png")]) == 0
    assert F.main([*common, "--out", str(tmp_path / "slides"), "--slides", os.path.join(repo, "tests", "data")]) == 0
    names = (tmp_path / "png" / F.NAMES_FILE).read_text().split()
    assert len(names) == 4 and (tmp_path / "slides" / F.NAMES_FILE).read_text().split() == names
    for name in names:
        assert np.array_equal(np.load(tmp_path / "png" / f"{name}.npy"), np.load(tmp_path / "slides" / f"{name}.npy"))


# ---------------------------------------------------------------------------------- offline: one attempt, one line
def test_an_uncached_hub_model_fails_at_once_in_one_line(tmp_path, monkeypatch, caplog, capsys):
    """No network, nothing in the cache: one attempt, one line per model that says how to fetch it -- not
    huggingface_hub's five retries with backoff (about 23 s and a dozen lines per model)."""
    from support.tile_features import score_extractors
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    rows, skipped = score_extractors(["absent-a", "absent-b"], lambda name: [hub.create_timm_model(
        name, f"hf-hub:cytosyn-test/{name}", "vit_small_patch16_224", {}, True, 0, "public weights")])
    assert time.perf_counter() - start < 5, "a hub model that cannot load must fail at once"
    assert rows == [] and [s["extractor"] for s in skipped] == ["absent-a", "absent-b"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("skipped: absent-") for line in lines), lines
    assert "`hf download cytosyn-test/absent-a`" in lines[0] and "HF_HOME" in lines[0]
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def tiny_hub_cache(cache, repo, kwargs):
    """A local Hugging Face cache holding one timm model (config.json + model.safetensors), as `hf download`
    leaves it -> the model's state dict."""
    from safetensors.torch import save_file
    model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, **kwargs)
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(
        {"architecture": "vit_base_patch14_reg4_dinov2", "num_classes": 0, "model_args": kwargs, "pretrained_cfg": {}}))
    save_file(model.state_dict(), folder / "snapshots" / ("0" * 40) / "model.safetensors")
    return model.state_dict()


@pytest.mark.parametrize("how", ["hub unreachable", "HF_HUB_OFFLINE=1"])
def test_a_cached_hub_model_loads_offline_at_once(tmp_path, monkeypatch, how):
    kwargs = dict(img_size=224, num_classes=0, embed_dim=48, depth=2, num_heads=3)
    saved = tiny_hub_cache(tmp_path, "cytosyn-test/tiny", kwargs)
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path))
    if how == "hub unreachable":
        monkeypatch.setattr(hub, "reachable", lambda url: False)
    else:  # honoured as set, without asking the network
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hub, "reachable", lambda url: pytest.fail("HF_HUB_OFFLINE=1 must not reach the network"))
    start = time.perf_counter()
    model = hub.create_timm_model("tiny-hub", "hf-hub:cytosyn-test/tiny", None, kwargs, True, 0, "public weights")
    assert time.perf_counter() - start < 5
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert hub.hf_constants.HF_HUB_OFFLINE is False  # offline for that load only
    with pytest.raises(Unavailable, match="offline .* not in the cache"):  # what the cache lacks still fails at once
        hub.create_timm_model("absent", "hf-hub:cytosyn-test/absent", None, kwargs, True, 0, "public weights")


def test_fid_inception_offline_says_where_to_put_its_weights(tmp_path, monkeypatch):
    import extractors
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(extractors, "reachable", lambda url: False)
    start = time.perf_counter()
    with pytest.raises(Unavailable, match=f"not in {tmp_path}/checkpoints and https://github.com/.* does not answer"):
        extractors.build_extractor("fid-inception")
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------------------------- names beside an array
def test_a_names_file_of_another_length_is_refused_before_anything_is_written(ckpt, tmp_path, one_line_error):
    import sample
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / F.CLS_FILE, np.random.default_rng(0).standard_normal((3, 48)).astype(np.float32))
    (folder / F.NAMES_FILE).write_text("a\nb\n")  # 2 names, 3 rows: which is which?
    argv = ["--ckpt", ckpt, "--features", str(folder / F.CLS_FILE), "--n", "1", "--num-sampling-steps", "2",
            "--device", "cpu", "--out", str(tmp_path / "out")]
    assert "cls_names.txt names 2 tiles but" in one_line_error(sample.main, argv)
    assert not (tmp_path / "out").exists()
    (folder / F.NAMES_FILE).write_text("a\nb\nc\n")
    assert F.read_cls_names(str(folder / F.CLS_FILE), 3) == ["a", "b", "c"]
    assert F.read_cls_names(str(folder / "other.npy"), 3) is None  # the names belong to cls.npy alone
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f["features"], f["coords"] = np.zeros((6, 1536), np.float32), np.arange(10).reshape(5, 2)
    line = one_line_error(F.main, ["--pooled", str(tmp_path / "trident.h5"), "--out", str(tmp_path / "out2")])
    assert "holds 6 features but 5 coords" in line and not (tmp_path / "out2").exists()
