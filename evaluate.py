"""The paper's benchmark in one resumable command (CytoSyn §4.1-§4.3, §5; Tables 2-5, Figure 4).

    python evaluate.py --ckpt CKPT --tiles TILING_OUT --out DIR                          # Table 2
    torchrun --nproc_per_node=8 evaluate.py --ckpt CKPT --tiles TILING_OUT --out DIR     # sampling on 8 GPUs
    python evaluate.py ... --num-sampling-steps 20,50,100,250 --sampler ode,sde           # + Figure 4
    python evaluate.py ... --ood sparc=SPARC_TILING_OUT --num-ood 50000                   # + Table 3
    python evaluate.py --generated MODEL_TILES --pairs PAIRS.csv --tiles TILING_OUT --out DIR   # Table 4
    python evaluate.py --compare DIR_A DIR_B ... --out DIR                                # runs side by side
    python evaluate.py ... --memorization                          # + does any generated tile copy a training tile?

1. Guidance: --num-guidance training tiles of the manifest (paper: 100 k), stratified by TSS, linked as
   DIR/guidance/000000.png ...; their CLS features (the checkpoint's H0-mini) in cls.npy.
2. One generated tile per guidance tile, by sample.py itself (`sample.main`: torchrun ranks, resumable):
   DIR/generated/SAMPLER-STEPS/. Paper defaults: SDE, 250 steps, cfg 2.5 on t in [0, 0.75].
3. For each extractor, against val-in and val-out: FD, FLD (train: the guidance tiles), precision / recall,
   the paired cosine of each generated tile with its guidance tile (and a shuffled pairing, its chance level),
   the bootstrap of FD (Table 5), and the "guidance vs val" baseline row (Table 2).
4. DIR/report.md laid out like Table 2, DIR/report.json with every setting next to every number, Figure 4
   (fd_vs_steps.png and .json); every random subset behind a number in DIR/subsets/, so that each number can be
   recomputed from the features alone.

--ood cohorts (Table 3) are split by support/tile_sets.py; --generated scores another model's tiles with the
same recorded preprocessing (Table 4); --compare puts finished runs in one table (support/reports.py);
--memorization audits the generated tiles against the training tiles (support/memorization.py). Features are
cached in DIR/features: a rerun recomputes nothing finished. The whole benchmark: docs/evaluation.md.
Left out: multi-GPU feature extraction, KID, --ood with --generated.
"""
import functools
import os
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

import metrics as M
import sample
from extractors import EXTRACTORS, build_extractor, spec_record, weights_id
from features import load_encoder
from fld import FLD_EPOCHS, fld
from support.cli import (
    BATCH_SIZE,
    INF,
    ArgumentParser,
    InputError,
    MissingInput,
    add_sampling_args,
    check_guidance,
    comma_list,
    number_in,
    processes,
    run,
)
from support.data import list_images
from support.manifests import check_listed_tiles, read_manifest_rows
from support.memorization import audit
from support.outputs import check_output_folder, claim_output_folder, read_csv, save_csv, save_npy
from support.reports import BASELINE, VAL_SETS, run_info, run_name, write_comparison, write_reports
from support.tile_features import (
    Preprocess,
    check_one_size,
    extract_features,
    note_resizes,
    resize_record,
    score_extractors,
)
from support.tile_sets import link_folder, parse_ood, plan_ood, write_ood
from support.tiles import TILE_MPP
from support.trackers import TRACKERS, log_benchmark, require, tracker_run

PAPER_EXTRACTORS = ["h-optimus-0", "virchow2", "uni2-h", "fid-inception"]  # Table 2's four, pytorch-fid's Inception

# A set of tiles to score: its reference sets {val name: folder}, its guidance folder and its generated
# runs {row label: Generated}; name is None for --tiles' own guidance, else the --ood NAME.
Cohort = namedtuple("Cohort", "name source guidance references runs")
# A folder of generated tiles; names: the stem each tile pairs under (None: its own; paired False: no cosine).
Generated = namedtuple("Generated", "folder settings names paired")


