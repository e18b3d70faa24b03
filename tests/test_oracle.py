"""An oracle of the whole benchmark (CytoSyn §4.1-§4.3, §5: Tables 2-5, Figure 4).

evaluate.py runs end to end through its command line, on a tiling whose tiles carry their set in their pixels,
with a test extractor whose features are known: a function written here maps each tile to a vector, and gives
each set (training, val-in, val-out, an --ood cohort, another model's tiles, the checkpoint's samples) its own
mean, scale and size. Then every number of report.json, compare.json, report.md, compare.md and
fd_vs_steps.json is computed again from those vectors by code that imports nothing of the project:
pytorch-fid's Fréchet distance, prdc's precision and recall, FLD written again from Jiralerspong et al.'s
definition, numpy's cosine, and the bootstrap from its definition over the draws the run recorded. Each number
is checked against the set its row, column or title names, so a number of one set under another's name, or a
statistic fitted on the wrong set, fails.
"""
import csv
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

import evaluate
import extractors
import oracle_definitions as defs
from oracle_inputs import SPEC, TILE, KnownExtractor, features_of, make_cohort, make_model, make_tiling

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # pytorch-fid on SciPy 1.17

COUNTS = {"train": 16, "val_in": 7, "val_out": 6}
NUM_GUIDANCE, DRAWS, K, FLD_NUM_GENERATED, SEED = 12, 4, 2, 4, 3  # a seed other than the defaults' 0
STEPS, SAMPLERS, CFG, WINDOW = (2, 3), ("ode", "sde"), 2.5, (0.0, 0.75)
COHORT_SLIDES = (7, 4, 4, 3)  # split by slide: the halves are read from the run's split.csv
NUM_OOD = 50  # more than either half: no cap


def common_argv(tiles, out):
    return ["--tiles", str(tiles), "--out", str(out), "--extractors", "oracle", "--random-weights", "--device",
            "cpu", "--num-workers", "0", "--bootstrap-draws", str(DRAWS), "--k", str(K), "--fld-num-generated",
            str(FLD_NUM_GENERATED), "--seed", str(SEED)]


@pytest.fixture(scope="module")
def runs(ckpt_64px, tmp_path_factory):
    """Run A: --ckpt, Table 2 + Figure 4 (steps 2, 3 x ode, sde) + an --ood cohort (Table 3); run B: --generated
    with --pairs (Table 4); C: --compare A B."""
    root, rng = tmp_path_factory.mktemp("oracle"), np.random.default_rng(0)
    manifest = make_tiling(root / "tiling", COUNTS, rng)
    cohort = make_cohort(root / "cohort", COHORT_SLIDES, rng)
    train_files = [r["file"] for r in manifest if r["split"] == "train"]
    pairs = make_model(root / "model", train_files, rng)
    a, b, c = root / "a", root / "b", root / "c"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(extractors.EXTRACTORS, "oracle", SPEC)
        mp.setattr(evaluate, "build_extractor", lambda name, pretrained, device, seed: KnownExtractor())
        sampling = ["--num-sampling-steps", ",".join(map(str, STEPS)), "--sampler", ",".join(SAMPLERS), "--cfg-scale",
                    str(CFG), "--guidance-low", str(WINDOW[0]), "--guidance-high", str(WINDOW[1])]
        assert evaluate.main(["--ckpt", ckpt_64px, *common_argv(root / "tiling", a), "--num-guidance",
                              str(NUM_GUIDANCE), *sampling, "--sample-batch-size", "8", "--ood",
                              f"ibd={root / 'cohort'}", "--num-ood", str(NUM_OOD)]) == 0
        assert evaluate.main(["--generated", str(root / "model"), "--pairs", str(root / "pairs.csv"),
                              *common_argv(root / "tiling", b)]) == 0
        assert evaluate.main(["--compare", str(a), str(b), "--out", str(c)]) == 0
    return dict(root=root, manifest=manifest, cohort=cohort, pairs=pairs, a=a, b=b, c=c)


# -------- What each run measured, read from its inputs, and what each number must be ---------------------------
BASELINE = "guidance vs val"


def run_label(sampler, steps):
    return f"CytoSyn ({sampler}, {steps} steps)"


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sampled(folder, n):
    """The n tiles sampled from guidance tiles 0 .. n-1 (sample.py names them 000000_00.png ...); nothing else."""
    names = [f"{i:06d}_00.png" for i in range(n)]
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".png") == names
    return features_of([folder / name for name in names])


