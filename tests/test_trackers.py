"""Live training curves (support/trackers.py): a tiny run's TensorBoard events, read back with TensorBoard's own
reader, hold every number of its metrics.csv at the same steps (also across a resume), its sample grids and its
settings; W&B, tested through a stand-in `wandb` module (installing it in CI costs too much), gets the same
numbers, resumes the same run and receives evaluate.py's benchmark; a missing package is one line.
"""
import csv
import io
import json
import shutil
import sys
import types

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import train
from support import trackers
from support.logs import Logger
from test_evaluate import argv, tiling_output
from test_train import tiny_args

GRIDS = ["--sample-every", "2", "--grid-tiles", "2", "--num-sampling-steps", "2"]
REPORT = {"results": [
    {"row": "CytoSyn (sde, 250 steps)", "extractor": "uni2-h", "val": "val_out", "metric": "fd", "value": 15.25,
     "std": None},
    {"row": "CytoSyn (sde, 250 steps)", "extractor": "uni2-h", "val": "val_out", "metric": "fd_bootstrap",
     "value": 15.5, "std": 0.75},
    {"row": "guidance vs val", "extractor": "tiny", "val": None, "metric": "cosine", "value": 0.5, "std": None}]}
BENCHMARK = {"uni2-h/fd/val_out/CytoSyn_sde_250_steps": 15.25,
             "uni2-h/fd_bootstrap/val_out/CytoSyn_sde_250_steps": 15.5,
             "uni2-h/fd_bootstrap/val_out/CytoSyn_sde_250_steps_std": 0.75, "tiny/cosine/tiles/guidance_vs_val": 0.5}


def csv_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def a_report(folder):
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(REPORT))
    Image.new("RGB", (8, 6), (200, 10, 10)).save(folder / "fd_vs_steps.png")
    return folder


