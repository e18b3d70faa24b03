"""CytoSyn's evaluation suite: tiles -> features -> FD, precision/recall, cosine similarity, FLD.

CytoSyn §4.1 (the benchmark: FD with several extractors, FLD, improved precision/recall, sample-wise
cosine similarity), §4.3 (preprocessing moves the numbers more than the models: 256 -> 224 centre crop,
JPEG q70 on the real and/or generated tiles, the resize kernel) and §5 (bootstrap of FD: B draws of n
generated samples). Every preprocessing step is an explicit option and is written next to each number
in the JSON report.

    python metrics.py --val VAL_DIR --generated GEN_DIR --extractors fid-inception,h-optimus-0,uni2-h,virchow2
    python bench.py fd                     # our FD vs the scipy.linalg.sqrtm formula, 100k x 1536

Definitions:
    FD     |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)                          (Heusel et al. 2017)
    P / R  share of generated (real) samples inside some real (generated) k-NN ball, k = 3, `<=`
                                                                              (Kynkaanniemi et al. 2019)
    FLD    100 x [NLL(test | MoG centred on generated, variances fit on train) - train-split baseline]
           and its generalisation gap 100 x [NLL(train) - NLL(test)]           (Jiralerspong et al. 2023)
           fit as the authors' code fits it: fld.py
    copy   per generated tile x: d1 = |x - nearest training tile|, d2 to the second nearest, and
           ratio = d1 / (0.5 x mean distance to its 50 nearest); a copy when ratio < 1/3 (Carlini et al.
           2023, §5) and d1 below the held-out tiles' 1st percentile; the whole audit:
           support/memorization.py (evaluate.py --memorization)

The whole benchmark (guidance, sampling, every extractor against val-in and val-out, Table 2's layout):
evaluate.py.

The definitions come first, then a short command line. The extractors and what each sees of a tile:
extractors.py; tiles to features, preprocessed and cached: support/tile_features.py. Left out: KID, AuthPct,
the C_T test (its whole-set form is in copying_test); approximate nearest-neighbour search; multi-GPU extraction.
"""
import functools
import hashlib
import os
import re
import sys
import warnings
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.stats
import torch

from extractors import EXTRACTORS, build_extractor, spec_record, weights_id
from fld import DIST_BUDGET, FLD_EPOCHS, FLD_GEN_SIZE, fld, row_chunks
from support.cli import (
    BATCH_SIZE,
    INF,
    SEED,
    ArgumentParser,
    InputError,
    add_device_args,
    add_workers_arg,
    comma_list,
    number_in,
    run,
)
from support.data import list_images
from support.outputs import atomic, save_json
from support.reports import versions
from support.tile_features import (
    Preprocess,
    check_one_size,
    extract_features,
    note_resizes,
    resize_record,
    same_tiles,
    score_extractors,
)
from support.tiles import RESIZE_KERNELS

PR_K = 3  # nearest neighbours that set a sample's radius (Kynkaanniemi et al. 2019)
# Carlini et al. 2023 §5 (CIFAR-10): a generated image is extracted when its l2 distance to a training image is
# below COPY_THRESHOLD times COPY_SCALE times its mean distance to its COPY_NEIGHBOURS nearest training images.
COPY_NEIGHBOURS, COPY_SCALE, COPY_THRESHOLD = 50, 0.5, 1 / 3
RERANK = 16  # candidates beyond k that the float32 search keeps for the exact float64 distances
FD_GENERATED_SIZE = 50_000  # generated samples FD uses; Jiralerspong et al.'s FID code (the paper's) keeps 50k


