"""The README's first run as one command: tile the bundled CC0 slide, train, sample, benchmark.

    python demo.py --max-steps 20        # a quick check that everything runs
    python demo.py                       # results/demo/ (the README says how long it takes)

The four tools in the order a user runs them (tiling.py, train.py, sample.py, evaluate.py), each called
with the flags printed before it runs, so every step can be rerun by hand. The slide is cut into 64 px tiles
(at 0.5 µm/px: many tiles from one small slide, each mostly stroma or mostly nuclei), 20 % of them held out
as val-in. After training, sample.py conditions on the four most eosin-dominated (pink) held-out tiles and the
four most haematoxylin-dominated (purple) ones, so the grid shows by eye whether the conditioning works. It ends
with the benchmark (evaluate.py) on three checkpoints, untrained (step 0), middle and last, and, from
LEARNING_STEPS training steps on, says whether the numbers show learning: the FD to the held-out tiles must
fall, and a sample's cosine with the tile whose features conditioned it must beat a shuffled pairing
(CytoSyn §4.1's sample-wise cosine). A shorter run says what ran instead ("pipeline ran: ...").

Any order gives the same result: a run into a folder that holds a shorter run continues it (training is
deterministic and resumes bit for bit), its middle and last checkpoints are those a straight run of its
--max-steps saves (the shorter run's others are not reported), and its samples and benchmarks go into folders
named by the checkpoint's step (generated/STEP/, bench/STEP/), so nothing of another run is reused. A folder
holding a longer run is refused: its shorter run's models were not kept.

Not CytoSyn: tiny models (SiT-T/2, the "tiny" VAE), 64 px tiles, a random two-block ViT standing in for the
gated H0-mini (the same seeded one conditions, aligns and scores), no LPIPS (its VGG weights come from the
hub), and a learning rate and EMA decay for a short run (with the paper's 0.9999 the EMA would still be
mostly its initial weights at the end). The metrics come from that random extractor, against held-out
tiles of the one slide (no val-out): they show that the model moved towards the data, not quality.
The demo runs torch on DEMO_THREADS threads, whatever the machine: a CPU run's numbers depend on the thread
count (the order of float reductions), and this keeps a rerun, or a resumed run, on the README's numbers.
"""
import json
import math
import os
import shlex
import shutil

import numpy as np
import torch
from PIL import Image

import evaluate
import sample
import tiling
import train
from support.checkpoints import checkpoint_path, latest_checkpoint
from support.cli import (
    INF,
    MAX_STEPS,
    SAMPLES_PER_COND,
    SAMPLING_RANGES,
    ArgumentParser,
    DiskFull,
    InputError,
    Interrupted,
    NonFinite,
    OutputConflict,
    number_in,
    run,
)
from support.outputs import atomic, read_csv, save_json
from support.stain import stain_balance

SLIDES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data")
TILE_PX, DEMO_THREADS, SHOWN, GUIDANCE = 64, 2, 4, 128  # tile side; torch threads; tiles shown per end; benchmark
# NOTE: the demo's settings, not the paper's: tiny models, 64 px tiles, the random "tiny" encoder for H0-mini,
# no LPIPS and no GAN (at this scale the GAN held the VAE's L1 at 0.46 after 300 steps, 0.32 without it, and cost
# a third of each step), and learning rates and an EMA decay for a short run.
TRAIN = dict(model="SiT-T/2", vae="tiny", encoder="tiny", image_size=TILE_PX, resize="crop", global_batch_size=8,
             lr=5e-4, vae_lr=1e-3, no_gan=True, ema_decay=0.995, num_workers=0)
LOG_EVERY, LOG_POINTS = 50, 5  # log (and plot) every 50 steps, or 5 times in a short run (each plot takes a second)
# The demo judges learning (FD falls, the paired cosine beats the shuffled one) from this many steps: the README's
# run had learnt at its middle checkpoint, step 1500; a 20-step quick check cannot have, and says what ran instead.
LEARNING_STEPS = 1000


def flags(settings):
    """A dict of settings -> command-line flags (True: a bare switch)."""
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


def say(tool, argv):
    print(f"\n$ python {tool} {shlex.join(argv)}", flush=True)


