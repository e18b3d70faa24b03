"""support/data.py: the one tile decoder, tile folders, manifests and tar shards, resumable sampling."""
import csv
import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import data, manifests

REPO = Path(__file__).resolve().parents[1]
TILES = REPO / "tests" / "data" / "tiles"


def write_png(path, colour, size=32):
    Image.new("RGB", (size, size), colour).save(path)


def test_real_tiles_decode_at_training_size():
    kind, files = manifests.find_tiles(str(TILES))
    assert kind == "files" and len(files) >= 4
    tile = data.decode_tile(files[0], files[0], 224)
    assert tile.shape == (3, 224, 224) and tile.dtype == torch.uint8
    assert tile.float().std() > 10  # real tissue, not a blank image


def test_wrong_size_is_an_error_unless_resize_is_asked_for():
    path = sorted(TILES.glob("*.png"))[0]
    with pytest.raises(ValueError, match=r"224x224 px but --image-size is 32.*--resize"):
        data.decode_tile(path, str(path), 32)
    full = np.array(Image.open(path).convert("RGB"))
    crop = data.decode_tile(path, str(path), 200, resize="crop")
    assert np.array_equal(crop.permute(1, 2, 0).numpy(), full[12:212, 12:212])  # the centre, untouched
    assert data.decode_tile(path, str(path), 32, resize="scale").shape == (3, 32, 32)
    with pytest.raises(ValueError, match="smaller"):
        data.decode_tile(path, str(path), 256, resize="crop")


def test_greyscale_tile_is_rejected(tmp_path):
    Image.new("L", (32, 32), 128).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="grey-scale"):
        data.decode_tile(tmp_path / "grey.png", "grey.png", 32)


def test_manifest_keeps_train_rows_only(tmp_path):
    (tmp_path / "tiles").mkdir()
    rows = [("a", "train"), ("b", "val_in"), ("c", "val_out"), ("d", "train")]
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["slide_id", "file", "split"])
        writer.writeheader()
        writer.writerows({"slide_id": "s", "file": f"tiles/{n}.png", "split": s} for n, s in rows)
    for name, _ in rows:
        (tmp_path / "tiles" / f"{name}.png").write_bytes(b"")
    kind, files = manifests.find_tiles(str(tmp_path / "manifest.csv"))
    assert kind == "files" and files == [str(tmp_path / "tiles" / "a.png"), str(tmp_path / "tiles" / "d.png")]


def test_a_manifest_with_a_tile_twice_is_refused_before_anything_is_written(tmp_path, capsys, one_line_error):
    """The same file twice (in train and in val_in: which split?), or the same pixels of a slide under two
    names, is refused in one line naming both rows; identical rows are read once, with a note."""
    import features
    head = "slide_id,slide_file,x,y,level,scale,size,file,split\n"
    a, b = "s,s.svs,0,0,0,1.0,224,tiles/s/s_0_0.png,", "s,s.svs,224,0,0,1.0,224,tiles/s/s_224_0.png,"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(head + a + "train\n" + b + "train\n" + a + "val_in\n")
    with pytest.raises(data.InputError, match=r"lines 2 and 4 are the same tile \(file tiles/s/s_0_0.png\)"):
        manifests.read_manifest_rows(manifest, split=None)
    with pytest.raises(data.InputError, match="lines 2 and 4"):  # the train rows alone would not show it
        manifests.read_manifest_rows(manifest, split="train")
    manifest.write_text(head + a + "train\n" + "s,s.svs,0,0,0,1.0,224,tiles/s/copy.png,train\n")
    with pytest.raises(data.InputError, match=r"lines 2 and 3 are the same tile \(s.svs at x=0, y=0\)"):
        manifests.read_manifest_rows(manifest)
    manifest.write_text(head + a + "train\n" + "s,s.svs,0,0,0,2.0,224,tiles/s/coarser.png,train\n")
    assert len(manifests.read_manifest_rows(manifest)[1]) == 2  # the same corner at another scale: another tile
    manifest.write_text(head + a + "train\n" + b + "train\n" + a + "train\n")
    capsys.readouterr()
    rows = manifests.read_manifest_rows(manifest)[1]
    assert [r["file"] for r in rows] == ["tiles/s/s_0_0.png", "tiles/s/s_224_0.png"]
    assert "1 repeated rows, identical to others, read once" in capsys.readouterr().out
    manifest.write_text("file,split\nt/a.png,train\nt/a.png,val_out\n")  # no slide columns: files alone
    argv = ["--tiles", str(manifest), "--out", str(tmp_path / "tokens"), "--encoder", "tiny", "--random-weights",
            "--device", "cpu", "--num-workers", "0"]
    assert "lines 2 and 3 are the same tile (file t/a.png)" in one_line_error(features.main, argv)
    assert not (tmp_path / "tokens").exists()


