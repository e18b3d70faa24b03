"""The paper's benchmark in one resumable command (CytoSyn §4.1-§4.3, §5; Table 2, Table 5, Figure 4).

    python evaluate.py --ckpt CKPT --tiles TILING_OUT --out DIR
    torchrun --nproc_per_node=8 evaluate.py --ckpt CKPT --tiles TILING_OUT --out DIR     # sampling on 8 GPUs
    python evaluate.py ... --num-sampling-steps 20,50,100,250 --sampler ode,sde           # + Figure 4

1. Guidance: --num-guidance training tiles of the tiling manifest (paper: 100 k), stratified by TSS,
   linked as DIR/guidance/000000.png ...; their CLS features from the checkpoint's encoder
   (H0-mini) in DIR/guidance/cls.npy.
2. One generated tile per guidance tile, by sample.py itself (`sample.main`): DIR/generated/SAMPLER-STEPS/
   000000_00.png ...; sample.py splits the work over torchrun ranks, skips finished images and refuses
   other settings in the same folder. Paper defaults: SDE, 250 steps, cfg 2.5 on t in [0, 0.75].
3. For each extractor, against val-in and val-out (DIR/val_in, DIR/val_out link the manifest's tiles):
   FD, FLD (train = the guidance tiles), precision / recall, the paired cosine of each generated tile with
   the guidance tile that conditioned it (and a shuffled pairing, its chance level), the bootstrap of FD
   (50 draws of half the samples, Table 5), and the "guidance vs val" baseline row (Table 2).
4. DIR/report.md laid out like Table 2 (val-in / val-out in each cell), DIR/report.json with every setting
   next to every number; with several --num-sampling-steps / --sampler, DIR/fd_vs_steps.png and its table (Figure 4).

Features are cached in DIR/features (keyed by content, extractor, weights and preprocessing), so a rerun
recomputes nothing that is finished. Left out: multi-GPU feature extraction (rank 0 scores; the other
ranks only sample), KID and the other metrics metrics.py leaves out.
"""
import argparse
import csv
import functools
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import metrics as M
import sample
from support.cli import BATCH_SIZE, INF, InputError, MissingInput, add_sampling_args, check_guidance, comma_list, number_in, processes, run
from support.data import read_manifest_rows
from features import load_encoder
from support.extractors import EXTRACTORS, build_extractor, spec_record, weights_id
from support.logs import plot_fd_vs_steps
from support.outputs import claim_output_folder, save_json, save_npy
from tiling import TILE_MPP

PAPER_EXTRACTORS = ["h-optimus-0", "virchow2", "uni2-h", "fid-inception"]  # Table 2's four, pytorch-fid's Inception
VAL_SETS = ("val_in", "val_out")
BASELINE = "guidance vs val"


# -------- Guidance and validation tiles from the tiling manifest -----------------------------------
def manifest_rows(tiles):
    """Every row of tiling.py's manifest (data.py reads it), with the tile's path."""
    path = Path(tiles) / "manifest.csv"
    if not path.exists():
        raise MissingInput(f"--tiles {tiles}: no manifest.csv; pass the output folder of tiling.py")
    column, rows = read_manifest_rows(path, split=None)
    if "split" not in rows[0]:
        raise InputError(f"{path} has no 'split' column; write it with tiling.py")
    for row in rows:
        row["path"] = str(Path(tiles) / row[column])
    return rows