def tile(out):
    """The slide's 64 px tissue tiles, 20 % held out as val-in; of the held-out tiles that are tissue edge to
    edge, the most eosin-dominated (pink) and the most haematoxylin-dominated (purple) are copied to OUT/shown
    for sample.py's grid."""
    tiles = os.path.join(out, "tiles")
    if not os.path.exists(os.path.join(tiles, "manifest.csv")):
        argv = ["--slides", SLIDES, "--out", tiles, "--image-size", str(TILE_PX), "--val-in", "0.2", "--seed", "0"]
        say("tiling.py", argv)
        if tiling.main(argv):
            raise InputError("tiling the bundled slide failed (see above)")
    val = [os.path.join(tiles, r["file"]) for r in read_csv(os.path.join(tiles, "manifest.csv"))
           if r["split"] == "val_in"]
    stains = {path: stain_balance(np.asarray(Image.open(path).convert("RGB"))) for path in val}
    by_stain = sorted((p for p in val if stains[p][1] < 0.1), key=lambda p: stains[p][0])  # tissue edge to edge
    shown = os.path.join(out, "shown")
    os.makedirs(shown, exist_ok=True)
    for k, path in enumerate(by_stain[:SHOWN] + by_stain[-SHOWN:]):  # named so that the grid's rows keep this order
        shutil.copy(path, os.path.join(shown, f"{k}_{os.path.basename(path)}"))
    return os.path.join(tiles, "manifest.csv"), shown


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/demo", help="everything the demo writes goes here")
    p.add_argument("--max-steps", type=MAX_STEPS, default=2500)
    p.add_argument("--num-sampling-steps", type=number_in(*SAMPLING_RANGES["num_sampling_steps"]), default=50,
                   help="SDE steps of the generated tiles")
    p.add_argument("--n", type=SAMPLES_PER_COND, default=4, help="generated tiles per held-out tile")
    p.add_argument("--num-guidance", type=number_in(int, 2, INF), default=GUIDANCE,
                   help="training tiles that guide each benchmark's samples (at most all of them)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except (DiskFull, Interrupted) as err:  # train.py's own advice (--resume) is the demo's rerun
        err.then = "rerun the same demo.py command: it continues where this one stopped"
        raise
    return 0


def run_demo(args):
    run_dir = os.path.join(args.out, "run")
    trained = checkpoint_step(latest_checkpoint(run_dir)) if latest_checkpoint(run_dir) else 0
    if trained > args.max_steps:  # refused before anything runs
        raise OutputConflict(f"{run_dir} holds a run trained to step {trained}, past --max-steps {args.max_steps}: "
                             f"a shorter run's models were not kept; give a {args.max_steps}-step run another --out")
    os.environ["OMP_NUM_THREADS"] = str(DEMO_THREADS)  # the tools then keep the thread count (support.cli.cap_threads)
    torch.set_num_threads(DEMO_THREADS)
    manifest, shown = tile(args.out)

    every = max(args.max_steps // 5, 1)
    log_every = max(1, min(LOG_EVERY, args.max_steps // LOG_POINTS))
    train_argv = ["--tiles", manifest, "--out", run_dir, "--max-steps", str(args.max_steps),
                  "--ckpt-every", str(every), "--sample-every", str(every), "--log-every", str(log_every),
                  "--no-lpips", *flags(TRAIN)]
    if trained:
        train_argv.append("--resume")  # a shorter, finished or interrupted demo continues, it is not redone
    say("train.py", train_argv)
    train.main(train_argv)
    middle, last = middle_and_last(run_dir, every, args.max_steps)

    generated = os.path.join(args.out, "generated", f"{args.max_steps:07d}")  # named by the step it samples
    sample_argv = ["--ckpt", last, "--cond", shown, "--n", str(args.n), "--num-sampling-steps",
                   str(args.num_sampling_steps), "--out", generated]
    say("sample.py", sample_argv)
    sample.main(sample_argv)

    checkpoints = [untrained_checkpoint(train_argv, last, args.out)] + sorted({middle, last})
    learning = benchmark(checkpoints, os.path.join(args.out, "tiles"), args)

    print(f"\nWhere to look:\n  {run_dir}/loss.png              loss curves\n"
          f"  {run_dir}/samples/               conditioning tiles (top) and EMA samples (bottom), per checkpoint\n"
          f"  {generated}_grid.png  held-out tiles (pinkest on top, most purple below), then {args.n} samples\n"
          f"  {args.out}/bench/STEP/report.md  the benchmark per checkpoint\n{learning}")


def checkpoint_step(path):
    return int(os.path.basename(path).split(".")[0])


def untrained_checkpoint(train_argv, trained, out):
    """Step 0: the models train.py starts from (same seed, same init), saved as a sampling checkpoint."""
    path = os.path.join(out, "untrained", "0000000.pt")
    if not os.path.exists(path):
        nets = train.build_models(train.parse_args(train_argv), torch.device("cpu"), 1)
        config = torch.load(trained, map_location="cpu", weights_only=True)["config"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save({"config": config, "step": 0, "sit": nets.sit.state_dict(), "sit_ema": nets.sit_ema.state_dict(),
                        "vae": nets.vae.state_dict(), "vae_ema": nets.vae_ema.state_dict()}, f)
    return path


def middle_and_last(run_dir, every, max_steps):
    """The middle and the last checkpoint of the run being reported, among those a straight run of max_steps
    saves (every `every` steps, and the last): the other checkpoints of a shorter run that this one continued
    (every 4 steps of a 20-step quick check) are not this run's."""
    steps = sorted({*range(every, max_steps + 1, every), max_steps})
    paths = [checkpoint_path(run_dir, s) for s in (steps[(len(steps) - 1) // 2], max_steps)]
    for path in paths:
        if not os.path.exists(path):
            raise OutputConflict(f"{run_dir} has no {os.path.basename(path)}, which a straight {max_steps}-step run "
                                 f"saves (an earlier run into this --out went past it without saving it): choose "
                                 f"another --out")
    return paths


def benchmark(checkpoints, tiles, args):
    """evaluate.py on each checkpoint (the seeded random extractor), then, for a run long enough, the two checks
    of learning; for a shorter one, what ran."""
    steps, fd, cosine, shuffled = [], [], [], []
    guidance = sum(1 for r in read_csv(os.path.join(tiles, "manifest.csv")) if r["split"] == "train")
    for ckpt in checkpoints:
        step = checkpoint_step(ckpt)
        out = os.path.join(args.out, "bench", f"{step:07d}")
        argv = ["--ckpt", ckpt, "--tiles", tiles, "--out", out, "--num-guidance", str(min(guidance, args.num_guidance)),
                "--val-sets", "val_in", "--num-sampling-steps", str(args.num_sampling_steps), "--extractors", "tiny",
                "--random-weights", "--bootstrap-draws", "10", "--num-workers", "0", "--device", "cpu"]
        say("evaluate.py", argv)
        evaluate.main(argv)
        rows = json.load(open(os.path.join(out, "report.json")))["results"]
        value = lambda metric: next(r["value"] for r in rows if r["metric"] == metric and  # noqa: E731
                                    r["row"] != evaluate.BASELINE)
        steps.append(step), fd.append(value("fd"))
        cosine.append(value("cosine")), shuffled.append(value("cosine_shuffled"))
    print("\nstep      FD(val-in)   cosine(own)  cosine(shuffled)")
    for row in zip(steps, fd, cosine, shuffled):
        print(f"{row[0]:<9} {row[1]:<12.4g} {row[2]:<12.5f} {row[3]:.5f}")
    if not all(math.isfinite(v) for v in fd + cosine + shuffled):
        raise NonFinite(f"the benchmark gave non-finite numbers (FD {fd}, cosine {cosine}); see {args.out}/bench")
    learning = dict(steps=steps, fd=fd, cosine=cosine, cosine_shuffled=shuffled, judged=steps[-1] >= LEARNING_STEPS)
    if learning["judged"]:
        fd_falls, cosine_beats = fd[-1] < fd[0], cosine[-1] > shuffled[-1]
        learning.update(fd_falls=fd_falls, cosine_beats_shuffled=cosine_beats)
        verdict = (f"FD {'fell' if fd_falls else 'did NOT fall'} ({fd[0]:.4g} -> {fd[-1]:.4g}); the paired cosine "
                   f"{'beats' if cosine_beats else 'does NOT beat'} the shuffled one "
                   f"({cosine[-1]:.5f} vs {shuffled[-1]:.5f})")
    else:
        verdict = (f"pipeline ran: tiling, {steps[-1]} training steps (finite losses), sampling from step "
                   f"{steps[-1]}, and the benchmark of steps {', '.join(map(str, steps))} (finite FD and cosines); "
                   f"{steps[-1]} steps are too few to judge learning (the demo judges it from --max-steps "
                   f"{LEARNING_STEPS})")
    save_json(learning, os.path.join(args.out, "learning.json"))
    return verdict


if __name__ == "__main__":
    run(main)