def test_tar_shards_split_between_ranks_without_overlap(tmp_path):
    colours = {}
    for s in range(4):
        with tarfile.open(tmp_path / f"shard{s}.tar", "w") as tar:
            for j in range(3):
                k = 3 * s + j
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (k * 10, 0, 0)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"tiles/tile{k}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
                colours[k * 10] = k
    kind, shards = manifests.find_tiles(str(tmp_path))
    assert kind == "shards" and len(shards) == 4
    seen = []
    for rank in range(2):
        stream = data.TileShards(shards, 32, rank=rank, world=2, seed=0, shuffle_buffer=1)
        first_pass = [int(img[0, 0, 0]) for img, _ in itertools.islice(iter(stream), 6)]
        seen.append(set(first_pass))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(colours)
    # 2 ranks x 2 data workers = 4 readers, one shard each: each reader's first pass is its whole shard
    readers = []
    for rank in range(2):
        stream = data.TileShards(shards, 32, rank=rank, world=2, seed=0, shuffle_buffer=1)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        items = [int(img[0, 0, 0]) for img, _ in itertools.islice(iter(loader), 6)]  # workers alternate
        readers += [set(items[0::2]), set(items[1::2])]
    assert all(len(r) == 3 for r in readers) and set().union(*readers) == set(colours)
    with pytest.raises(ValueError, match="shards for 8 readers"):
        next(iter(data.TileShards(shards, 32, rank=0, world=8)))


def test_precomputed_features(tmp_path):
    write_png(tmp_path / "t0.png", (200, 100, 150))
    np.save(tmp_path / "t0.npy", np.arange(5 * 6, dtype=np.float16).reshape(5, 6))
    img, feats = data.TileFolder([str(tmp_path / "t0.png")], 32, features=str(tmp_path), tokens=4)[0]
    assert feats.dtype == torch.float32 and feats.shape == (5, 6) and feats[1, 0] == 6
    assert data.feature_dim(str(tmp_path)) == 6
    with pytest.raises(ValueError, match="expected"):
        data.TileFolder([str(tmp_path / "t0.png")], 32, features=str(tmp_path), tokens=16)[0]
    with pytest.raises(FileNotFoundError, match="no precomputed features"):
        data.load_features(str(tmp_path), "missing", 4)
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "t0.png", (0, 0, 0))
    with pytest.raises(ValueError, match="unique tile names"):  # one t0.npy cannot serve two tiles
        data.TileFolder([str(tmp_path / "t0.png"), str(tmp_path / "sub" / "t0.png")], 32, features=str(tmp_path))


def test_a_tiling_output_means_its_train_rows_and_its_tiles_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "tiles" / "s1").mkdir(parents=True)
    write_png(out / "tiles" / "s1" / "a.png", (200, 100, 150))
    write_png(out / "tiles" / "s1" / "b.png", (200, 100, 150))
    (out / "tiling.json").write_text("{}")
    (out / "manifest.csv").write_text("file,split\ntiles/s1/a.png,train\ntiles/s1/b.png,val_out\n")
    assert manifests.find_tiles(str(out)) == ("files", [str(out / "tiles" / "s1" / "a.png")])  # not the val_out tile
    with pytest.raises(ValueError, match=rf"tiles folder of tiling.py's output {out}.*pass {out}"):
        manifests.find_tiles(str(out / "tiles"))  # would also train on the held-out tiles
    (tmp_path / "empty.csv").write_text("file,split\n")
    with pytest.raises(ValueError, match="empty manifest"):
        manifests.find_tiles(str(tmp_path / "empty.csv"))


def test_corrupt_tile_is_named(tmp_path):
    write_png(tmp_path / "good.png", (200, 100, 150))
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match=r"cut.png could not be decoded"):
        data.decode_tile(tmp_path / "cut.png", str(tmp_path / "cut.png"), 32)


def test_resumable_sampler_continues_the_same_permutation():
    items = list(range(20))
    sampler = data.ResumableSampler(items, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=6)
    assert list(sampler) == full[6:] and len(sampler) == len(full) - 6
    other = data.ResumableSampler(items, num_replicas=2, rank=0, shuffle=True, seed=3, drop_last=True)
    other.set_epoch(4)
    assert set(other).isdisjoint(full) and len(set(other) | set(full)) == 20  # the ranks split the data