# -------- Guidance and validation tiles from the tiling manifest -----------------------------------
def manifest_rows(tiles):
    """Every row of tiling.py's manifest (support/data.py reads it), with the tile's path."""
    path = Path(tiles) / "manifest.csv"
    if not path.exists():
        raise MissingInput(f"--tiles {tiles}: no manifest.csv; pass the output folder of tiling.py")
    column, rows = read_manifest_rows(path, split=None)
    if "split" not in rows[0]:
        raise InputError(f"{path} has no 'split' column; write it with tiling.py")
    for row in rows:
        row["file"], row["path"] = row[column], str(Path(tiles) / row[column])
    check_listed_tiles(path, [r["file"] for r in rows], [r["path"] for r in rows])  # before anything runs
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


def select_tiles(args):
    """-> (the guidance rows, the --pairs pairing or None, {val set: rows}), checked; nothing written."""
    rows = manifest_rows(args.tiles)
    train = [r for r in rows if r["split"] == "train"]
    for split in args.val_sets:
        if not any(r["split"] == split for r in rows):
            raise InputError(f"{args.tiles} has no {split} rows: tile with held-out slides (tiling.py --val-out "
                             f"/ --val-in), or evaluate against the others with --val-sets")
    vals = {split: [r for r in rows if r["split"] == split] for split in args.val_sets}
    if args.pairs:
        return *read_pairs(args, train), vals
    if len(train) < args.num_guidance:
        raise InputError(f"{args.tiles} has {len(train)} training tiles, fewer than --num-guidance "
                         f"{args.num_guidance}: lower --num-guidance or tile more slides")
    return stratified(train, args.num_guidance, args.seed), None, vals


def read_pairs(args, train):
    """--pairs CSV (generated,guidance) -> (the training rows it names, sorted by path; the stem each generated
    tile of DIR pairs under: GUIDANCE-INDEX_KK, or unpaired-J). Refused before anything is written: a file
    that is not there, a guidance tile that is not a training row, and a generated tile paired with two
    guidance tiles (ambiguous); a repeated identical row is kept once, with a note."""
    table = read_csv(args.pairs)
    if not table or not {"generated", "guidance"} <= set(table[0]):
        raise InputError(f"--pairs {args.pairs}: needs the columns generated,guidance and a row per generated tile")
    unused = [c for c in table[0] if c not in ("generated", "guidance")]
    if unused:
        print(f"note: --pairs {args.pairs}: column(s) {', '.join(unused)} not used (only generated,guidance are read)",
              flush=True)
    generated = [os.path.relpath(p, args.generated) for p in list_images(args.generated)]
    generated_set, train_by_file = set(generated), {os.path.normpath(r["file"]): r for r in train}
    pairs, repeats = {}, 0
    for i, row in enumerate(table, start=2):  # line numbers of the CSV, header = 1
        gen, guide = os.path.normpath(row["generated"] or ""), os.path.normpath(row["guidance"] or "")
        if gen not in generated_set:
            raise MissingInput(f"--pairs {args.pairs} line {i}: generated tile {gen!r} is not in {args.generated}")
        if guide not in train_by_file:
            what = "is not a training row of" if (args.tiles / guide).is_file() else "is not in"
            raise MissingInput(f"--pairs {args.pairs} line {i}: guidance tile {guide!r} {what} "
                               f"{args.tiles}/manifest.csv")
        if pairs.get(gen, guide) != guide:
            raise InputError(f"--pairs {args.pairs} line {i}: generated tile {gen!r} is paired with both "
                             f"{pairs[gen]!r} and {guide!r}: ambiguous; keep one row per generated tile")
        repeats += gen in pairs
        pairs[gen] = guide
    if repeats:
        print(f"note: --pairs {args.pairs} repeats {repeats} identical row(s); each pair counts once", flush=True)
    guidance = sorted({guide: train_by_file[guide] for guide in pairs.values()}.values(), key=lambda r: r["path"])
    index, count, names = {os.path.normpath(r["file"]): i for i, r in enumerate(guidance)}, {}, []
    for j, gen in enumerate(generated):  # paired_cosine pairs x_KK with x
        guide = pairs.get(gen)
        count[guide] = count.get(guide, -1) + 1
        names.append(f"{index[guide]:06d}_{count[guide]:02d}" if guide else f"unpaired-{j:06d}")
    return guidance, dict(pairs=str(args.pairs), n_pairs=len(pairs), repeated_rows=repeats, names=names)


