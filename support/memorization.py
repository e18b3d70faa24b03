"""The memorisation audit of evaluate.py --memorization: does any generated tile copy a training tile?

FD and FLD measure novelty over a whole set; this answers per tile. In one extractor's feature space, each
generated tile's nearest training tiles give d1 (the distance to the nearest), d2 (to the second) and Carlini
et al. 2023's ratio (d1 over half its mean distance to its 50 nearest, §5); the definitions are metrics.py's
(copy_distances, copying_test). What "near" means for real tissue comes from the same numbers for held-out
tiles: val-in (other tiles of the training slides) and val-out (other slides). A generated tile is flagged when
d1 is below the 1st percentile of the held-out tiles' d1 (val-out's when the run has it) and its ratio is below
1/3. Per extractor, in DIR/memorization/EXTRACTOR/:

    tiles.csv                    every tile of every set: d1, d2, ratio, its nearest training tile, flagged
    histogram.png / .json        d1 and ratio of the three sets (the JSON holds the plotted bins and counts)
    nearest_pairs[_RUN].png      the 16 nearest generated | training pairs, with their distances
    audit.json                   a row per set: counts, quantiles, shares flagged, Meehan et al.'s test

and DIR/memorization.md, the report of every extractor audited. The training tiles (DIR/train) are the guidance
tiles, which conditioned the samples and so are the likeliest to be copied, then other training rows up to
--num-train (evaluate.py chooses them). Left out: copy-detection embeddings (SSCD, Somepalli et al. 2023),
approximate search beyond the exact one (docs/memorization.md says when it is needed).
"""
import json
import os
import re
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from support.data import list_images, open_tile
from support.outputs import atomic, save_csv, save_json

HELDOUT_PERCENTILE = 1  # a generated tile nearer than 99 % of held-out tiles is "near"
RATIO_THRESHOLD = 1 / 3  # Carlini et al. 2023 §5 (metrics.COPY_THRESHOLD; support/ does not import metrics.py)
PAIRS_SHOWN, PAIRS_PER_ROW = 16, 4
HISTOGRAM_BINS = 40
FIELDS = ["set", "tile", "d1", "d2", "ratio", "nearest_train", "flagged"]


def audit(name, args, cohort, measure, distances, copying):
    """One extractor's audit of every generated run of `cohort` (evaluate.py's: .references {val set: folder},
    .runs {label: run with .folder}) against DIR/train (args.out) -> the result rows of report.json, one per
    generated run (metric "memorized": the share flagged). measure(folder, kind) -> (stems, features, ...) in this
    extractor's space, kind "guidance" (the training tiles' preprocessing), "val" or "generated";
    distances(queries, train) and copying(generated d1, held-out d1): metrics.copy_distances and copying_test."""
    folder, runs = Path(args.out) / "memorization" / name, {k: r.folder for k, r in cohort.runs.items()}
    train_files = list_images(Path(args.out) / "train")
    train = measure(Path(args.out) / "train", "guidance")[1]
    sets = {label: (kind, list_images(path), distances(measure(path, kind)[1], train))
            for kind, group in (("val", cohort.references), ("generated", runs)) for label, path in group.items()}
    heldout = "val_out" if "val_out" in cohort.references else list(cohort.references)[-1]
    d1_threshold = float(np.percentile(sets[heldout][2]["d1"], HELDOUT_PERCENTILE))
    summary, tiles = [], []
    for label, (kind, files, found) in sets.items():
        flagged = (found["d1"] < d1_threshold) & (found["ratio"] < RATIO_THRESHOLD)
        tiles += [dict(set=label, tile=f, d1=a, d2=b, ratio=r, nearest_train=os.path.realpath(train_files[i]),
                       flagged=bool(x)) for f, a, b, r, i, x in zip(files, found["d1"], found["d2"], found["ratio"],
                                                                    found["nearest"], flagged)]
        summary.append(dict(set=label, kind="generated" if kind == "generated" else "held-out", n=len(files),
                            d1_median=float(np.median(found["d1"])), d1_p01=float(np.percentile(found["d1"], 1)),
                            ratio_median=float(np.median(found["ratio"])),
                            near=float((found["d1"] < d1_threshold).mean()),
                            low_ratio=float((found["ratio"] < RATIO_THRESHOLD).mean()),
                            flagged=float(flagged.mean()), n_flagged=int(flagged.sum()),
                            copying_test=copying(found["d1"], sets[heldout][2]["d1"]) if kind == "generated" else None))
    record = dict(extractor=name, date=str(date.today()), n_train=len(train), heldout=heldout,
                  d1_threshold=d1_threshold, heldout_percentile=HELDOUT_PERCENTILE, ratio_threshold=RATIO_THRESHOLD,
                  sets=summary)
    folder.mkdir(parents=True, exist_ok=True)
    save_csv(tiles, folder / "tiles.csv", FIELDS)
    plot_histograms({label: found for label, (_, _, found) in sets.items()}, record, folder / "histogram.png")
    for label in runs:
        _, files, found = sets[label]
        name_png = "nearest_pairs.png" if len(runs) == 1 else f"nearest_pairs_{slug(label)}.png"
        save_pairs(files, found, train_files, folder / name_png)
    save_json(record, folder / "audit.json")
    write_report(args.out, args.extractors)
    base = {k: record[k] for k in ("n_train", "heldout", "d1_threshold", "heldout_percentile", "ratio_threshold")}
    held = [s for s in summary if s["kind"] == "held-out"]
    return [dict(row=s["set"], extractor=name, val="train", metric="memorized", value=s["flagged"], std=None,
                 settings=dict(base, **{k: s[k] for k in ("n", "n_flagged", "near", "low_ratio", "copying_test")},
                               heldout_rows=held)) for s in summary if s["kind"] == "generated"]