# -------- Fréchet distance ---------------------------------------------------------------------
class GaussianStats:
    """Mean and covariance accumulated chunk by chunk in float64.

    The sums are taken around a fixed shift (the first chunk's mean), so S2 - S1 S1^T / n does not cancel
    catastrophically when |mean| >> std; 100k x 2560 features never need a float64 copy."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, x):
        x = np.array(x, dtype=np.float64)  # (N, D), one chunk, always a copy
        if self.shift is None:
            self.shift, self.s1 = x.mean(0), np.zeros(x.shape[1])
            self.s2 = np.zeros((x.shape[1], x.shape[1]))
        x -= self.shift
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x  # (D, D)
        return self

    @property
    def mean(self):
        return self.shift + self.s1 / self.n

    @property
    def cov(self):
        return (self.s2 - np.outer(self.s1, self.s1) / self.n) / (self.n - 1)


def feature_stats(feats, chunk=None):
    if len(feats) < 2:
        raise InputError(f"a covariance needs at least 2 samples, got {len(feats)}")
    chunk, stats = chunk or max(1, DIST_BUDGET // (8 * feats.shape[1])), GaussianStats()  # ~256 MB
    for i in range(0, len(feats), chunk):
        stats.update(feats[i:i + chunk])
    return stats


def _nonneg(w):
    """Eigenvalues of a PSD matrix with those within rounding of 0 set to exactly 0, so their square
    roots add no noise. eigh leaves exact zeros at ~eps max|w| (measured <= 2.4 eps max|w| for d up to
    2560, N < d); the tolerance sqrt(d) eps max|w| clears them and keeps real eigenvalues above it."""
    tol = np.sqrt(len(w)) * np.finfo(np.float64).eps * max(np.abs(w).max(), np.finfo(np.float64).tiny)
    if w.min() < -1e3 * tol:
        warnings.warn(f"covariance is not PSD beyond rounding (eigenvalue {w.min():.3g}); clipped to 0")
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1, cov1, mu2, cov2):
    """FD between N(mu1, S1) and N(mu2, S2).

    Tr (S1 S2)^1/2 = sum sqrt eig(S1^1/2 S2 S1^1/2): that matrix is symmetric PSD and similar to S1 S2, so
    its eigenvalues are those of S1 S2, real and >= 0. No complex sqrtm, and rank-deficient S are fine.
    With S1 = V diag(w) V^T and B = V diag(sqrt w), B^T S2 B = V^T (S1^1/2 S2 S1^1/2) V has them too."""
    w, v = scipy.linalg.eigh(cov1, driver="evd")
    b = v * np.sqrt(_nonneg(w))  # (D, D)
    tr_covmean = np.sqrt(_nonneg(scipy.linalg.eigvalsh(b.T @ cov2 @ b))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


def fd(stats1, stats2):
    for s in (stats1, stats2):
        if s.n < len(s.mean):
            warnings.warn(f"FD from {s.n} samples in {len(s.mean)} dims: the covariance is rank-deficient "
                          "and the estimate is unreliable (biased); use N >> d")
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


def bootstrap_fd(real_stats, generated, draws=50, size=None, seed=0):
    """FD of `draws` random subsets of `size` generated samples (no replacement; paper §5: 50 x 50k of
    100k) against the full real set -> (mean, std (ddof=1), values, the draws as a (draws, N) bool mask:
    row i marks the generated samples of draw i)."""
    size = size or len(generated) // 2
    if not 2 <= size <= len(generated):  # size = all of them: every draw is the whole set, FD itself (std 0)
        raise InputError(f"bootstrap size must be in [2, {len(generated)}] generated samples, got {size}")
    rng = np.random.default_rng(seed)
    subsets = np.zeros((draws, len(generated)), bool)
    for row in subsets:
        row[rng.choice(len(generated), size, replace=False)] = True
    values = [fd(real_stats, feature_stats(generated[row])) for row in subsets]
    std = float(np.std(values, ddof=1)) if draws > 1 else 0.0
    return float(np.mean(values)), std, values, subsets


def save_subsets(out, **arrays):
    """The samples a number was computed on (a bootstrap's draws, FLD's rows, FD's generated budget), as
    OUT/subsets/<digest>.npz, named by its content: rows that drew the same subsets share one file.
    -> its path relative to OUT, for the row's settings."""
    digest = hashlib.sha1()
    for name, array in sorted(arrays.items()):
        digest.update(f"{name} {array.dtype} {array.shape}\n".encode() + np.ascontiguousarray(array).tobytes())
    name = f"subsets/{digest.hexdigest()[:16]}.npz"
    if not os.path.exists(os.path.join(out, name)):
        os.makedirs(os.path.join(out, "subsets"), exist_ok=True)
        with atomic(os.path.join(out, name)) as tmp:
            np.savez_compressed(tmp, **arrays)
    return name


# -------- Improved precision / recall, cosine similarity ---------------------------------------
def knn_radii(x, k):
    """Distance of each row of x (N, D) to its k-th nearest other row -> (N,)."""
    if len(x) <= k:
        raise InputError(f"k = {k} nearest neighbours need more than {k} samples, got {len(x)}")
    radii = torch.empty(len(x), device=x.device)
    for i, j in row_chunks(len(x), len(x)):
        radii[i:j] = torch.cdist(x[i:j], x).kthvalue(k + 1, dim=1).values  # k + 1: itself is at 0
    return radii


def coverage(points, centres, radii):
    """Share of points within radius (`<=`) of at least one centre."""
    inside = 0
    for i, j in row_chunks(len(points), len(centres)):
        inside += (torch.cdist(points[i:j], centres) <= radii[None]).any(1).sum().item()
    return inside / len(points)


def precision_recall(real, generated, k=PR_K, device="cpu"):
    real, generated = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in (real, generated))
    precision = coverage(generated, real, knn_radii(real, k))  # generated samples on the real manifold
    recall = coverage(real, generated, knn_radii(generated, k))  # real samples on the generated manifold
    return precision, recall


