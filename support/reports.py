"""The benchmark's reports (CytoSyn Tables 2-5, Figure 4): what evaluate.py writes, and one table of runs.

    write_reports(rows, skipped, args, argv, info)   DIR/report.md (Table 2's layout, Table 3 for each --ood
                                                     cohort, Figure 4's numbers) and DIR/report.json (every
                                                     setting next to every number); Figure 4 as
                                                     fd_vs_steps.png and fd_vs_steps.json (the data behind it)
    write_comparison(run_dirs, out)                  OUT/compare.md and OUT/compare.json: a row per run, a
                                                     column per metric / extractor / val set all runs share,
                                                     marked * where its numbers were measured differently

A result row: {row: the run's label, extractor, val: the reference set (val_in, val_out or an --ood cohort;
for the paired cosine the cohort, None for --tiles' guidance), metric, value, std, settings}.
Left out: plots other than Figure 4.
"""
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import scipy
import timm
import torch

from support.cli import InputError, MissingInput
from support.logs import plot_fd_vs_steps
from support.outputs import atomic, check_output_folder, save_json

VAL_SETS = ("val_in", "val_out")
BASELINE = "guidance vs val"
METRIC_ORDER = ("fd", "fd_bootstrap", "fld", "precision", "recall", "cosine", "cosine_shuffled")
# The settings that change how a number is measured: --compare marks a column whose rows differ in one.
COMPARED = ("sampler", "num_sampling_steps", "cfg_scale", "guidance_interval", "sit_weights", "vae_weights",
            "preprocess", "resize", "resize_generated", "weights", "extractor_spec", "k", "draws", "size",
            "n_val", "n_generated", "n_guidance", "reference")


def versions():
    """The libraries behind a number, recorded beside it."""
    return dict(torch=torch.__version__, timm=timm.__version__, numpy=np.__version__, scipy=scipy.__version__)


def run_name(sampler, steps):
    return f"CytoSyn ({sampler}, {steps} steps)"


# -------- report.md -----------------------------------------------------------------------------------
def report_cell(rows, label, extractor, metric, vals):
    """The values of one cell, 'val-in / val-out'; '-' where there is none; FD's bootstrap with its std."""
    values = []
    for val in vals:
        hit = [r for r in rows if (r["row"], r["extractor"], r["metric"], r["val"]) == (label, extractor, metric, val)]
        values.append("-" if not hit else f"{hit[0]['value']:.3f}" + (
            f" ± {hit[0]['std']:.3f}" if hit[0]["std"] is not None and metric == "fd_bootstrap" else ""))
    return " / ".join(values)


def cosine_cell(rows, label, extractor, cohort):
    if not any(r["row"] == label and r["metric"] == "cosine" and r["val"] == cohort for r in rows):
        return "no pairing"
    return (f"{report_cell(rows, label, extractor, 'cosine', [cohort])} (shuffled "
            f"{report_cell(rows, label, extractor, 'cosine_shuffled', [cohort])})")


def table_head(first, extractors):
    return [f"| {first} | " + " | ".join(extractors) + " |", "|---|" + "---|" * len(extractors)]


def table2(rows, labels, extractors, val_sets):
    """Table 2's layout: a table per metric, a row per run, a column per extractor, val-in / val-out per cell."""
    lines = []
    for metric in ("fd", "fd_bootstrap", "fld", "precision", "recall"):
        lines += [f"## {metric}", ""] + table_head("run", extractors)
        lines += [f"| {label} | " + " | ".join(report_cell(rows, label, e, metric, val_sets) for e in extractors) + " |"
                  for label in labels if any(r["row"] == label and r["metric"] == metric for r in rows)]
        lines.append("")
    lines += ["## cosine (generated vs its guidance tile; shuffled pairing)", ""] + table_head("run", extractors)
    lines += [f"| {label} | " + " | ".join(cosine_cell(rows, label, e, None) for e in extractors) + " |"
              for label in labels if label != BASELINE]
    return lines + [""]


