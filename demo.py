"""The README's first run as one command: tile the bundled CC0 slide, train, sample, evaluate.

    python demo.py                       # about 15 minutes on a 2-core CPU; results/demo/
    python demo.py --max-steps 20        # a quick check that everything runs

The four tools in the order a user runs them (tiling.py, train.py, sample.py, metrics.py), each called
with the flags printed before it runs, so every step can be rerun by hand.
NOTE: not CytoSyn: tiny models (SiT-T/2, the "tiny" VAE) on the central 64 px of each tile (as sample.py
crops its conditioning tiles), a random two-block ViT standing in for the gated H0-mini (the same seeded
one conditions, aligns and scores), no LPIPS (its VGG weights come from the hub), and a learning rate and
EMA decay for a 1500-step run (with the paper's 0.9999 the EMA would still be 86 % initial weights at the
end). The metrics come from that random extractor: they show that the pipeline runs, not quality.
"""
import argparse
import csv
import os
import shlex
import shutil
import sys

import metrics
import sample
import tiling
import train
from checkpoints import latest_checkpoint

SLIDES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data")
TRAIN = dict(model="SiT-T/2", vae="tiny", encoder="tiny", image_size=64, resize="crop", global_batch_size=8,
             lr=3e-4, vae_lr=3e-4, disc_lr=3e-4, ema_decay=0.995, log_every=50, num_workers=0)


def flags(settings):
    """A dict of settings -> command-line flags (True: a bare switch)."""
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


def say(tool, argv):
    print(f"\n$ python {tool} {shlex.join(argv)}", flush=True)


def tile(out):
    """The slide's tissue tiles, 20 % held out as val-in and copied to OUT/val for the metrics."""
    tiles = os.path.join(out, "tiles")
    if not os.path.exists(os.path.join(tiles, "manifest.csv")):
        argv = [SLIDES, tiles, "--val-in", "0.2", "--seed", "0"]
        say("tiling.py", argv)
        if tiling.main(argv):
            raise SystemExit("demo.py: error: tiling the bundled slide failed (see above)")
    val = os.path.join(out, "val")
    os.makedirs(val, exist_ok=True)
    with open(os.path.join(tiles, "manifest.csv"), newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "val_in":
                shutil.copy(os.path.join(tiles, row["file"]), val)
    return os.path.join(tiles, "manifest.csv"), val


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/demo", help="everything the demo writes goes here")
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--sample-steps", type=int, default=50, help="SDE steps of the generated tiles")
    p.add_argument("--n", type=int, default=4, help="generated tiles per held-out tile")
    args = p.parse_args(argv)

    manifest, val = tile(args.out)

    run = os.path.join(args.out, "run")
    every = max(args.max_steps // 3, 1)
    train_argv = ["--data", manifest, "--results-dir", run, "--max-steps", str(args.max_steps),
                  "--ckpt-every", str(every), "--sample-every", str(every), "--no-lpips", *flags(TRAIN)]
    if latest_checkpoint(run):
        train_argv.append("--resume")  # a finished or interrupted demo continues, it is not redone
    say("train.py", train_argv)
    train.main(train.parse_args(train_argv))
    ckpt = latest_checkpoint(run)

    generated = os.path.join(args.out, "generated")
    sample_argv = ["--ckpt", ckpt, "--cond", val, "--n", str(args.n), "--steps", str(args.sample_steps),
                   "--out", generated]
    say("sample.py", sample_argv)
    sample.main(sample.parse_args(sample_argv))

    report = os.path.join(args.out, "metrics.json")
    metrics_argv = ["--real", val, "--fake", generated, "--extractors", "tiny", "--random-weights",
                    "--metrics", "fd,pr,cosine", "--workers", "0", "--out", report]
    say("metrics.py", metrics_argv)
    metrics.main(metrics_argv)

    print(f"\nWhere to look:\n  {run}/loss.png              loss curves\n"
          f"  {run}/samples/               conditioning tiles (top) and EMA samples (bottom), per checkpoint\n"
          f"  {generated}_grid.png  each held-out tile, then {args.n} samples\n"
          f"  {report}      the metrics (random extractor: a pipeline check)")


if __name__ == "__main__":
    sys.exit(main())
