"""The README's first run as one command: tile the bundled CC0 slide, train, sample, benchmark.

    python demo.py                       # results/demo/ (the README says how long it takes)
    python demo.py --max-steps 20        # a quick check that everything runs

The four tools in the order a user runs them (tiling.py, train.py, sample.py, evaluate.py), each called
with the flags printed before it runs, so every step can be rerun by hand. The slide is cut into 64 px tiles
(at 0.5 µm/px: many tiles from one small slide, each mostly stroma or mostly nuclei), 20 % of them held out
as val-in. After training, sample.py conditions on the four most eosin-dominated (pink) held-out tiles and the
four most haematoxylin-dominated (purple) ones, so the grid shows by eye whether the conditioning works. It ends
with the benchmark (evaluate.py) on three checkpoints, untrained (step 0), middle and last, and says
whether the numbers show learning: the FD to the held-out tiles must fall, and a sample's cosine with the
tile whose features conditioned it must beat a shuffled pairing (CytoSyn §4.1's sample-wise cosine).

Not CytoSyn: tiny models (SiT-T/2, the "tiny" VAE), 64 px tiles, a random two-block ViT standing in for the
gated H0-mini (the same seeded one conditions, aligns and scores), no LPIPS (its VGG weights come from the
hub), and a learning rate and EMA decay for a short run (with the paper's 0.9999 the EMA would still be
mostly its initial weights at the end). The metrics come from that random extractor, against held-out
tiles of the one slide (no val-out): they show that the model moved towards the data, not quality.
The demo runs torch on DEMO_THREADS threads, whatever the machine: a CPU run's numbers depend on the thread
count (the order of float reductions), and this keeps a rerun, or a resumed run, on the README's numbers.
"""
import json
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
from support.checkpoints import CHECKPOINT, latest_checkpoint
from support.cli import MAX_STEPS, SAMPLES_PER_COND, SAMPLING_RANGES, ArgumentParser, InputError, number_in, run
from support.outputs import atomic, read_csv
from support.stain import stain_balance

SLIDES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data")
TILE_PX, DEMO_THREADS, SHOWN, GUIDANCE = 64, 2, 4, 128  # tile side; torch threads; tiles shown per end; benchmark
# NOTE: the demo's settings, not the paper's: tiny models, 64 px tiles, the random "tiny" encoder for H0-mini,
# no LPIPS and no GAN (at this scale the GAN held the VAE's L1 at 0.46 after 300 steps, 0.32 without it, and cost
# a third of each step), and learning rates and an EMA decay for a short run.
TRAIN = dict(model="SiT-T/2", vae="tiny", encoder="tiny", image_size=TILE_PX, resize="crop", global_batch_size=8,
             lr=5e-4, vae_lr=1e-3, no_gan=True, ema_decay=0.995, log_every=50, num_workers=0)


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
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(DEMO_THREADS)  # the tools then keep the thread count (support.cli.cap_threads)
    torch.set_num_threads(DEMO_THREADS)
    manifest, shown = tile(args.out)

    run_dir = os.path.join(args.out, "run")
    every = max(args.max_steps // 5, 1)
    train_argv = ["--tiles", manifest, "--out", run_dir, "--max-steps", str(args.max_steps),
                  "--ckpt-every", str(every), "--sample-every", str(every), "--no-lpips", *flags(TRAIN)]
    if latest_checkpoint(run_dir):
        train_argv.append("--resume")  # a finished or interrupted demo continues, it is not redone
    say("train.py", train_argv)
    train.main(train_argv)
    ckpt = latest_checkpoint(run_dir)

    generated = os.path.join(args.out, "generated")
    sample_argv = ["--ckpt", ckpt, "--cond", shown, "--n", str(args.n), "--num-sampling-steps",
                   str(args.num_sampling_steps), "--out", generated]
    say("sample.py", sample_argv)
    sample.main(sample_argv)

    checkpoints = [untrained_checkpoint(train_argv, ckpt, args.out)] + middle_and_last(run_dir)
    learning = benchmark(checkpoints, os.path.join(args.out, "tiles"), args)

    print(f"\nWhere to look:\n  {run_dir}/loss.png              loss curves\n"
          f"  {run_dir}/samples/               conditioning tiles (top) and EMA samples (bottom), per checkpoint\n"
          f"  {generated}_grid.png  held-out tiles (pinkest on top, most purple below), then {args.n} samples\n"
          f"  {args.out}/bench/STEP/report.md  the benchmark per checkpoint; {learning}")


def untrained_checkpoint(train_argv, trained, out):
    """Step 0: the models train.py starts from (same seed, same init), saved as a sampling checkpoint."""
    path = os.path.join(out, "untrained", "0000000.pt")
    if not os.path.exists(path):
        nets = train.build_models(train.parse_args(train_argv), torch.device("cpu"), 1)
        config = torch.load(trained, map_location="cpu", weights_only=True)["config"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic(path) as tmp:
            torch.save({"config": config, "step": 0, "sit": nets.sit.state_dict(), "sit_ema": nets.sit_ema.state_dict(),
                        "vae": nets.vae.state_dict(), "vae_ema": nets.vae_ema.state_dict()}, tmp)
    return path


def middle_and_last(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    saved = sorted(f for f in os.listdir(folder) if CHECKPOINT.match(f))
    return [os.path.join(folder, f) for f in sorted({saved[(len(saved) - 1) // 2], saved[-1]})]


def benchmark(checkpoints, tiles, args):
    """evaluate.py on each checkpoint (the seeded random extractor), then the two checks of learning."""
    steps, fd, cosine, shuffled = [], [], [], []
    guidance = sum(1 for r in read_csv(os.path.join(tiles, "manifest.csv")) if r["split"] == "train")
    for ckpt in checkpoints:
        step = int(os.path.basename(ckpt)[:-3])
        out = os.path.join(args.out, "bench", f"{step:07d}")
        argv = ["--ckpt", ckpt, "--tiles", tiles, "--out", out, "--num-guidance", str(min(guidance, GUIDANCE)),
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
    fd_falls, cosine_beats = fd[-1] < fd[0], cosine[-1] > shuffled[-1]
    verdict = (f"FD {'fell' if fd_falls else 'did NOT fall'} ({fd[0]:.4g} -> {fd[-1]:.4g}); the paired cosine "
               f"{'beats' if cosine_beats else 'does NOT beat'} the shuffled one "
               f"({cosine[-1]:.5f} vs {shuffled[-1]:.5f})")
    print(verdict)
    with open(os.path.join(args.out, "learning.json"), "w") as f:
        json.dump(dict(steps=steps, fd=fd, cosine=cosine, cosine_shuffled=shuffled, fd_falls=fd_falls,
                       cosine_beats_shuffled=cosine_beats), f, indent=1)
    return verdict


if __name__ == "__main__":
    run(main)