def table3(rows, name, beside, labels, extractors):
    """Table 3's layout: an --ood cohort's numbers beside those of a val set, a table per run."""
    lines = [f"## Table 3: {name} beside {beside}", ""]
    for label in labels:
        if label == BASELINE:
            continue
        lines += [f"### {label}", ""] + table_head("metric", extractors)
        for metric in ("fd", "fld", "precision", "recall"):
            lines += [f"| {metric} ({val}) | " + " | ".join(report_cell(rows, label, e, metric, [val])
                                                            for e in extractors) + " |"
                      for val in (name, beside)]
        lines += [f"| cosine ({shown}) | " + " | ".join(cosine_cell(rows, label, e, cohort) for e in extractors) + " |"
                  for cohort, shown in ((name, f"{name} guidance half"), (None, "--tiles guidance"))]
        lines += [f"| fd baseline ({what}) | " + " | ".join(report_cell(rows, BASELINE, e, "fd", [val])
                                                           for e in extractors) + " |"
                  for val, what in ((name, f"{name}: guidance half vs reference half"),
                                    (beside, f"guidance vs {beside}"))]
        lines.append("")
    return lines


def size_line(sizes, crop):
    """What report.md says of the tile sizes of --generated's sets (a 256 px model beside 224 px tiles)."""
    shown = ", ".join(f"{k} {v if v == 'mixed' else f'{v[0]}x{v[1]}'} px" for k, v in sizes.items())
    if crop:
        return f"Tile sizes: {shown}; --crop {crop}: every tile centre-cropped to {crop} px (the paper's §4.3 crop)."
    if len({str(v) for v in sizes.values()}) > 1:
        return (f"Tile sizes: {shown}; no --crop: each set is resized to each extractor's input on its own, so the "
                f"sets do not show the same field of view (the paper centre-crops 256 px tiles: --crop 224).")
    return f"Tile sizes: {shown}."


def intro(args, info):
    """report.md's header: what was scored, against what, and every preprocessing choice (§4.3)."""
    jpeg = ", ".join(f"{s} {f'JPEG q{q}' if q else 'as stored'}" for s, q in (
        ("val", args.jpeg_val), ("guidance", args.jpeg_guidance), ("generated", args.jpeg_generated)))
    lines = [f"# Benchmark of "
             f"{f'the tiles in {args.generated} (nothing sampled)' if args.generated else args.ckpt}", "",
             f"{date.today()}; guidance: {info['guidance']['n']} tiles of {args.tiles} "
             f"({info['guidance']['chosen_by']}); "
             f"cells: {' / '.join(args.val_sets)}; extractor weights: "
             f"{'random (pipeline check only)' if args.random_weights else 'pretrained'}"
             + ("" if args.generated else f"; SiT {args.sit_weights}, VAE {args.vae_weights}")
             + "; every setting per number: report.json", "",
             f"Preprocessing (§4.3), every set: {jpeg}; centre crop {args.crop or 'none'}; resize kernel "
             f"{args.resize_kernel or 'the extractor default'}" + ("; each tile resized straight to the extractor's "
                                                                  "input" if args.resize_to_input else "") + ".", ""]
    if info["tile_sizes"]:
        lines += [size_line(info["tile_sizes"], args.crop), ""]
    if args.generated:
        pairing = info["pairing"]
        lines += [f"Paired cosine: --pairs {pairing['pairs']} ({pairing['n_pairs']} generated tiles paired)."
                  if pairing else "Paired cosine: no pairing (no --pairs).", ""]
    for name, plan in info["ood"].items():
        slides = f" ({len(plan['slides']['guidance'])} / {len(plan['slides']['reference'])} slides)" \
            if plan["split_by"] == "slide" else ""
        lines += [f"--ood {name}: {plan['path']}, {plan['n_tiles']} tiles split by {plan['split_by']} (--seed "
                  f"{plan['seed']}): {plan['n_guidance']} guidance / {plan['n_reference']} reference "
                  f"tiles{slides}.", ""]
    return lines