def test_the_one_decoder_has_one_rule_per_kind_of_image(tmp_path):
    """Every tool decodes tiles with data.open_tile; each kind of image gets its one rule."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    rgb.save(tmp_path / "rgb.png")
    reference = np.array(rgb)
    rgb.convert("RGBA").save(tmp_path / "opaque.png")  # alpha 255 everywhere: the same tile
    assert np.array_equal(np.array(data.open_tile(tmp_path / "opaque.png")), reference)
    rgba = rgb.convert("RGBA")
    rgba.putpixel((3, 3), (0, 0, 0, 10))
    rgba.save(tmp_path / "transparent.png")
    with pytest.raises(data.TileError, match="transparent pixels"):
        data.open_tile(tmp_path / "transparent.png")
    palette = rgb.convert("P")
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(np.array(data.open_tile(tmp_path / "palette.png")), np.array(palette.convert("RGB")))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert data.open_tile(tmp_path / "cmyk.jpg").mode == "RGB"
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(tmp_path / "grey16.png")  # 16-bit grey
    for name in ("grey16.png",):
        with pytest.raises(data.TileError, match="grey-scale"):
            data.open_tile(tmp_path / name)
    (tmp_path / "cut.png").write_bytes((tmp_path / "rgb.png").read_bytes()[:200])
    with pytest.raises(data.TileError, match="cut.png could not be decoded.*truncated"):
        data.open_tile(tmp_path / "cut.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(data.TileError, match="notes.png is not an image"):
        data.open_tile(tmp_path / "notes.png")


def test_a_whole_slide_is_refused_as_a_tile(tmp_path):
    (tmp_path / "slide.svs").write_bytes(b"II*\x00")
    with pytest.raises(data.TileError, match="whole-slide file.*tiling.py"):
        data.open_tile(tmp_path / "slide.svs")
    Image.new("RGB", (data.MAX_TILE_PX + 1, 64)).save(tmp_path / "region.png")
    with pytest.raises(data.TileError, match="not a tile.*tiling.py"):
        data.open_tile(tmp_path / "region.png")
    pages = [Image.new("RGB", (64, 64)), Image.new("RGB", (32, 32))]
    pages[0].save(tmp_path / "pyramid.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(data.TileError, match="several pages.*tiling.py"):
        data.open_tile(tmp_path / "pyramid.tif")


def test_one_list_of_image_extensions():
    """support.tiles.IMAGE_EXTENSIONS is the only list; the tools import it rather than keep their own."""
    for path in [*REPO.glob("*.py"), *(REPO / "support").glob("*.py")]:
        text = path.read_text()
        assert path.name == "tiles.py" or not any(f'"{ext}", "' in text for ext in (".png", ".svs")), path.name


def test_training_from_slides_gives_the_pixels_of_the_pngs(tmp_path):
    """--tiles MANIFEST --slides SLIDES_DIR: each tile read from its slide inside the data workers equals the
    PNG tiling.py wrote, through the same DataLoader path train.py uses (2 workers)."""
    import tiling
    out = tmp_path / "tiles"
    assert tiling.main(["--slides", str(REPO / "tests" / "data"), "--out", str(out), "--max-tiles-per-slide", "6"]) == 0
    found = manifests.find_slide_tiles(str(out / "manifest.csv"), str(REPO / "tests" / "data"))
    kind, (rows, slides_dir, resample) = found
    assert kind == "slides" and len(rows) == 6 and resample == "lanczos"
    dataset, batches = data.training_batches(
        manifests.Tiles(kind, (rows, slides_dir, resample)), size=224, resize=None, features=None, tokens=0, rank=0,
        world=1, local_batch=2, seed=0, num_workers=2, shuffle_buffer=1, start_step=0, pin_memory=False)
    png = {r["name"]: np.array(Image.open(out / r["file"]).convert("RGB")) for r in rows}
    seen = 0
    for _ in range(3):  # one epoch: 6 tiles in batches of 2, shuffled
        images, _ = next(batches)
        for image in images:
            match = [n for n, p in png.items() if np.array_equal(image.permute(1, 2, 0).numpy(), p)]
            assert len(match) == 1
            seen += 1
    assert seen == 6 and dataset[0][0].shape == (3, 224, 224)


def test_slides_need_a_manifest_with_slide_columns_and_the_slides(tmp_path):
    with pytest.raises(ValueError, match="--tiles must be tiling.py's output folder or its manifest.csv"):
        manifests.find_slide_tiles(str(TILES), str(tmp_path))
    (tmp_path / "m.csv").write_text("file,split\na.png,train\n")
    with pytest.raises(ValueError, match="no slide_file, x, y, level, scale, size column"):
        manifests.find_slide_tiles(str(tmp_path / "m.csv"), str(tmp_path))
    (tmp_path / "m.csv").write_text("file,split,slide_file,x,y,level,scale,size\na.png,train,gone.svs,0,0,0,1,224\n")
    with pytest.raises(FileNotFoundError, match="lacks 1 slide.*gone.svs"):
        manifests.find_slide_tiles(str(tmp_path / "m.csv"), str(tmp_path))
