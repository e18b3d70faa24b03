"""Every generated image has its own noise stream, so that a split or resumed run writes the same images:
across tiles, samples per tile, ranks and resumed runs, in every mode of sample.py and in evaluate.py's runs.

Two samples that share a stream are correlated, which biases FD and the paired cosine. The job list
(sample.plan_jobs) gives each image a noise id and noise_seed(seed, id) its stream; the one planned
exception is --interpolate, where the factors of one row share the row's noise so that only the mix of
features changes along it (paper Fig. 3).
"""
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample

torch.set_num_threads(1)


class Names:
    """A conditioning source: only its names matter to the job list."""

    def __init__(self, n):
        self.names = [f"tile{i}" for i in range(n)]


def seeds(jobs, seed=0):
    return [sample.noise_seed(seed, job.noise_id) for job in jobs]


@pytest.mark.parametrize("mode, source, n, num_samples", [
    ("--cond, 5 tiles x 3 samples", Names(5), 3, None),
    ("--features, 7 rows x 1 sample", Names(7), 1, None),
    ("--features, 1 row x 6 samples", Names(1), 6, None),
    ("unconditional, 9 images", None, 5, 9),
])
def test_no_two_images_of_a_run_share_a_noise_stream(mode, source, n, num_samples):
    jobs, _ = sample.plan_jobs(source, n, num_samples)
    assert len(jobs) == (len(source.names) * n if source else num_samples)
    assert len({job.name for job in jobs}) == len(jobs)
    assert len(set(seeds(jobs))) == len(jobs), mode
    for world in (1, 2, 3, 4):  # each rank takes jobs[rank::world]: every image exactly once, with its own seed
        shares = [jobs[rank::world] for rank in range(world)]
        assert sorted(j.name for s in shares for j in s) == sorted(j.name for j in jobs)


def test_interpolation_rows_have_their_own_noise_and_only_a_rows_factors_share_it():
    jobs, _ = sample.plan_jobs(Names(2), 4, interpolate=True)
    by_seed = {}
    for job in jobs:
        by_seed.setdefault(sample.noise_seed(0, job.noise_id), []).append(job.name)
    assert len(by_seed) == 4  # one stream per row
    for names in by_seed.values():  # a row: the four factors of one k
        assert len(names) == 4 and len({name.rsplit("_a", 1)[0] for name in names}) == 1


def test_a_job_keeps_its_seed_whatever_else_the_run_holds():
    """Adding tiles to a run changes no seed of an image already planned."""
    jobs, _ = sample.plan_jobs(Names(3), 2)
    more, _ = sample.plan_jobs(Names(5), 2)
    assert {j.name: j.noise_id for j in jobs}.items() <= {j.name: j.noise_id for j in more}.items()


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_a_resumed_run_samples_the_remaining_images_with_their_own_ids(ckpt, tmp_path, monkeypatch, batch_size):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (224, 224)).save(out / "000001.png")  # finished before the run was killed
    generated = []

    def record(pipe, cond, noise_ids, settings, *restain):
        generated.extend(noise_ids)
        return np.zeros((len(noise_ids), 224, 224, 3), np.uint8)
    monkeypatch.setattr(sample.Pipeline, "generate", record)
    sample.main(["--ckpt", ckpt, "--num-samples", "5", "--batch-size", batch_size, "--device", "cpu", "--out",
                 str(out)])
    assert generated == [0, 2, 3, 4]  # the ids of 000000, 000002 ... whatever was skipped or batched


def test_noise_seeds_are_distinct_over_seeds_and_ids():
    table = [[sample.noise_seed(s, i) for i in range(300)] for s in range(40)]
    flat = [v for row in table for v in row]
    assert len(set(flat)) == len(flat)  # no overlap between (s, i + 1) and (s + 1, i), nor anywhere else
    assert all(0 <= v < 2 ** 63 for v in flat)


def test_evaluate_runs_give_every_guidance_tile_its_own_stream(tmp_path, monkeypatch):
    """evaluate.py samples one tile per guidance feature through sample.py --features --n 1."""
    seen = []
    monkeypatch.setattr(sample, "main", lambda argv: seen.append(sample.parse_args(argv)))
    args = evaluate.parse_args(["--ckpt", "c.pt", "--tiles", "t", "--out", str(tmp_path), "--seed", "3"])
    evaluate.generate_tiles(args, tmp_path / "cls.npy", tmp_path / "generated", "sde", 250)
    run = seen[0]
    jobs, _ = sample.plan_jobs(Names(100), run.n, run.num_samples)
    assert run.n == 1 and run.seed == 3 and len(set(seeds(jobs, run.seed))) == 100


def pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_two_tiles_with_identical_features_give_different_samples(ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "same.npy", np.ones((2, 48), np.float32))  # two tiles, one feature vector
    sample.main(["--ckpt", ckpt, "--features", str(tmp_path / "in" / "same.npy"), "--n", "2", "--num-sampling-steps",
                 "2", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "out")])
    images = pngs(tmp_path / "out")  # tile0 x 2 samples, tile1 x 2 samples, in two batches
    assert len(images) == 4
    for i in range(4):
        for j in range(i):
            assert np.abs(images[i].astype(int) - images[j]).mean() > 1, (i, j)


def test_the_api_gives_identical_embeds_different_samples(ckpt):
    pipe = sample.load_pipeline(ckpt, "cpu")
    images = pipe(np.ones((2, 48), np.float32), num_images_per_prompt=2, num_inference_steps=2)["images"]
    arrays = [np.asarray(im).astype(int) for im in images]
    assert len(arrays) == 4 and all(np.abs(arrays[i] - arrays[j]).mean() > 1 for i in range(4) for j in range(i))