def slug(label):
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")


# -------- Pictures ---------------------------------------------------------------------------------
def plot_histograms(sets, record, path):
    """d1 and ratio of every set, one panel each, with the thresholds; the plotted data beside it as JSON."""
    from matplotlib.figure import Figure  # imported when a plot is drawn

    data = dict(record=record, panels={})
    fig = Figure(figsize=(10, 3.6))
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.14, top=0.88, wspace=0.25)
    for ax, key, line in zip(fig.subplots(1, 2), ("d1", "ratio"), (record["d1_threshold"], record["ratio_threshold"])):
        values = {label: found[key] for label, found in sets.items()}
        edges = np.histogram_bin_edges(np.concatenate(list(values.values())), HISTOGRAM_BINS)
        counts = {label: np.histogram(v, edges)[0].tolist() for label, v in values.items()}
        for label, c in counts.items():
            ax.stairs(np.asarray(c) / max(1, sum(c)), edges, label=f"{label} ({sum(c)})")
        ax.axvline(line, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("d1, distance to the nearest training tile" if key == "d1" else "ratio (Carlini et al. 2023)")
        ax.set_ylabel("share of tiles")
        ax.legend(fontsize=7)
        data["panels"][key] = dict(edges=edges.tolist(), counts=counts, threshold=line)
    fig.suptitle(f"Nearest training tiles in {record['extractor']} space ({record['n_train']} training tiles)")
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    save_json(data, Path(path).with_suffix(".json"))


def save_pairs(files, found, train_files, path, gap=4, caption=14):
    """The PAIRS_SHOWN generated tiles nearest to a training tile, each beside that tile (generated | training),
    captioned with d1 and the ratio; PAIRS_PER_ROW pairs a row, on white."""
    order = np.argsort(found["d1"], kind="stable")[:PAIRS_SHOWN]
    pairs = [(np.asarray(open_tile(files[i])), np.asarray(open_tile(train_files[found["nearest"][i]])),
              f"d1={found['d1'][i]:.3g}, ratio={found['ratio'][i]:.2f}") for i in order]
    side = max(max(a.shape[0], a.shape[1], b.shape[0], b.shape[1]) for a, b, _ in pairs)
    cell_w, cell_h = 2 * side + gap, side + caption
    rows = -(-len(pairs) // PAIRS_PER_ROW)
    canvas = Image.new("RGB", (PAIRS_PER_ROW * (cell_w + 2 * gap), rows * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (generated, train, text) in enumerate(pairs):
        row, col = divmod(k, PAIRS_PER_ROW)
        x, y = col * (cell_w + 2 * gap), row * (cell_h + gap)
        canvas.paste(Image.fromarray(generated), (x, y))
        canvas.paste(Image.fromarray(train), (x + side + gap, y))
        draw.text((x + 2, y + side + 1), text, fill="black")
    with atomic(path) as tmp:
        canvas.save(tmp, format="PNG")


# -------- The report -------------------------------------------------------------------------------
def write_report(out, extractors):
    """DIR/memorization.md: a table per audited extractor (those of `extractors` with an audit.json)."""
    lines = ["# Memorisation audit", "", f"{date.today()}. Per generated tile: d1, its distance to the nearest "
             "training tile; the ratio of d1 to half its mean distance to its 50 nearest (Carlini et al. 2023 §5). "
             "Flagged: d1 below the held-out tiles' 1st percentile and ratio below the threshold. Held-out rows: "
             "what real tissue gives (val-in: other tiles of the training slides; val-out: other slides). Every tile: "
             "memorization/EXTRACTOR/tiles.csv.", ""]
    for name in extractors:
        path = Path(out) / "memorization" / name / "audit.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        lines += [f"## {name}: {record['n_train']} training tiles; flagged when d1 < {record['d1_threshold']:.4g} "
                  f"({record['heldout']}'s {record['heldout_percentile']}st percentile) and ratio < "
                  f"{record['ratio_threshold']:.3g}", "",
                  "| set | tiles | d1 median | d1 1st pct | ratio median | near | low ratio | flagged | nearer than "
                  f"{record['heldout']} (p) |", "|---|" + "---|" * 8]
        for s in record["sets"]:
            test = s["copying_test"]
            cells = [s["set"], s["n"], f"{s['d1_median']:.4g}", f"{s['d1_p01']:.4g}", f"{s['ratio_median']:.3f}",
                     f"{s['near']:.3f}", f"{s['low_ratio']:.3f}", f"{s['flagged']:.3f} ({s['n_flagged']})",
                     f"{test['nearer_share']:.3f} ({test['p_value']:.2g})" if test else "-"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines += ["", f"![histogram](memorization/{name}/histogram.png)", ""]
        lines += [f"![nearest pairs](memorization/{name}/{p.name})" for p in sorted(path.parent.glob("nearest_pairs*"))]
        lines.append("")
    with atomic(Path(out) / "memorization.md") as tmp:
        Path(tmp).write_text("\n".join(lines))