def cohorts_of_a(runs):
    """Run A's sets: the guidance tiles (guidance.csv: the training rows it names, stratified by TSS), val_in,
    val_out, each sampled run; the --ood cohort's halves (split.csv) and its runs."""
    a, tiling = runs["a"], runs["root"] / "tiling"
    guidance, train = read_rows(a / "guidance.csv"), [r for r in runs["manifest"] if r["split"] == "train"]
    assert [r["name"] for r in guidance] == [f"{i:06d}" for i in range(NUM_GUIDANCE)]
    assert len({r["file"] for r in guidance}) == NUM_GUIDANCE and {r["file"] for r in guidance} <= {
        r["file"] for r in train}
    for tss in "AB":  # the training rows are half A, half B: so is the guidance set
        share = sum(r["tss"] == tss for r in train) / len(train)
        assert sum(r["tss"] == tss for r in guidance) == NUM_GUIDANCE * share
    guide = features_of([tiling / r["file"] for r in guidance])
    vals = {v: features_of([tiling / r["file"] for r in runs["manifest"] if r["split"] == v]) for v in COUNTS
            if v != "train"}
    gens = {run_label(s, n): sampled(a / "generated" / f"{s}-{n}", NUM_GUIDANCE) for s in SAMPLERS for n in STEPS}
    split = read_rows(a / "ood" / "ibd" / "split.csv")
    halves = {h: [r for r in split if r["half"] == h] for h in ("guidance", "reference")}
    slides = {h: {r["slide_id"] for r in rows} for h, rows in halves.items()}
    assert not slides["guidance"] & slides["reference"]  # split by slide: no slide in both halves
    cohort_files = sorted(str(runs["root"] / "cohort" / r["file"]) for r in runs["cohort"])
    assert sorted(r["file"] for r in split) == cohort_files  # every tile in one half (no --num-ood cap here)
    assert [r["name"] for r in halves["guidance"]] == [f"{i:06d}" for i in range(len(halves["guidance"]))]
    cohort_guide = features_of([r["file"] for r in halves["guidance"]])
    cohort_ref = features_of([r["file"] for r in halves["reference"]])
    cohort_gens = {run_label(s, n): sampled(a / "ood" / "ibd" / "generated" / f"{s}-{n}", len(cohort_guide))
                   for s in SAMPLERS for n in STEPS}
    same = [(i, i) for i in range(NUM_GUIDANCE)]
    return [dict(name=None, guide=guide, refs=vals, gens=gens, pairs={k: same for k in gens}),
            dict(name="ibd", guide=cohort_guide, refs={"ibd": cohort_ref}, gens=cohort_gens,
                 pairs={k: [(i, i) for i in range(len(cohort_guide))] for k in cohort_gens})]


def cohorts_of_b(runs):
    """Run B's sets: the guidance tiles are the training rows --pairs names (sorted by path), the generated set
    every tile of the model's folder, paired as pairs.csv says."""
    b, tiling = runs["b"], runs["root"] / "tiling"
    guidance = read_rows(b / "guidance.csv")
    named = sorted({p["guidance"] for p in runs["pairs"]})
    assert [r["file"] for r in guidance] == named and [r["name"] for r in guidance] == [
        f"{i:06d}" for i in range(len(named))]
    model = sorted((runs["root"] / "model").glob("*.png"))
    index = {p.name: j for j, p in enumerate(model)}
    pairs = [(index[p["generated"]], named.index(p["guidance"])) for p in runs["pairs"]]
    vals = {v: features_of([tiling / r["file"] for r in runs["manifest"] if r["split"] == v]) for v in COUNTS
            if v != "train"}
    return [dict(name=None, guide=features_of([tiling / f for f in named]), refs=vals,
                 gens={"model (--generated)": features_of(model)}, pairs={"model (--generated)": pairs})]


def load_subsets(run_dir, row):
    path = run_dir / row["settings"]["subsets"]
    assert path.parent == run_dir / "subsets"
    with np.load(path) as arrays:
        return dict(arrays)