SAMPLE_SUFFIX = re.compile(r"_\d{2}$")  # sample.py writes the k-th sample of x.png as x_kk.png


def paired_cosine(real_stems, real, gen_stems, generated):
    """Cosine similarity of each generated tile with the real tile that conditioned it -> (mean, std, n).

    A generated tile pairs with the real tile of the same stem, or of its stem less sample.py's sample
    suffix: x_00.png, x_01.png ... all pair with x.png."""
    for stems, name in ((real_stems, "real"), (gen_stems, "generated")):
        if len(set(stems)) != len(stems):
            raise InputError(f"two {name} tiles share a file stem; cosine pairing needs unique names")
    index = {s: i for i, s in enumerate(real_stems)}
    pairs = []
    for j, s in enumerate(gen_stems):
        i = index.get(s, index.get(SAMPLE_SUFFIX.sub("", s)))
        if i is not None:
            pairs.append((i, j))
    if not pairs:
        raise InputError("no generated tile has the stem of a real tile; name each generated tile after "
                         "the real tile whose features conditioned it (val/x.png -> gen/x.png or gen/x_00.png)")
    ri, fi = map(list, zip(*pairs))
    a, b = real[ri].astype(np.float64), generated[fi].astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean()), float(cos.std()), len(pairs)