def test_tensorboard_events_equal_metrics_csv_across_a_resume(tmp_path):
    run = tmp_path / "run"
    train.train(tiny_args(run, "--max-steps", "2", "--ckpt-every", "1", "--tracker", "tensorboard", *GRIDS))
    (run / "checkpoints" / "0000002.pt").unlink()  # as if killed after logging step 2, before its checkpoint:
    (run / "checkpoints" / "0000002.pt.sha256").unlink()  # the run resumes from step 1 and logs step 2 again
    train.train(tiny_args(run, "--max-steps", "3", "--ckpt-every", "1", "--tracker", "tensorboard", "--resume",
                          *GRIDS))
    events = EventAccumulator(str(run / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0,
                                                                                   "tensors": 0}).Reload()
    rows = csv_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    columns = [c for c in rows[0] if c != "step"]
    assert {"diffusion", "proj_sit", "l1", "img_per_s", "peak_mem_gb"} <= set(columns)
    assert set(events.Tags()["scalars"]) == {f"train/{c}" for c in columns}  # every scalar, nothing else
    for column in columns:  # TensorBoard keeps float32
        assert [(e.step, e.value) for e in events.Scalars(f"train/{column}")] == \
            [(int(r["step"]), float(np.float32(float(r[column])))) for r in rows], column
    grids = events.Images("train/samples")
    assert [e.step for e in grids] == [2, 3]  # step 2 once: the resumed run's
    for event in grids:
        shown = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert np.array_equal(shown, np.asarray(Image.open(run / "samples" / f"{event.step:07d}.png").convert("RGB")))
    settings = events.Tensors("settings/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert '"global_batch_size": 2' in settings and '"model": "SiT-T/2"' in settings

    trackers.log_benchmark("tensorboard", None, a_report(tmp_path / "bench"), str(run / "checkpoints" / "0000003.pt"))
    events = EventAccumulator(str(run / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0}).Reload()
    for tag, value in BENCHMARK.items():  # at the checkpoint's step, in the training run's folder
        assert [(e.step, e.value) for e in events.Scalars(f"benchmark/{tag}")] == [(3, value)], tag
    assert [e.step for e in events.Images("benchmark/fd_vs_steps")] == [3]


class FakeWandb(types.ModuleType):
    """What train.py and evaluate.py hand to wandb: init's arguments, every log call, each run's end."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.defined, self.finished = [], [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(id=kwargs["id"] or "run42", project=kwargs["project"], finish=self.finish,
                                     log=lambda data, step=None: self.logs.append((step, data)),
                                     define_metric=lambda *a, **k: self.defined.append((a, k)))

    def finish(self):
        self.finished += 1

    @staticmethod
    def Image(path):  # noqa: N802 (wandb's name)
        return ("image", str(path))


def test_wandb_gets_every_number_resumes_its_run_and_takes_the_benchmark(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(trackers, "reachable", lambda url: False)  # no network: offline by default
    run = tmp_path / "run"
    train.train(tiny_args(run, "--max-steps", "2", "--ckpt-every", "2", "--tracker", "wandb", *GRIDS))
    assert fake.inits == [dict(project="cytosyn", name="run", dir=str(run), config=fake.inits[0]["config"], id=None,
                               resume=None, mode="offline")]
    assert fake.inits[0]["config"]["global_batch_size"] == 2 and fake.inits[0]["config"]["model"] == "SiT-T/2"
    assert json.loads((run / trackers.WANDB_RUN).read_text()) == {"id": "run42", "project": "cytosyn"}
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice wins over the probe
    train.train(tiny_args(run, "--max-steps", "3", "--ckpt-every", "3", "--tracker", "wandb", "--resume", *GRIDS))
    assert fake.inits[1]["id"] == "run42" and fake.inits[1]["resume"] == "allow" and fake.inits[1]["mode"] == "online"
    assert fake.finished == 2
    Logger(str(tmp_path), rank=1, tracker="wandb", settings={"x": 1})  # the other ranks send nothing
    assert len(fake.inits) == 2
    rows = csv_rows(run)
    scalars = [(step, data) for step, data in fake.logs if "train/samples" not in data]
    assert scalars == [(int(r["step"]), {f"train/{k}": float(v) for k, v in r.items() if k != "step"}) for r in rows]
    assert [(step, data) for step, data in fake.logs if "train/samples" in data] == [
        (step, {"train/samples": ("image", str(run / "samples" / f"{step:07d}.png"))}) for step in (2, 3)]

    fake.logs.clear()
    trackers.log_benchmark("wandb", None, a_report(tmp_path / "bench"), str(run / "checkpoints" / "0000003.pt"))
    assert fake.inits[2]["id"] == "run42" and fake.inits[2]["resume"] == "allow"
    assert fake.defined == [(("benchmark/*",), {"step_metric": "benchmark/step"})]
    assert fake.logs == [(None, {"benchmark/step": 3, **{f"benchmark/{k}": v for k, v in BENCHMARK.items()},
                                 "benchmark/fd_vs_steps": ("image", str(tmp_path / "bench" / "fd_vs_steps.png"))})]


def test_a_missing_tracker_package_is_one_line_before_the_run_starts(tmp_path, monkeypatch, one_line_error):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is not installed
    argv = tiny_args(tmp_path, "--max-steps", "1")
    line = one_line_error(train.main, ["--tiles", argv.tiles, "--out", str(tmp_path / "run"), "--tracker", "wandb"])
    assert line.endswith("--tracker wandb needs the wandb package, which is not installed: pip install -r "
                         "requirements-trackers.txt") and not (tmp_path / "run").exists()


def test_evaluate_finds_the_run_folder_of_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    base = ["--tiles", str(tmp_path), "--out", str(tmp_path / "bench"), "--tracker", "wandb"]
    args = evaluate.parse_args(["--ckpt", str(tmp_path / "run" / "checkpoints" / "0000100.pt"), *base])
    assert args.tracker_run == str(tmp_path / "run")
    with pytest.raises(evaluate.InputError, match="pass --tracker-run RUN_DIR"):
        evaluate.parse_args(["--ckpt", "hf-hub:my-lab/cytosyn", *base])
    assert evaluate.parse_args(["--ckpt", "hf-hub:my-lab/cytosyn", *base, "--tracker-run", "r"]).tracker_run == "r"
    with pytest.raises(evaluate.InputError, match="--tracker logs a checkpoint's benchmark"):
        evaluate.parse_args(["--generated", str(tmp_path), *base])


@pytest.mark.filterwarnings("ignore:FD from")  # a handful of tiles in 48 dims: expected here
def test_evaluate_logs_its_report_to_the_checkpoints_training_run(ckpt, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(ckpt, run / "checkpoints" / "0000100.pt")  # conftest's, as if train.py had written it there
    tiles = tiling_output(tmp_path / "tiling", {"train": 4, "val_in": 3, "val_out": 3}, size=224)
    assert evaluate.main(argv(str(run / "checkpoints" / "0000100.pt"), tiles, tmp_path / "bench", "--num-guidance", "3",
                              "--sampler", "ode,sde", "--num-sampling-steps", "1", "--tracker", "tensorboard")) == 0
    results = json.loads((tmp_path / "bench" / "report.json").read_text())["results"]
    events = EventAccumulator(str(run / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert len(events.Tags()["scalars"]) == len(results) + sum(r["std"] is not None for r in results)
    for result in results:  # every number of the report, at the checkpoint's step
        assert [(e.step, e.value) for e in events.Scalars(f"benchmark/{trackers.tag_of(result)}")] == \
            [(100, float(np.float32(result["value"])))]
    assert [e.step for e in events.Images("benchmark/fd_vs_steps")] == [100]