def audit_tiles(args, guidance):
    """--memorization's training tiles: the guidance tiles (they conditioned the samples), then training rows
    stratified by TSS, up to --num-train in all."""
    chosen = {r["path"] for r in guidance}
    others = [r for r in manifest_rows(args.tiles) if r["split"] == "train" and r["path"] not in chosen]
    n = min(len(others), args.num_train - len(guidance))
    return guidance + (stratified(others, n, args.seed) if n > 0 else [])


def link_tiles(args, guidance, vals):
    """DIR/guidance (000000.png ...), DIR/val_in, DIR/val_out and DIR/guidance.csv."""
    link_folder(args.out / "guidance", [(f"{i:06d}", r["path"]) for i, r in enumerate(guidance)])
    for split, rows in vals.items():
        link_folder(args.out / split, [(Path(r["path"]).stem, r["path"]) for r in rows])
    save_csv([dict(name=f"{i:06d}", tss=r.get("tss", ""), file=r["file"]) for i, r in enumerate(guidance)],
             args.out / "guidance.csv", ["name", "tss", "file"])


@torch.no_grad()
def guidance_features(args, paths, folder, device):
    """folder/cls.npy: the CLS features of the guidance tiles from the checkpoint's encoder, as
    sample.py --cond computes them (centre crop to the model's tile size); kept once written."""
    out = folder / "cls.npy"
    if out.exists():
        if len(np.load(out, mmap_mode="r")) != len(paths):
            raise InputError(f"{out} holds features of another guidance set (not {len(paths)} tiles): choose "
                             f"another --out")
        return out
    pipe = sample.load_pipeline(args.ckpt, device)
    if args.random_weights:  # an untrained H0-mini (pipeline checks); the "tiny" one is random anyway
        pipe.encoder = load_encoder(pipe.encoder_name, pretrained=False, seed=pipe.encoder_seed).to(device)
    source = sample.TileSource(paths, pipe.tile_size, TILE_MPP)
    feats = [source.features(list(range(i, min(i + args.batch_size, len(paths)))), pipe).cpu().numpy()
             for i in range(0, len(paths), args.batch_size)]
    save_npy(np.concatenate(feats).astype(np.float32), out)  # atomic: a killed run leaves no half-written array
    return out


def generate_tiles(args, cls_path, folder, sampler, steps):
    """One generated tile per guidance feature, by sample.py (resumable, torchrun-aware)."""
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
    the chance level the paired cosine must beat -> (mean, std, n pairs, the order: real row i stands in for
    real row order[i])."""
    order = np.random.default_rng(seed).permutation(len(real))
    for i in range(len(order) if len(order) > 1 else 0):
        if order[i] == i:  # a tile paired with itself: swap with the next, so that no pairing is the true one
            j = (i + 1) % len(order)
            order[i], order[j] = order[j], order[i]
    return *M.paired_cosine(real_stems, real[order], gen_stems, gen), order


def score_set(add, real, gen, train, args, device, with_fld=True):
    """FD, its bootstrap, precision / recall and FLD of one (real, generated) pair of feature sets; the rows
    a bootstrap or FLD drew are recorded in DIR/subsets, named by the row's settings.subsets."""
    stats = M.feature_stats(real)
    add("fd", M.fd(stats, M.feature_stats(gen)))
    if len(gen) >= 4 and args.bootstrap_draws:
        size = args.bootstrap_num_generated or len(gen) // 2
        mean, std, _, drawn = M.bootstrap_fd(stats, gen, args.bootstrap_draws, size, args.seed)
        add("fd_bootstrap", mean, std, draws=args.bootstrap_draws, size=size,
            subsets=M.save_subsets(args.out, bootstrap=drawn))
    precision, recall = M.precision_recall(real, gen, args.k, device)
    add("precision", precision, k=args.k)
    add("recall", recall, k=args.k)
    if with_fld:
        out = fld(train, real, gen, args.fld_num_generated, FLD_EPOCHS, args.seed, device)
        subsets = M.save_subsets(args.out, **out.pop("subsets"))
        add("fld", out["fld"], **out, subsets=subsets)