def row_cosines(a, b):
    """Cosine similarity of each row of a with the same row of b -> (N,), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def seam_scores(centre_synthetic, boundary_synthetic=None, centre_real=None, boundary_real=None):
    """Do a region twin's windows show (sample.py --region)? Features of its tiles at the windows ("centre") and
    across window boundaries ("boundary", support/region.py: seam_crops), and of the real region's tiles at the
    same places -> fd_synthetic, FD(boundary tiles, centre tiles) of the twin; fd_real, the same for the real
    region (the level that different places give without any seam); cosine_centre / cosine_boundary, the mean
    paired cosine of twin and real tiles at the same place. Seams show as fd_synthetic above fd_real, and
    cosine_boundary below cosine_centre. None where a set is missing or too small."""
    def fd_of(a, b):
        return None if a is None or b is None or min(len(a), len(b)) < 2 else \
            fd(feature_stats(a), feature_stats(b))

    def cosine(a, b):
        return None if a is None or b is None else float(row_cosines(a, b).mean())
    return dict(fd_synthetic=fd_of(boundary_synthetic, centre_synthetic), fd_real=fd_of(boundary_real, centre_real),
                cosine_centre=cosine(centre_synthetic, centre_real), cosine_boundary=cosine(boundary_synthetic,
                                                                                            boundary_real),
                n_centre=len(centre_synthetic), n_boundary=0 if boundary_synthetic is None else len(boundary_synthetic))


# -------- Memorisation: each generated tile's nearest training tiles ----------------------------
def nearest_neighbours(queries, refs, k, device="cpu"):
    """Exact l2 search: the k nearest rows of refs (M, D) for each row of queries (N, D) -> (distances (N, k)
    float64, ascending; their row indices (N, k)). Chunks of queries against all refs, |q|^2 + |r|^2 - 2 q.r
    in float32 on `device` (a GPU when there is one), keep k + RERANK candidates; their distances are then
    computed again in float64 from the vectors, so an exact copy lies at 0 and rounding cannot reorder the k."""
    q, r = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in (queries, refs))
    k, pool = min(k, len(r)), min(k + RERANK, len(r))
    r_sq = (r * r).sum(1)  # (M,)
    dists, index = np.empty((len(q), k)), np.empty((len(q), k), np.int64)
    for i, j in row_chunks(len(q), len(r)):
        sq = (q[i:j] * q[i:j]).sum(1, keepdim=True) + r_sq - 2 * q[i:j] @ r.T  # (n, M) squared distances
        candidates = sq.topk(pool, dim=1, largest=False).indices  # (n, pool)
        exact = (q[i:j, None].double() - r[candidates].double()).norm(dim=2)  # (n, pool), float64
        order = exact.argsort(dim=1)[:, :k]
        dists[i:j], index[i:j] = exact.gather(1, order).cpu().numpy(), candidates.gather(1, order).cpu().numpy()
    return dists, index


def copy_distances(queries, train, device="cpu", n=COPY_NEIGHBOURS, scale=COPY_SCALE):
    """Each query's nearest training rows -> {d1: distance to the nearest, d2: to the second (nan with one training
    row), ratio: d1 / (scale x mean distance to its n nearest, the nearest included; Carlini et al. 2023 §5),
    nearest: the nearest's index}. A query as near to n training rows as to one (duplicates) has ratio 0."""
    dists, index = nearest_neighbours(queries, train, max(n, 2), device)
    local = scale * dists[:, :n].mean(1)
    ratio = np.divide(dists[:, 0], local, out=np.zeros(len(dists)), where=local > 0)
    d2 = dists[:, 1] if dists.shape[1] > 1 else np.full(len(dists), np.nan)
    return dict(d1=dists[:, 0], d2=d2, ratio=ratio, nearest=index[:, 0])


def copying_test(generated_d1, heldout_d1):
    """Meehan et al. 2020's data-copying test on the whole set: generated tiles nearer to the training set than
    held-out real tiles are, by a Mann-Whitney U test -> {nearer_share: U / (n_gen n_heldout), the chance that a
    generated tile is nearer than a held-out one (0.5: no copying), p_value: one-sided, generated nearer}."""
    u, p = scipy.stats.mannwhitneyu(generated_d1, heldout_d1, alternative="less")
    return dict(nearer_share=1 - float(u) / (len(generated_d1) * len(heldout_d1)), p_value=float(p))


# -------- Command line -------------------------------------------------------------------------
SETS = ("val", "generated", "guidance")  # the tile sets a comparison names, as evaluate.py names them