def run_info(args, guidance, pairing, ood, tile_sizes):
    """What report.json says of the run's sets besides the settings: how the guidance set was chosen, the
    --pairs pairing, each --ood cohort's split (its tiles: DIR/ood/NAME/split.csv), --generated's tile sizes."""
    return dict(guidance=dict(n=len(guidance), list="guidance.csv", chosen_by=(
        f"--pairs {args.pairs} (its guidance column)" if args.pairs else
        f"--num-guidance {args.num_guidance} training rows stratified by TSS, --seed {args.seed}")),
        pairing=pairing and {k: v for k, v in pairing.items() if k != "names"},
        ood={name: {k: v for k, v in plan.items() if k != "halves"} for name, plan in ood.items()},
        tile_sizes=tile_sizes)


def fd_vs_steps(rows, args, extractor, val):
    """Figure 4's numbers: {sampler: [(steps, FD)]} against one val set, for one extractor."""
    return {s: [(n, next(r["value"] for r in rows if (r["row"], r["extractor"], r["metric"], r["val"]) ==
                         (run_name(s, n), extractor, "fd", val))) for n in args.num_sampling_steps]
            for s in args.sampler}


def fd_vs_steps_table(curves, title):
    """Figure 4's numbers as a markdown table: a row per step count, a column per sampler."""
    steps = sorted({n for c in curves.values() for n, _ in c})
    header = "| steps | " + " | ".join(sorted(curves)) + " |\n|---|" + "---|" * len(curves) + "\n"
    table = "".join(f"| {n} | " + " | ".join(f"{dict(curves[s]).get(n, float('nan')):.3f}" for s in sorted(curves))
                    + " |\n" for n in steps)
    return f"\n## Figure 4: {title} against steps (fd_vs_steps.png)\n\n" + header + table


def save_text(text, path):
    with atomic(path) as tmp:
        Path(tmp).write_text(text)


def write_reports(rows, skipped, args, argv, info):
    """DIR/report.md and DIR/report.json of an evaluate.py run."""
    scored = [e for e in args.extractors if any(r["extractor"] == e for r in rows)]
    labels = list(dict.fromkeys(r["row"] for r in rows))
    beside = "val_out" if "val_out" in args.val_sets else args.val_sets[-1]
    lines = intro(args, info) + table2(rows, labels, scored, args.val_sets)
    for name in info["ood"]:
        lines += table3(rows, name, beside, labels, scored)
    text, figure = "\n".join(lines), None
    if scored and not args.generated and (len(args.num_sampling_steps) > 1 or len(args.sampler) > 1):
        val = args.val_sets[-1]  # the last val set: val_out, the paper's Figure 4
        figure = fd_vs_steps(rows, args, scored[0], val)
        title = f"FD ({scored[0]}, {val})"
        drawn = plot_fd_vs_steps(figure, args.out / "fd_vs_steps.png", title)
        save_json(dict(extractor=scored[0], val=val, metric="fd", title=title, curves=figure, plot=drawn),
                  args.out / "fd_vs_steps.json")  # the numbers behind the PNG, and what it shows
        text += fd_vs_steps_table(figure, title)
    for s in skipped:
        text += f"\nskipped: {s['error']}\n"
    save_text(text, args.out / "report.md")
    report = dict(date=str(date.today()), argv=sys.argv if argv is None else argv,
                  mode="generated" if args.generated else "sampled",
                  settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **info,
                  results=rows, skipped=skipped, fd_vs_steps=figure, versions=versions())
    save_json(report, args.out / "report.json")
    print(text)


# -------- --compare -----------------------------------------------------------------------------------
def read_report(run_dir):
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise MissingInput(f"--compare {run_dir}: no report.json there; pass the --out folders of finished "
                           f"evaluate.py runs")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"--compare {run_dir}: report.json is not JSON ({err}); run evaluate.py again") from None


def setting(settings, key, val):
    """One setting of a row as {dotted name: JSON value}, leaf by leaf (a footnote names the leaf that differs);
    of the resize records, only those of the two sets the row measures."""
    value = settings[key]
    if key == "resize":
        value = {k: v for k, v in value.items() if k in ("guidance", val)}

    def leaves(item, name):
        if isinstance(item, dict):
            return {k: v for sub, x in item.items() for k, v in leaves(x, f"{name}.{sub}").items()}
        return {name: json.dumps(item, default=str)}
    return leaves(value, key)