def score_extractor(name, args, cohorts, device):
    """Every row of one extractor: in each cohort, the baseline (its guidance tiles) and each generated run
    against each of its reference sets, and each run's paired cosine."""
    spec, pretrained = EXTRACTORS[name], not args.random_weights
    weights = weights_id(name, pretrained, args.seed)
    get = functools.cache(lambda: build_extractor(name, pretrained, device, args.seed))
    feats = functools.partial(extract_features, spec=spec, get_extractor=get, device=device,
                              identity=dict(extractor=name, spec=spec_record(spec), weights=weights),
                              batch_size=args.batch_size, workers=args.num_workers, cache_dir=args.out / "features")
    preps = {s: Preprocess(getattr(args, f"jpeg_{s}"), args.crop, args.resize_kernel, args.resize_to_input)
             for s in ("val", "guidance", "generated")}

    seen = {}  # each set's tile size and resize, for the note on sets of different sizes

    def measure(folder, kind):  # -> (stems, features, how they reached the extractor's input size)
        size = check_one_size(folder, [Path(p) for p in list_images(folder)], preps[kind])
        seen[os.path.relpath(folder, args.out)] = size, resize_record(size, spec, preps[kind])
        return *feats(folder, prep=preps[kind]), seen[os.path.relpath(folder, args.out)][1]

    rows = []
    for cohort in cohorts:
        guide_stems, guide, guide_resize = measure(cohort.guidance, "guidance")
        refs = {val: measure(folder, "val") for val, folder in cohort.references.items()}
        base = dict(extractor_spec=spec_record(spec), weights=weights, device=str(device), seed=args.seed,
                    preprocess={k: {**vars(p), "kernel": p.kernel or spec.kernel} for k, p in preps.items()},
                    resize={"guidance": guide_resize, **{v: r[2] for v, r in refs.items()}},
                    cohort=cohort.name or "tiles", reference=cohort.source, n_guidance=len(guide))

        def adder(label, val, n_gen, **extra):
            def add(metric, value, std=None, **settings):
                rows.append(dict(row=label, extractor=name, val=val, metric=metric, value=value, std=std,
                                 settings={**base, **extra, "n_val": len(refs[val][1]) if val in refs else None,
                                           "n_generated": n_gen, **settings}))
            return add

        for val, (_, real, _) in refs.items():  # the baseline row: the guidance tiles themselves
            score_set(adder(BASELINE, val, len(guide)), real, guide, None, args, device, with_fld=False)
        for label, gen_run in cohort.runs.items():
            gen_stems, gen, resize = measure(gen_run.folder, "generated")
            settings = {**gen_run.settings, "resize_generated": resize}
            if gen_run.paired:  # cosine rows: val is the cohort (None: --tiles' guidance)
                add, gen_stems = adder(label, cohort.name, len(gen), **settings), gen_run.names or gen_stems
                mean, std, n = M.paired_cosine(guide_stems, guide, gen_stems, gen)
                add("cosine", mean, std, n_pairs=n, n_val=None)  # no val set: generated vs guidance tiles
                mean, std, n, order = shuffled_cosine(guide_stems, guide, gen_stems, gen, args.seed)
                add("cosine_shuffled", mean, std, n_pairs=n, n_val=None,
                    subsets=M.save_subsets(args.out, order=order))
            for val, (_, real, _) in refs.items():
                score_set(adder(label, val, len(gen), **settings), real, gen, guide, args, device)
    if args.memorization:  # each generated tile's nearest training tiles (support/memorization.py)
        rows += audit(name, args, cohorts[0], measure, functools.partial(M.copy_distances, device=device),
                      M.copying_test)
    note_resizes(name, seen, preps["val"])
    return rows


def sampled_runs(args, cls_path, folder):
    """{row label: Generated} of every --sampler x --num-sampling-steps, sampled into folder/SAMPLER-STEPS."""
    return {run_name(s, n): Generated(generate_tiles(args, cls_path, folder / f"{s}-{n}", s, n), dict(
        ckpt=str(args.ckpt), sampler=s, num_sampling_steps=n, cfg_scale=args.cfg_scale, sit_weights=args.sit_weights,
        vae_weights=args.vae_weights, guidance_interval=[args.guidance_low, args.guidance_high]), None, True)
        for s in args.sampler for n in args.num_sampling_steps}