def score_folders(name, args, preps, device):
    """Every requested metric for one extractor -> rows {extractor, metric, value, ..., settings}."""
    spec, weights = EXTRACTORS[name], weights_id(name, not args.random_weights, args.seed)
    bf16 = device.type == "cuda" and (args.precision == "bf16" or (args.precision == "auto" and spec.bf16_ok))
    get = functools.cache(lambda: build_extractor(name, not args.random_weights, device, args.seed))
    feats = functools.partial(extract_features, spec=spec, get_extractor=get, bf16=bf16, device=device,
                              identity=dict(extractor=name, spec=spec_record(spec), weights=weights),
                              batch_size=args.batch_size, workers=args.num_workers,
                              cache_dir=None if args.no_cache else args.cache_dir)
    folders = {s: getattr(args, s) for s in SETS if getattr(args, s)}
    sizes = {s: check_one_size(folder, [Path(p) for p in list_images(folder)], preps[s])
             for s, folder in folders.items()}
    resize = {s: resize_record(sizes[s], spec, preps[s]) for s in folders}
    note_resizes(name, {s: (sizes[s], resize[s]) for s in folders}, preps["val"])
    val_stems, val = feats(args.val, prep=preps["val"])
    gen_stems, gen = feats(args.generated, prep=preps["generated"])
    base = dict(extractor=spec_record(spec), weights=weights, resize=resize, degenerate=args.degenerate,
                precision="bf16" if bf16 else "fp32", device=str(device), val=str(args.val),
                generated=str(args.generated), n_val=len(val), n_generated=len(gen), seed=args.seed,
                preprocess={k: {**asdict(p), "kernel": p.kernel or spec.kernel} for k, p in preps.items()})
    rows = []

    def add(metric, value, std=None, **settings):
        rows.append(dict(extractor=name, metric=metric, value=value, std=std, settings={**base, **settings}))

    rng = np.random.default_rng(args.seed)
    if "fd" in args.metrics:
        if not args.fd_num_generated or len(gen) <= args.fd_num_generated:
            add("fd", fd(feature_stats(val), feature_stats(gen)), n_generated_used=len(gen))
        else:  # the budget: a seeded subset, recorded (OUT/subsets, a (N,) mask of the rows used)
            used = np.zeros(len(gen), bool)
            used[rng.choice(len(gen), args.fd_num_generated, replace=False)] = True
            add("fd", fd(feature_stats(val), feature_stats(gen[used])), n_generated_used=int(used.sum()),
                subsets=save_subsets(args.out, generated=used))
    if "bootstrap" in args.metrics and args.bootstrap_draws:
        size = args.bootstrap_num_generated or len(gen) // 2
        mean, std, values, drawn = bootstrap_fd(feature_stats(val), gen, args.bootstrap_draws, size, args.seed)
        add("fd_bootstrap", mean, std, draws=args.bootstrap_draws, size=size, values=values,
            subsets=save_subsets(args.out, bootstrap=drawn))
    if "pr" in args.metrics:
        p, r = precision_recall(val, gen, args.k, device)
        add("precision", p, k=args.k)
        add("recall", r, k=args.k)
    if "cosine" in args.metrics:
        mean, std, n_pairs = paired_cosine(val_stems, val, gen_stems, gen)
        add("cosine", mean, std, n_pairs=n_pairs)
    if "fld" in args.metrics:
        _, guidance = feats(args.guidance, prep=preps["guidance"])
        out = fld(guidance, val, gen, args.fld_num_generated, FLD_EPOCHS, args.seed, device)
        subsets = save_subsets(args.out, **out.pop("subsets"))
        extra = dict(guidance=str(args.guidance), n_guidance=len(guidance), epochs=FLD_EPOCHS, **out, subsets=subsets)
        add("fld", out["fld"], **extra)
        add("fld_gap", out["fld_gap"], **extra)
    return rows