def stratified(rows, n, seed):
    """n rows drawn without replacement, each TSS getting its share (largest remainders), seeded."""
    groups = {}
    for row in rows:
        groups.setdefault(row.get("tss") or "", []).append(row)
    quotas = {k: n * len(v) / len(rows) for k, v in sorted(groups.items())}
    counts = {k: int(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: counts[k] - quotas[k])[:n - sum(counts.values())]:
        counts[k] += 1
    rng = np.random.default_rng(seed)
    picked = [g[i] for k, g in sorted(groups.items()) for i in sorted(rng.choice(len(g), counts[k], replace=False))]
    return sorted(picked, key=lambda r: r["path"])


def link_folder(folder, named_paths):
    """folder/<name><ext> -> the tile, as symbolic links (no copy of 100k tiles); an existing folder must
    hold the same links (a resumed run), else it is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in named_paths:
        link = folder / (name + Path(path).suffix)
        target = os.path.abspath(path)
        if link.is_symlink() or link.exists():
            if os.path.realpath(link) != os.path.realpath(target):
                raise InputError(f"{link} points to {os.path.realpath(link)}, not {target}: {folder} is from another "
                                 f"run; choose another --out")
        else:
            os.symlink(target, link)
    return folder


def prepare_tiles(args):
    """DIR/guidance (000000.png ...), DIR/val_in, DIR/val_out and DIR/guidance.csv, from the manifest."""
    rows = manifest_rows(args.tiles)
    train = [r for r in rows if r["split"] == "train"]
    if len(train) < args.num_guidance:
        raise InputError(f"{args.tiles} has {len(train)} training tiles, fewer than --num-guidance "
                         f"{args.num_guidance}: lower --num-guidance or tile more slides")
    for split in args.val_sets:
        if not any(r["split"] == split for r in rows):
            raise InputError(f"{args.tiles} has no {split} rows: tile with held-out slides (tiling.py --val-out "
                             f"/ --val-in), or evaluate against the others with --val-sets")
    guidance = stratified(train, args.num_guidance, args.seed)
    link_folder(args.out / "guidance", [(f"{i:06d}", r["path"]) for i, r in enumerate(guidance)])
    for split in args.val_sets:
        link_folder(args.out / split, [(Path(r["path"]).stem, r["path"]) for r in rows if r["split"] == split])
    with open(args.out / "guidance.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "tss", "file"])
        writer.writerows([f"{i:06d}", r.get("tss", ""), r["file"]] for i, r in enumerate(guidance))
    return [r["path"] for r in guidance]


@torch.no_grad()
def guidance_features(args, paths, device):
    """DIR/guidance/cls.npy: the CLS features of the guidance tiles from the checkpoint's encoder, as
    sample.py --cond computes them (centre crop to the model's tile size); kept once written."""
    out = args.out / "guidance" / "cls.npy"
    if out.exists():
        if len(np.load(out, mmap_mode="r")) != len(paths):
            raise InputError(f"{out} holds features of another guidance set (not {len(paths)} tiles): choose "
                             f"another --out")
        return out
    pipe = sample.load_pipeline(args.ckpt, device)
    if args.random_encoder:  # an untrained H0-mini (pipeline checks); the "tiny" one is random anyway
        pipe.encoder = load_encoder(pipe.encoder_name, pretrained=False, seed=pipe.encoder_seed).to(device)
    source = sample.TileSource(paths, pipe.tile_size, TILE_MPP)
    feats = [source.features(list(range(i, min(i + args.batch_size, len(paths)))), pipe).cpu().numpy()
             for i in range(0, len(paths), args.batch_size)]
    save_npy(np.concatenate(feats).astype(np.float32), out)  # atomic: a killed run leaves no half-written array
    return out


def generate_tiles(args, cls_path, sampler, steps):
    """One generated tile per guidance feature, by sample.py (resumable, torchrun-aware)."""
    folder = args.out / "generated" / f"{sampler}-{steps}"
    argv = ["--ckpt", str(args.ckpt), "--features", str(cls_path), "--n", "1", "--sampler", sampler,
            "--num-sampling-steps", str(steps), "--cfg-scale", str(args.cfg_scale), "--guidance-low",
            str(args.guidance_low), "--guidance-high", str(args.guidance_high), "--seed", str(args.seed),
            "--batch-size", str(args.sample_batch_size), "--sit-weights", args.sit_weights, "--vae-weights",
            args.vae_weights, "--device", args.device, "--precision", args.precision, "--out", str(folder)]
    print(f"\n$ python sample.py {' '.join(argv)}", flush=True)
    sample.main(argv)
    return folder


# -------- Scores -------------------------------------------------------------------------------------
def shuffled_cosine(real_stems, real, gen_stems, gen, seed):
    """The paired cosine with the pairing shuffled (each generated tile against another guidance tile):
    the chance level the paired cosine must beat."""
    order = np.random.default_rng(seed).permutation(len(real))
    for i in range(len(order) if len(order) > 1 else 0):
        if order[i] == i:  # a tile paired with itself: swap with the next, so that no pairing is the true one
            j = (i + 1) % len(order)
            order[i], order[j] = order[j], order[i]
    return M.paired_cosine(real_stems, real[order], gen_stems, gen)


def score_set(add, real, gen, train, args, device, with_fld=True):
    """FD, its bootstrap, precision / recall and FLD of one (real, generated) pair of feature sets."""
    stats = M.feature_stats(real)
    add("fd", M.fd(stats, M.feature_stats(gen)))
    if len(gen) >= 4 and args.bootstrap_draws:
        size = args.bootstrap_size or len(gen) // 2
        mean, std, _ = M.bootstrap_fd(stats, gen, args.bootstrap_draws, size, args.seed)
        add("fd_bootstrap", mean, std, draws=args.bootstrap_draws, size=size)
    precision, recall = M.precision_recall(real, gen, args.k, device)
    add("precision", precision, k=args.k)
    add("recall", recall, k=args.k)
    if with_fld:
        out = M.fld(train, real, gen, args.fld_gen_size, M.FLD_EPOCHS, args.seed, device)
        add("fld", out["fld"], **out)


def score_extractor(name, args, folders, device):
    """Every row of one extractor: each generated run and the guidance baseline, against each val set."""
    spec, pretrained = EXTRACTORS[name], not args.random_weights
    weights = weights_id(name, pretrained, args.seed)
    get = functools.cache(lambda: build_extractor(name, pretrained, device, args.seed))
    feats = functools.partial(M.extract_features, name=name, get_extractor=get, weights=weights, device=device,
                              batch_size=args.batch_size, workers=args.num_workers, cache_dir=args.out / "features")
    preps = {s: M.Preprocess(getattr(args, f"jpeg_{s}"), args.crop, args.resize_kernel, args.resize_to_input)
             for s in ("val", "guidance", "generated")}
    sets = {"guidance": feats(args.out / "guidance", prep=preps["guidance"])}
    sets.update({v: feats(args.out / v, prep=preps["val"]) for v in args.val_sets})
    resize = {k: M.resize_record(M.check_one_size(args.out / k, [Path(p) for p in M.list_images(args.out / k)],
                                                  preps["val" if k in VAL_SETS else k]), spec,
                                 preps["val" if k in VAL_SETS else k]) for k in sets}
    base = dict(extractor_spec=spec_record(spec), weights=weights, device=str(device), seed=args.seed,
                preprocess={k: {**vars(p), "kernel": p.kernel or spec.kernel} for k, p in preps.items()},
                resize=resize, n_guidance=len(sets["guidance"][1]))
    rows = []

    def adder(label, val, n_gen, **extra):
        def add(metric, value, std=None, **settings):
            rows.append(dict(row=label, extractor=name, val=val, metric=metric, value=value, std=std,
                             settings={**base, **extra, "n_val": len(sets[val][1]) if val else None,
                                       "n_generated": n_gen, **settings}))
        return add

    for val in args.val_sets:  # the baseline row: the guidance tiles themselves against the val sets
        score_set(adder(BASELINE, val, len(sets["guidance"][1])), sets[val][1], sets["guidance"][1], None, args,
                  device, with_fld=False)
    for (sampler, steps), folder in folders.items():
        gen_stems, gen = feats(folder, prep=preps["generated"])
        run_settings = dict(sampler=sampler, num_sampling_steps=steps, cfg_scale=args.cfg_scale,
                            sit_weights=args.sit_weights,
                            vae_weights=args.vae_weights, guidance_interval=[args.guidance_low, args.guidance_high],
                            resize_generated=M.resize_record(M.check_one_size(folder, [Path(p) for p in
                                                             M.list_images(folder)], preps["generated"]), spec,
                                                             preps["generated"]))
        add = adder(run_name(sampler, steps), None, len(gen), **run_settings)
        guide_stems, guide = sets["guidance"]
        mean, std, n = M.paired_cosine(guide_stems, guide, gen_stems, gen)
        add("cosine", mean, std, n_pairs=n)
        mean, std, n = shuffled_cosine(guide_stems, guide, gen_stems, gen, args.seed)
        add("cosine_shuffled", mean, std, n_pairs=n)
        for val in args.val_sets:
            score_set(adder(run_name(sampler, steps), val, len(gen), **run_settings), sets[val][1], gen, guide,
                      args, device)
    return rows


def run_name(sampler, steps):
    return f"CytoSyn ({sampler}, {steps} steps)"


# -------- Reports ----------------------------------------------------------------------------------
def cell(rows, label, extractor, metric, val_sets):
    values = []
    for val in val_sets:
        hit = [r for r in rows if (r["row"], r["extractor"], r["metric"], r["val"]) == (label, extractor, metric, val)]
        values.append("-" if not hit else f"{hit[0]['value']:.3f}" + (f" ± {hit[0]['std']:.3f}" if hit[0]["std"]
                                                                     is not None and metric == "fd_bootstrap" else ""))
    return " / ".join(values)


def markdown_report(rows, args, extractors):
    """Table 2's layout: a table per metric, a row per run, a column per extractor, val-in / val-out per cell."""
    runs = [BASELINE] + [run_name(s, n) for s in args.sampler for n in args.num_sampling_steps]
    lines = [f"# Benchmark of {args.ckpt}", "", f"{date.today()}; {args.num_guidance} guidance tiles from "
             f"{args.tiles}; cells: {' / '.join(args.val_sets)}; weights: "
             f"{'random (pipeline check only)' if args.random_weights else 'pretrained'}; SiT {args.sit_weights}, "
             f"VAE {args.vae_weights}; every setting per number: report.json", ""]
    for metric in ("fd", "fd_bootstrap", "fld", "precision", "recall"):
        lines += [f"## {metric}", "", "| run | " + " | ".join(extractors) + " |",
                  "|---|" + "---|" * len(extractors)]
        lines += [f"| {label} | " + " | ".join(cell(rows, label, e, metric, args.val_sets) for e in extractors) + " |"
                  for label in runs if any(r["row"] == label and r["metric"] == metric for r in rows)]
        lines.append("")
    lines += ["## cosine (generated vs its guidance tile; shuffled pairing)", "", "| run | " +
              " | ".join(extractors) + " |", "|---|" + "---|" * len(extractors)]
    for label in runs[1:]:
        lines.append(f"| {label} | " + " | ".join(cell(rows, label, e, "cosine", [None]) + " (shuffled " +
                                                cell(rows, label, e, "cosine_shuffled", [None]) + ")"
                                                for e in extractors) + " |")
    return "\n".join(lines) + "\n"


def fd_vs_steps(rows, args, extractor):
    """Figure 4's numbers: {sampler: [(steps, FD)]} on the last val set, for one extractor."""
    val = args.val_sets[-1]
    return {s: [(n, next(r["value"] for r in rows if (r["row"], r["extractor"], r["metric"], r["val"]) ==
                         (run_name(s, n), extractor, "fd", val))) for n in args.num_sampling_steps] for s in args.sampler}


def main(argv=None):
    args = parse_args(argv)
    # One process group for the whole run (under torchrun): sample.py's runs join it rather than each
    # starting and ending its own.
    with processes(args.device, args.num_workers) as (rank, world, device):
        claim_output_folder(str(args.out), {"--tiles": [str(args.tiles)]})  # rank 0 locks it for the run
        if rank == 0:
            cls_path = guidance_features(args, prepare_tiles(args), device)
        else:  # rank 0 links the tiles and writes the guidance features; the other ranks wait for them
            cls_path = wait_for(args.out / "guidance" / "cls.npy")
        folders = {(s, n): generate_tiles(args, cls_path, s, n) for s in args.sampler for n in args.num_sampling_steps}
        if rank != 0:
            return 0
        rows, skipped = M.score_extractors(args.extractors, lambda name: score_extractor(name, args, folders, device))
    write_reports(rows, skipped, args, argv)
    return 1 if skipped and not rows else 0


def wait_for(path, poll=5.0):
    while not path.exists():
        time.sleep(poll)
    return path


def write_reports(rows, skipped, args, argv):
    scored = [e for e in args.extractors if any(r["extractor"] == e for r in rows)]
    text = markdown_report(rows, args, scored)
    figure = None
    if scored and (len(args.num_sampling_steps) > 1 or len(args.sampler) > 1):
        figure = fd_vs_steps(rows, args, scored[0])
        title = f"FD ({scored[0]}, {args.val_sets[-1]})"
        plot_fd_vs_steps(figure, args.out / "fd_vs_steps.png", title)
        text += fd_vs_steps_table(figure, title)
    for s in skipped:
        text += f"\nskipped: {s['error']}\n"
    (args.out / "report.md").write_text(text)
    report = dict(date=str(date.today()), argv=sys.argv if argv is None else argv,
                  settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  results=rows, skipped=skipped, fd_vs_steps=figure, versions=M.versions())
    save_json(report, args.out / "report.json")
    print(text)


def fd_vs_steps_table(curves, title):
    """Figure 4's numbers as a markdown table: a row per step count, a column per sampler."""
    steps = sorted({n for c in curves.values() for n, _ in c})
    header = "| steps | " + " | ".join(sorted(curves)) + " |\n|---|" + "---|" * len(curves) + "\n"
    table = "".join(f"| {n} | " + " | ".join(f"{dict(curves[s]).get(n, float('nan')):.3f}" for s in sorted(curves))
                    + " |\n" for n in steps)
    return f"\n## Figure 4: {title} against steps (fd_vs_steps.png)\n\n" + header + table


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint from train.py")
    p.add_argument("--tiles", required=True, type=Path, help="tiling.py's output folder (manifest.csv inside)")
    p.add_argument("--out", required=True, help="everything the benchmark writes; a rerun resumes")
    p.add_argument("--num-guidance", type=number_in(int, 2, INF), default=100_000, help="paper: 100k")
    p.add_argument("--val-sets", type=comma_list(VAL_SETS), default=list(VAL_SETS), help="comma-separated: "
                                                                                         "val_in, val_out")
    add_sampling_args(p, several=True)
    p.add_argument("--sit-weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--vae-weights", choices=["ema", "raw"], default="ema", help="Table 2: 108M (raw) / 108M-EMA")
    p.add_argument("--sample-batch-size", type=BATCH_SIZE, default=32, help="sample.py's --batch-size")
    p.add_argument("--extractors", type=comma_list(EXTRACTORS), default=PAPER_EXTRACTORS,
                   help=f"comma-separated: {', '.join(EXTRACTORS)}")
    p.add_argument("--random-encoder", action="store_true", help="guidance features from an untrained encoder")
    p.add_argument("--jpeg-val", type=number_in(int, 1, 100), default=None, help="JPEG quality of the val tiles (70)")
    p.add_argument("--jpeg-guidance", type=number_in(int, 1, 100), default=None, help="JPEG of the guidance tiles")
    p.add_argument("--jpeg-generated", type=number_in(int, 1, 100), default=None, help="JPEG of the generated tiles")
    M.add_metric_args(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.out = Path(args.out)
    check_guidance(args)
    return args


if __name__ == "__main__":
    run(main)