def external_run(args, pairing):
    """{row label: Generated} of --generated: another model's tiles, its sampling settings unknown here."""
    unknown = dict.fromkeys(("sampler", "num_sampling_steps", "cfg_scale", "sit_weights", "vae_weights",
                             "guidance_interval"))
    settings = dict(generated=str(args.generated), pairs=pairing and pairing["pairs"], **unknown)
    label = f"{Path(args.generated).resolve().name} (--generated)"
    return {label: Generated(args.generated, settings, pairing and pairing["names"], pairing is not None)}


def set_sizes(args, guidance, vals):
    """--generated: the tile size of each set (each must have one, or --crop / --resize-to-input)."""
    sets = {"guidance": [r["path"] for r in guidance], **{v: [r["path"] for r in rows] for v, rows in vals.items()},
            "generated": list_images(args.generated)}
    if not sets["generated"]:
        raise MissingInput(f"--generated {args.generated}: no tiles (PNG, JPEG or TIFF) inside")
    prep = Preprocess(crop=args.crop, resize_to_input=args.resize_to_input)
    return {k: check_one_size(f"{k} tiles", files, prep) for k, files in sets.items()}  # each extractor notes them


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        write_comparison(args.compare, args.out)
        return 0
    # one process group for the whole run (torchrun): sample.py's runs join it, not each its own
    with processes(args.device, args.num_workers) as (rank, world, device):
        inputs = {"--tiles": [args.tiles], "--generated": [args.generated], "--pairs": [args.pairs],
                  "--ood": list(args.ood.values())}
        inputs = {k: [str(p) for p in v if p] for k, v in inputs.items()}
        check_output_folder(str(args.out), inputs)
        guidance, pairing, vals = select_tiles(args)  # everything is checked before anything is written
        ood = plan_ood(args)
        info = run_info(args, guidance, pairing, ood, set_sizes(args, guidance, vals) if args.generated else None)
        claim_output_folder(str(args.out), inputs)  # created, checked writable, locked for the run (rank 0)
        if rank == 0:
            link_tiles(args, guidance, vals)
            for name, plan in ood.items():
                write_ood(args, name, plan)
            if args.memorization:  # the training tiles of the audit (support/memorization.py)
                link_folder(args.out / "train", [(f"{i:06d}", r["path"]) for i, r in enumerate(audit_tiles(args,
                                                                                                         guidance))])
        cohorts = [Cohort(None, str(args.tiles), args.out / "guidance", {v: args.out / v for v in vals}, {})]
        cohorts += [Cohort(name, plan["path"], args.out / "ood" / name / "guidance",
                           {name: args.out / "ood" / name / "reference"}, {}) for name, plan in ood.items()]
        if args.generated:
            cohorts[0].runs.update(external_run(args, pairing))
        else:
            paths = [[r["path"] for r in guidance]] + [[t["path"] for t in p["halves"]["guidance"]]
                                                       for p in ood.values()]
            # rank 0 writes the guidance features; the other ranks wait for them
            cls = [guidance_features(args, p, c.guidance, device) if rank == 0 else wait_for(c.guidance / "cls.npy")
                   for c, p in zip(cohorts, paths)]
            for c, cls_path in zip(cohorts, cls):
                c.runs.update(sampled_runs(args, cls_path, c.guidance.parent / "generated"))
        if rank != 0:
            return 0
        rows, skipped = score_extractors(args.extractors, lambda name: score_extractor(name, args, cohorts, device))
    write_reports(rows, skipped, args, argv, info)
    if args.tracker:  # the numbers and Figure 4 into the training run's TensorBoard / W&B, at the checkpoint's step
        log_benchmark(args.tracker, args.tracker_run, args.out, args.ckpt)
    return 1 if skipped and not rows else 0