def expected(run_dir, report, cohorts, sampled_runs):
    """{(row, val, metric): {value, std, settings: {...}}}: every number of every result row, from the oracle."""
    rows = {(r["row"], r["val"], r["metric"]): r for r in report["results"]}
    want = {}
    spec = json.loads(json.dumps(dataclasses.asdict(SPEC)))
    for cohort in cohorts:
        guide = cohort["guide"]
        base = dict(seed=SEED, n_guidance=len(guide), extractor_spec=spec)
        runs = [(BASELINE, guide, None)] + [(label, gen, guide) for label, gen in cohort["gens"].items()]
        for label, gen, train in runs:
            echo = {}
            if label != BASELINE and sampled_runs:
                steps = int(re.search(r"(\d+) steps", label).group(1))
                echo = dict(num_sampling_steps=steps, cfg_scale=CFG, guidance_interval=list(WINDOW))
            for val, real in cohort["refs"].items():
                counts = dict(base, **echo, n_val=len(real), n_generated=len(gen))
                want[label, val, "fd"] = dict(value=defs.fid_fd(real, gen), std=None, settings=counts)
                drawn = load_subsets(run_dir, rows[label, val, "fd_bootstrap"])["bootstrap"]
                mean, std, _ = defs.bootstrap_by_definition(real, gen, drawn, DRAWS)
                want[label, val, "fd_bootstrap"] = dict(value=mean, std=std, settings=dict(
                    counts, draws=DRAWS, size=len(gen) // 2))
                precision, recall = defs.prdc_pr(real, gen, K)
                want[label, val, "precision"] = dict(value=precision, std=None, settings=dict(counts, k=K))
                want[label, val, "recall"] = dict(value=recall, std=None, settings=dict(counts, k=K))
                if train is not None:
                    out = defs.fld_by_definition(train, real, gen, load_subsets(run_dir, rows[label, val, "fld"]),
                                                 FLD_NUM_GENERATED)
                    want[label, val, "fld"] = dict(value=out["fld"], std=None, settings=dict(counts, **out))
            if train is not None:
                gen_rows, guide_rows = map(list, zip(*cohort["pairs"][label]))
                counts = dict(base, **echo, n_generated=len(gen), n_pairs=len(gen_rows))
                mean, std, _ = defs.numpy_cosines(guide[guide_rows], gen[gen_rows])
                want[label, cohort["name"], "cosine"] = dict(value=mean, std=std, settings=counts)
                order = load_subsets(run_dir, rows[label, cohort["name"], "cosine_shuffled"])["order"]
                assert sorted(order) == list(range(len(guide))) and (order != np.arange(len(guide))).all()
                # the shuffled pairing: guidance row i -> row order[i]
                mean, std, _ = defs.numpy_cosines(guide[order][guide_rows], gen[gen_rows])
                want[label, cohort["name"], "cosine_shuffled"] = dict(value=mean, std=std, settings=counts)
    return want


@pytest.fixture(scope="module")
def oracle(runs):
    """Each run's report.json, its sets and what every number must be."""
    out = {}
    for run, cohorts in (("a", cohorts_of_a(runs)), ("b", cohorts_of_b(runs))):
        report = json.loads((runs[run] / "report.json").read_text())
        out[run] = dict(report=report, cohorts=cohorts, want=expected(runs[run], report, cohorts, run == "a"))
    return out


# -------- Comparing ---------------------------------------------------------------------------------------------
def numbers(item, path=()):
    """Every number in a JSON document -> {path: number} (booleans are not numbers here)."""
    if isinstance(item, dict):
        return {k: v for key, sub in item.items() for k, v in numbers(sub, (*path, key)).items()}
    if isinstance(item, list):
        return {k: v for i, sub in enumerate(item) for k, v in numbers(sub, (*path, i)).items()}
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return {path: item}
    return {}


def close(got, want, metric, key):
    """Counts and precision / recall exactly; FD, the bootstrap and cosines to 1e-6; FLD's NLLs to 1e-6 (an
    iterative fit, float32 in the code, float64 here: they agree to ~1e-7), FLD itself, 100 x a difference of
    NLLs, to 1e-4 or 1e-3 absolute."""
    if isinstance(want, int) or metric in ("precision", "recall"):
        return got == want
    if metric in ("fld", "fld_gap") and not str(key).startswith("nll"):
        return math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-3)
    return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


def report_numbers(run, runs, oracle):
    """{path in report.json: (what it must be, its metric)} for every number report.json holds, bar the command
    line it echoes (argv, settings)."""
    report, want = oracle[run]["report"], oracle[run]["want"]
    paths = {}
    for i, row in enumerate(report["results"]):
        w = want[row["row"], row["val"], row["metric"]]
        paths.update({("results", i, *k): (v, row["metric"]) for k, v in numbers(
            dict(value=w["value"], std=w["std"], settings=w["settings"])).items()})
    cohorts = oracle[run]["cohorts"]
    paths["guidance", "n"] = (len(cohorts[0]["guide"]), "count")
    if run == "a":
        ibd = cohorts[1]
        for key, value in dict(seed=SEED, num_ood=NUM_OOD, n_tiles=sum(COHORT_SLIDES), n_guidance=len(ibd["guide"]),
                               n_reference=len(ibd["refs"]["ibd"])).items():
            paths["ood", "ibd", key] = (value, "count")
        figure = json.loads((runs["a"] / "fd_vs_steps.json").read_text())
        for s in SAMPLERS:
            for j, n in enumerate(STEPS):
                paths["fd_vs_steps", s, j, 0] = (n, "count")
                paths["fd_vs_steps", s, j, 1] = (want[run_label(s, n), figure["val"], "fd"]["value"], "fd")
    else:
        paths["pairing", "n_pairs"], paths["pairing", "repeated_rows"] = (len(runs["pairs"]), "count"), (0, "count")
        for name in ("guidance", "val_in", "val_out", "generated"):
            paths["tile_sizes", name, 0] = paths["tile_sizes", name, 1] = (TILE, "count")
    return paths


@pytest.mark.parametrize("run", ["a", "b"])
def test_every_number_of_report_json_equals_its_recomputation(runs, oracle, run):
    """Every row is there once, names the set it was measured on, and holds the oracle's numbers: values,
    stds, counts, the FLD fit's NLLs and epochs, and the settings it echoes; nothing else is a number."""
    report, want = oracle[run]["report"], oracle[run]["want"]
    assert sorted((r["row"], str(r["val"]), r["metric"]) for r in report["results"]) == sorted(
        (k[0], str(k[1]), k[2]) for k in want)
    assert {r["extractor"] for r in report["results"]} == {"oracle"} and report["skipped"] == []
    paths = report_numbers(run, runs, oracle)
    got = {k: v for k, v in numbers(report).items() if k[0] not in ("argv", "settings")}
    assert set(got) == set(paths), (sorted(set(got) - set(paths))[:5], sorted(set(paths) - set(got))[:5])
    wrong = [(k, got[k], w) for k, (w, metric) in paths.items() if not close(got[k], w, metric, k[-1])]
    assert not wrong, wrong[:5]
    # and the words beside each number: the weights (random, seeded by --seed) and each set's preprocessing
    # (nothing asked: as stored, the extractor's own resize kernel)
    as_stored = dict(jpeg=None, crop=None, kernel=SPEC.kernel, resize_to_input=False)
    for r in report["results"]:
        assert r["settings"]["weights"] == f"random(seed={SEED})", r["settings"]["weights"]
        assert r["settings"]["preprocess"] == dict.fromkeys(("val", "guidance", "generated"), as_stored)


def test_the_sets_are_far_apart_so_that_a_swap_fails(oracle):
    """The inputs make every choice matter: each FD, bootstrap and FLD of val_in differs from val_out's in the
    third decimal at least (report.md's precision), and each run from the baseline."""
    want = oracle["a"]["want"]
    for (label, val, metric), w in want.items():
        if val == "val_in" and metric in ("fd", "fd_bootstrap", "fld"):
            assert abs(w["value"] - want[label, "val_out", metric]["value"]) > 0.01, (label, metric)
        if label != BASELINE and val in ("val_in", "val_out") and metric in ("fd", "fd_bootstrap"):
            assert abs(w["value"] - want[BASELINE, val, metric]["value"]) > 0.01, (label, val, metric)


# -------- report.md: every cell under the name of its set --------------------------------------------------------
def markdown_tables(text):
    """-> [(the headings above it, the header cells, [row cells])] of each table of a markdown text."""
    tables, headings, lines = [], {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            headings = {k: v for k, v in headings.items() if k < level} | {level: line.lstrip("#").strip()}
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---") and (
                i == 0 or not lines[i - 1].startswith("|")):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append([c.strip() for c in row.strip("|").split("|")])
            tables.append((dict(headings), [c.strip() for c in line.strip("|").split("|")], body))
    return tables


NUMBER = r"(-?\d+\.\d{3})"
CELL = re.compile(rf"{NUMBER}|{NUMBER} ± {NUMBER}|{NUMBER} \(shuffled {NUMBER}\)")


def shown(cell):
    """'1.234', '1.234 ± 0.567' or '0.123 (shuffled 0.045)', nothing else around them -> its numbers."""
    found = CELL.fullmatch(cell)
    assert found, f"not a report cell: {cell!r}"
    return [float(x) for x in found.groups() if x is not None]


def check_cell(cell, want, key, checked):
    """A report cell shows the value of `key` (and its std, or its shuffled pairing's) to 3 decimals."""
    label, val, metric = key
    expect = [want[key]["value"]] + ([want[key]["std"]] if metric == "fd_bootstrap" else []) + (
        [want[label, val, "cosine_shuffled"]["value"]] if metric == "cosine" else [])
    assert len(shown(cell)) == len(expect) and all(abs(a - b) <= 5e-4 + 1e-9 for a, b in zip(shown(cell), expect)), \
        (key, cell, expect)
    checked.add(key)


def named_set(words, sets):
    """The one set a heading or a row label names ('--tiles guidance': --tiles' own, None)."""
    if "--tiles" in words:
        return None
    named = [s for s in sets if re.search(rf"\b{s}\b", words)]
    assert len(named) == 1, (words, named)
    return named[0]


@pytest.mark.parametrize("run", ["a", "b"])
def test_every_cell_of_report_md_is_the_number_of_the_set_it_names(runs, oracle, run):
    """Table 2 ('val_in / val_out' in each cell, in the order the header states), Table 3 (a row per metric and
    set) and Figure 4's table (its heading names the val set): each number is the one of the set its row,
    column or heading names, and every number of the run is shown."""
    want, text = oracle[run]["want"], (runs[run] / "report.md").read_text()
    order = re.search(r"; cells: (\S+) / (\S+);", text).groups()
    assert sorted(order) == ["val_in", "val_out"]
    checked = set()
    sets = ("val_in", "val_out", "ibd")
    for headings, header, body in markdown_tables(text):
        assert header[1:] == ["oracle"] or headings[2].startswith("Figure 4")
        title = headings[2]
        if title in ("fd", "fd_bootstrap", "fld", "precision", "recall"):  # Table 2
            for label, cell in body:
                parts = cell.split(" / ")
                assert len(parts) == 2, cell
                for val, part in zip(order, parts):
                    check_cell(part, want, (label, val, title), checked)
        elif title.startswith("cosine"):
            for label, cell in body:
                check_cell(cell, want, (label, None, "cosine"), checked)
        elif title.startswith("Table 3"):
            cohort, beside = re.fullmatch(r"Table 3: (\S+) beside (\S+)", title).groups()
            assert (cohort, beside) == ("ibd", order[1])  # the cohort beside val-out
            label = headings[3]
            for name, cell in body:
                metric, words = re.fullmatch(r"(\w+(?: baseline)?) \((.+)\)", name).groups()
                val = named_set(words, (cohort, beside))
                if metric == "fd baseline":
                    check_cell(cell, want, (BASELINE, val, "fd"), checked)
                else:
                    check_cell(cell, want, (label, val, metric), checked)
        else:  # Figure 4: a row per step count, a column per sampler, on the val set its heading names
            val = named_set(title, sets)
            assert header[0] == "steps" and sorted(header[1:]) == sorted(SAMPLERS) and "(oracle," in title
            for steps, *cells in body:
                for sampler, cell in zip(header[1:], cells):
                    check_cell(cell, want, (run_label(sampler, int(steps)), val, "fd"), checked)
    table2 = {"fd", "fd_bootstrap", "fld", "precision", "recall", "cosine"}  # every run, against val_in and val_out
    table3 = {"fd", "fld", "precision", "recall", "cosine"}  # each run against the cohort; its baseline: FD only
    assert checked == {(label, val, metric) for label, val, metric in want if metric in table2 and val in (
        None, "val_in", "val_out") or metric in table3 and val == "ibd" and (label != BASELINE or metric == "fd")}
    if run == "a":
        ibd = oracle["a"]["cohorts"][1]
        assert (f"--ood ibd: {runs['root'] / 'cohort'}, {sum(COHORT_SLIDES)} tiles split by slide (--seed {SEED}): "
                f"{len(ibd['guide'])} guidance / {len(ibd['refs']['ibd'])} reference tiles") in text
    else:
        assert f"({len(runs['pairs'])} generated tiles paired)" in text


# -------- Figure 4: the data behind the plot, and the set its title names ----------------------------------------
def test_figure_4_shows_the_fd_of_the_val_set_its_title_names(runs, oracle):
    want = oracle["a"]["want"]
    figure = json.loads((runs["a"] / "fd_vs_steps.json").read_text())
    assert (runs["a"] / "fd_vs_steps.png").stat().st_size > 0
    val = figure["val"]
    assert val == "val_out" and figure["extractor"] == "oracle" and figure["metric"] == "fd"  # the paper's Figure 4
    plot = figure["plot"]  # what the PNG shows, read back from its axes
    for title in (figure["title"], plot["title"]):
        assert named_set(title, ("val_in", "val_out", "ibd")) == val and "oracle" in title
    assert plot["ylabel"] == "FD" and plot["xlabel"] == "sampling steps"
    assert sorted(plot["legend"]) == sorted(plot["lines"]) == sorted(s.upper() for s in SAMPLERS)
    for sampler in SAMPLERS:
        fds = [want[run_label(sampler, n), val, "fd"]["value"] for n in STEPS]
        for points in (figure["curves"][sampler], plot["lines"][sampler.upper()]):
            assert [p[0] for p in points] == list(STEPS)
            assert all(math.isclose(p[1], w, rel_tol=1e-6) for p, w in zip(points, fds)), (sampler, points, fds)


# -------- --compare: each run's numbers under their column's name ----------------------------------------------
def test_compare_shows_each_runs_numbers_under_the_column_that_names_them(runs, oracle):
    table = json.loads((runs["c"] / "compare.json").read_text())
    by_dir = {str(runs[r]): oracle[r]["want"] for r in ("a", "b")}
    columns = {}
    for column in table["columns"]:
        val = None if column["val"] is None else column["val"]
        assert column["name"] == f"{column['metric']} {column['extractor']} {val or 'tiles'}"
        columns[column["name"]] = (column["metric"], val)
    shared = set.intersection(*({(k[2], k[1]) for k in want} for want in by_dir.values()))
    assert set(columns.values()) == shared  # every (metric, val) both runs report, and no other
    paths = {}
    for i, row in enumerate(table["rows"]):
        want = by_dir[row["run"]]
        assert set(row["values"]) == {name for name, (metric, val) in columns.items()
                                      if (row["row"], val, metric) in want}
        for name, cell in row["values"].items():
            metric, val = columns[name]
            w = want[row["row"], val, metric]
            paths["rows", i, "values", name, "value"] = (w["value"], metric)
            if w["std"] is not None:
                paths["rows", i, "values", name, "std"] = (w["std"], metric)
    assert sorted((r["run"], r["row"]) for r in table["rows"]) == sorted(
        (run, label) for run, want in by_dir.items() for label in {k[0] for k in want})
    got = numbers(table)
    assert set(got) == set(paths)
    wrong = [(k, got[k], w) for k, (w, metric) in paths.items() if not close(got[k], w, metric, k[-1])]
    assert not wrong, wrong[:5]
    # compare.md: the same numbers, each under its column's name, on the row of its run and label
    (_, header, body), = markdown_tables((runs["c"] / "compare.md").read_text())
    names = [re.sub(r" \*\d+$", "", h) for h in header[3:]]
    assert set(names) == set(columns)
    for _, run_dir, label, *cells in body:
        for name, cell in zip(names, cells):
            metric, val = columns[name]
            key = (label, val, metric)
            if key not in by_dir[run_dir]:
                assert cell == "-"
                continue
            w = by_dir[run_dir][key]
            expect = [w["value"]] + ([w["std"]] if metric == "fd_bootstrap" else [])
            assert all(abs(a - b) <= 5e-4 + 1e-9 for a, b in zip(shown(cell), expect)) and len(shown(cell)) == len(
                expect), (run_dir, key, cell)
    assert len(body) == len(table["rows"])


# -------- metrics.py: two folders, FD on a generated budget ------------------------------------------------------
def test_every_number_of_metrics_json_equals_its_recomputation(runs, tmp_path, monkeypatch):
    """metrics.py on run A's folders: the guidance tiles as the real set (the sde-3 samples pair with them by
    name), the cohort's guidance half as FLD's training set; FD on a budget of 9 of the 12 generated tiles,
    drawn and recorded; every number of metrics.json recomputed, the bootstrap's draws one by one."""
    import metrics
    monkeypatch.setitem(extractors.EXTRACTORS, "oracle", SPEC)
    monkeypatch.setattr(metrics, "build_extractor", lambda name, pretrained, device, seed: KnownExtractor())
    a, out, budget = runs["a"], tmp_path / "metrics", 9
    real_dir, gen_dir, train_dir = a / "guidance", a / "generated" / "sde-3", a / "ood" / "ibd" / "guidance"
    assert metrics.main(["--val", str(real_dir), "--generated", str(gen_dir), "--guidance", str(train_dir),
                         "--metrics", "fd,pr,cosine,fld,bootstrap", "--fd-num-generated", str(budget), "--extractors",
                         "oracle", "--random-weights", "--device", "cpu", "--num-workers", "0", "--k", str(K),
                         "--bootstrap-draws", str(DRAWS), "--fld-num-generated", str(FLD_NUM_GENERATED),
                         "--seed", str(SEED), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    real = features_of(sorted(real_dir.glob("*.png")))
    gen, train = sampled(gen_dir, NUM_GUIDANCE), features_of(sorted(train_dir.glob("*.png")))
    report = json.loads((out / "metrics.json").read_text())
    rows = {r["metric"]: r for r in report["results"]}
    assert sorted(rows) == sorted(["fd", "fd_bootstrap", "precision", "recall", "cosine", "fld", "fld_gap"])
    spec = json.loads(json.dumps(dataclasses.asdict(SPEC)))
    counts = dict(extractor=spec, n_val=len(real), n_generated=len(gen), seed=SEED)
    used = np.load(out / rows["fd"]["settings"]["subsets"])["generated"]
    assert used.shape == (len(gen),) and used.sum() == budget  # the budget: 9 distinct generated tiles
    drawn = np.load(out / rows["fd_bootstrap"]["settings"]["subsets"])["bootstrap"]
    mean, std, values = defs.bootstrap_by_definition(real, gen, drawn, DRAWS)
    precision, recall = defs.prdc_pr(real, gen, K)
    out_fld = defs.fld_by_definition(train, real, gen, dict(np.load(out / rows["fld"]["settings"]["subsets"])),
                                    FLD_NUM_GENERATED)
    fld_settings = dict(counts, n_guidance=len(train), epochs=50, **out_fld)
    want = dict(fd=(defs.fid_fd(real, gen[used]), None, dict(counts, n_generated_used=budget)),
                fd_bootstrap=(mean, std, dict(counts, draws=DRAWS, size=len(gen) // 2, values=values)),
                precision=(precision, None, dict(counts, k=K)), recall=(recall, None, dict(counts, k=K)),
                cosine=(*defs.numpy_cosines(real, gen)[:2], dict(counts, n_pairs=len(gen))),
                fld=(out_fld["fld"], None, fld_settings), fld_gap=(out_fld["fld_gap"], None, fld_settings))
    paths = {}
    for i, r in enumerate(report["results"]):
        value, std, settings = want[r["metric"]]
        paths.update({("results", i, *k): (v, r["metric"]) for k, v in numbers(
            dict(value=value, std=std, settings=settings)).items()})
    got = numbers(report)
    assert set(got) == set(paths), (sorted(set(got) - set(paths))[:5], sorted(set(paths) - set(got))[:5])
    wrong = [(k, got[k], w) for k, (w, metric) in paths.items() if not close(got[k], w, metric, k[-1])]
    assert not wrong, wrong[:5]
    # and the words beside each number: the weights (random, seeded by --seed) and each set's preprocessing
    # (nothing asked: as stored, the extractor's own resize kernel)
    as_stored = dict(jpeg=None, crop=None, kernel=SPEC.kernel, resize_to_input=False)
    for r in report["results"]:
        assert r["settings"]["weights"] == f"random(seed={SEED})", r["settings"]["weights"]
        assert r["settings"]["preprocess"] == dict.fromkeys(("val", "guidance", "generated"), as_stored)