def print_table(rows, skipped):
    print(f"\n{'extractor':<12} {'metric':<13} {'value':>12} {'± std':>9} {'n_val':>8} {'n_gen':>8}")
    for r in rows:
        std = "" if r["std"] is None else f"{r['std']:.4f}"
        print(f"{r['extractor']:<12} {r['metric']:<13} {r['value']:>12.4f} {std:>9} "
              f"{r['settings']['n_val']:>8} {r['settings']['n_generated']:>8}")
    for s in skipped:
        print(f"skipped: {s['error']}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.random_weights:
        print("WARNING: --random-weights: untrained extractors; the numbers only test the pipeline", file=sys.stderr)
    preps = {s: Preprocess(getattr(args, f"jpeg_{s}"), args.crop, args.resize_kernel, args.resize_to_input)
             for s in SETS}
    args.degenerate = same_tiles(args.val, args.generated)
    if args.degenerate:
        print(f"WARNING: --val and --generated hold the same tiles ({args.val}, {args.generated}): a degenerate "
              f"comparison (FD 0 by construction); flagged as degenerate in the report", file=sys.stderr)
    rows, skipped = score_extractors(args.extractors, lambda name: score_folders(name, args, preps, device))
    print_table(rows, skipped)
    report = dict(date=str(date.today()), argv=sys.argv if argv is None else argv, results=rows,
                  degenerate=args.degenerate, skipped=skipped, versions=versions())
    os.makedirs(args.out, exist_ok=True)
    save_json(report, os.path.join(args.out, "metrics.json"))
    print(f"wrote {os.path.join(args.out, 'metrics.json')}")
    return 1 if skipped else 0


METRICS = ("fd", "pr", "cosine", "fld", "bootstrap")


def add_metric_args(p):
    """The settings metrics.py and evaluate.py share: preprocessing (§4.3), the metrics' own, the extractors."""
    p.add_argument("--jpeg-val", type=number_in(int, 1, 100), default=None,
                   help="re-encode the val tiles as JPEG at this quality (DS-MIL writes 70)")
    p.add_argument("--jpeg-guidance", type=number_in(int, 1, 100), default=None, help="the same for the guidance tiles")
    p.add_argument("--jpeg-generated", type=number_in(int, 1, 100), default=None,
                   help="the same for the generated tiles")
    p.add_argument("--crop", type=number_in(int, 1, 4096), default=None,
                   help="centre-crop every tile to this size (256 -> 224)")
    p.add_argument("--resize-to-input", action="store_true",
                   help="tiles of several sizes: resize each straight to the extractor's input size")
    p.add_argument("--resize-kernel", choices=list(RESIZE_KERNELS), default=None,
                   help="kernel to the extractor's input size (default: each extractor's own)")
    p.add_argument("--k", type=number_in(int, 1, 1000), default=PR_K, help="nearest neighbours for precision / recall")
    p.add_argument("--bootstrap-draws", type=number_in(int, 0, 100_000), default=50, help="paper §5: 50 (0: none)")
    p.add_argument("--bootstrap-num-generated", type=number_in(int, 2, INF),
                   help="generated samples per bootstrap draw (default: half of them)")
    p.add_argument("--fld-num-generated", type=number_in(int, 2, INF), default=FLD_GEN_SIZE,
                   help="generated samples FLD centres its mixture on, at most")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights instead of the hub's (pipeline checks, offline)")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=64, help="tiles per extractor batch")
    add_workers_arg(p)
    p.add_argument("--seed", type=SEED, default=0)
    add_device_args(p)


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--val", type=Path, required=True, help="real held-out tiles (the val set; FLD's test set)")
    p.add_argument("--generated", type=Path, required=True, help="generated tiles")
    p.add_argument("--guidance", type=Path, help="training tiles, those the generator conditioned on (FLD's train set)")
    p.add_argument("--extractors", type=comma_list(EXTRACTORS), default=["fid-inception"],
                   help=f"comma-separated: {', '.join(EXTRACTORS)}")
    p.add_argument("--metrics", type=comma_list(METRICS), default=["fd", "pr"],
                   help=f"comma-separated: {', '.join(METRICS)}")
    p.add_argument("--fd-num-generated", type=number_in(int, 0, INF), default=FD_GENERATED_SIZE,
                   help="generated samples FD uses, at most (0: all)")
    add_metric_args(p)
    p.add_argument("--cache-dir", type=Path, default=Path("results/features"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default="results/metrics", help="folder of the report, metrics.json")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if "fld" in args.metrics and args.guidance is None:
        raise InputError("--metrics fld needs --guidance TILES (the training tiles the generator conditioned on)")
    return args


if __name__ == "__main__":
    run(main)