def wait_for(path, poll=5.0):
    while not path.exists():
        time.sleep(poll)
    return path


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="checkpoint from train.py (or what sample.py --ckpt takes): sample its tiles and "
                                  "score them")
    p.add_argument("--generated", type=Path, help="score the tiles of this folder (another model's), sampling nothing")
    p.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR", help="one table of finished runs' reports")
    p.add_argument("--tiles", help="tiling.py's output folder (manifest.csv inside)")
    p.add_argument("--out", required=True, help="everything the benchmark writes; a rerun resumes")
    p.add_argument("--num-guidance", type=number_in(int, 2, INF), default=100_000, help="paper: 100k")
    p.add_argument("--pairs", type=Path, help="with --generated: CSV generated,guidance (paths relative to "
                                              "--generated and --tiles) for the paired cosine")
    p.add_argument("--ood", action="append", metavar="NAME=PATH", help="an out-of-distribution cohort (tiling "
                   "output or folder of tiles), split into guidance and reference halves; repeatable (Table 3)")
    p.add_argument("--num-ood", type=number_in(int, 2, INF), default=50_000, help="tiles per --ood half, at most "
                                                                                  "(paper: 50k)")
    p.add_argument("--val-sets", type=comma_list(VAL_SETS), default=list(VAL_SETS), help="comma-separated: "
                                                                                         "val_in, val_out")
    add_sampling_args(p, several=True)
    p.add_argument("--sit-weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--vae-weights", choices=["ema", "raw"], default="ema", help="Table 2: 108M (raw) / 108M-EMA")
    p.add_argument("--sample-batch-size", type=BATCH_SIZE, default=32, help="sample.py's --batch-size")
    p.add_argument("--extractors", type=comma_list(EXTRACTORS), default=PAPER_EXTRACTORS,
                   help=f"comma-separated: {', '.join(EXTRACTORS)}")
    p.add_argument("--memorization", action="store_true", help="audit every generated tile against its nearest "
                   "training tiles (DIR/memorization.md)")
    p.add_argument("--num-train", type=number_in(int, 2, INF), default=1_000_000, help="--memorization: training "
                   "tiles compared with, at most (the guidance tiles, then rows stratified by TSS)")
    M.add_metric_args(p)
    p.add_argument("--tracker", choices=TRACKERS, default=None, help="also log the numbers and Figure 4 to the "
                   "training run's TensorBoard or Weights & Biases run (with --ckpt)")
    p.add_argument("--tracker-run", metavar="RUN_DIR", help="--tracker: the train.py --out folder (default: the one "
                   "--ckpt lies in, RUN_DIR/checkpoints/)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.out, args.tiles = Path(args.out), args.tiles and Path(args.tiles)
    check_guidance(args)
    modes = [flag for flag in ("--ckpt", "--generated", "--compare") if getattr(args, flag[2:])]
    if len(modes) != 1:
        raise InputError((f"{' and '.join(modes)} together" if modes else "nothing to do") + ": pass one of --ckpt "
                         "(sample tiles and score them), --generated (score another model's tiles) or --compare (one "
                         "table of finished runs)")
    if args.compare and (args.tiles or args.ood or args.pairs):
        raise InputError("--compare reads finished runs' report.json; it takes no --tiles, --ood or --pairs")
    if not args.compare and args.tiles is None:
        raise InputError(f"{modes[0]} needs --tiles TILING_OUT (tiling.py's output: the guidance and val tiles)")
    if args.pairs and not args.generated:
        raise InputError("--pairs pairs the tiles of --generated with their guidance tiles; sampled runs pair by name")
    if args.pairs and not args.pairs.is_file():
        raise MissingInput(f"--pairs {args.pairs}: no such file (a CSV with the columns generated,guidance)")
    if args.ood and not args.ckpt:
        raise InputError("--ood samples from each cohort's guidance half: it needs --ckpt")
    args.ood = parse_ood(args.ood)
    if args.tracker_run and not args.tracker or args.tracker and not args.ckpt:
        raise InputError("--tracker logs a checkpoint's benchmark (--ckpt) to its training run; --tracker-run goes "
                         "with --tracker")
    if args.tracker:
        args.tracker_run = tracker_run(args.ckpt, args.tracker_run)
        require(args.tracker)
    return args


if __name__ == "__main__":
    run(main)