def comparison(run_dirs):
    """-> (a row per run and row label: {id, run, row, values: {column: result row}}, the columns (metric,
    extractor, val) every run reports, {column: {setting: {value: [row ids]}}} for those measured differently)."""
    reports = [(str(d), read_report(d)) for d in run_dirs]  # all read first: a bad one writes nothing
    key = lambda r: (r["metric"], r["extractor"], r["val"])  # noqa: E731
    shared = set.intersection(*({key(r) for r in report["results"]} for _, report in reports))
    if not shared:  # an empty table would say nothing: refused, naming what each run measured
        measured = "; ".join(f"{run_dir}: {', '.join(sorted({r['extractor'] for r in report['results']})) or 'nothing'}"
                             for run_dir, report in reports)
        raise InputError(f"--compare: the runs share no column (metric, extractor and val set), so there is nothing to "
                         f"compare; their extractors: {measured}. Score them with a common extractor (--extractors)")
    columns = sorted(shared, key=lambda c: (METRIC_ORDER.index(c[0]) if c[0] in METRIC_ORDER else len(METRIC_ORDER),
                                            c[1], str(c[2])))
    table = [dict(run=run_dir, row=label, values={key(r): r for r in report["results"]
                                                  if r["row"] == label and key(r) in shared})
             for run_dir, report in reports for label in dict.fromkeys(r["row"] for r in report["results"])]
    for i, entry in enumerate(table, start=1):
        entry["id"] = f"r{i}"
    flags = {}
    for column in columns:
        seen = {}  # setting -> value -> the rows measured with it
        for entry in table:
            r = entry["values"].get(column)
            for name in COMPARED if r is not None else ():
                for leaf, value in (setting(r["settings"], name, column[2]) if name in r["settings"] else {}).items():
                    seen.setdefault(leaf, {}).setdefault(value, []).append(entry["id"])
        differ = {leaf: values for leaf, values in seen.items() if len(values) > 1}
        if differ:
            flags[column] = differ
    return table, columns, flags


def column_name(column):
    metric, extractor, val = column
    return f"{metric} {extractor} {val or 'tiles'}"


def footnote(differ):
    """{setting: {value: [row ids]}} -> 'setting: value (r1, r2), value (r3); ...'."""
    return "; ".join(f"{name}: " + ", ".join(f"{value} ({', '.join(rows)})" for value, rows in seen.items())
                     for name, seen in differ.items())


def write_comparison(run_dirs, out):
    """OUT/compare.md and OUT/compare.json: one table of several runs (evaluate.py --compare)."""
    check_output_folder(str(out), {"--compare": [str(d) for d in run_dirs]})
    table, columns, flags = comparison(run_dirs)
    texts = {c: footnote(flags[c]) for c in columns if c in flags}
    numbers = {text: i for i, text in enumerate(dict.fromkeys(texts.values()), start=1)}  # alike columns: one note
    lines = [f"# {len(run_dirs)} runs side by side", "", f"{date.today()}; a column per metric, extractor and val set "
             "that every run reports (val 'tiles': the paired cosine with --tiles' guidance); *N: its numbers were "
             "measured with different settings (footnote N; null: not recorded, as for --generated).", "",
             "| id | run | row | " + " | ".join(column_name(c) + (f" *{numbers[texts[c]]}" if c in texts else "")
                                           for c in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for entry in table:
        cells = [report_cell([r], entry["row"], c[1], c[0], [c[2]]) if (r := entry["values"].get(c)) else "-"
                 for c in columns]
        lines.append(f"| {entry['id']} | {entry['run']} | {entry['row']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines + [""] + [f"*{i} {note}" for note, i in numbers.items()]) + "\n"
    Path(out).mkdir(parents=True, exist_ok=True)
    save_text(text, Path(out) / "compare.md")
    save_json(dict(date=str(date.today()), runs=[str(d) for d in run_dirs],
                   columns=[dict(metric=c[0], extractor=c[1], val=c[2], name=column_name(c), differs=flags.get(c, {}))
                            for c in columns],
                   rows=[dict(id=e["id"], run=e["run"], row=e["row"],
                              values={column_name(c): dict(value=r["value"], std=r["std"])
                                      for c, r in e["values"].items()}) for e in table]),
              Path(out) / "compare.json")
    print(text)
