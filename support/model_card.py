"""The model card of an export pushed to the Hugging Face hub (`python -m support.weights push`): README.md with
YAML front matter, the model and its training settings (from the export's config.json, which keeps them from the
train.py checkpoint), the benchmark's numbers when evaluate.py's report.json is given, the fields only the user
can fill (licence, where the training slides come from), and CytoSyn's citation (arXiv 2603.18089).

Left out: anything not recorded in the files (the card says so rather than guessing).
"""
import json

from support.cli import InputError, MissingInput

TO_FILL = "TO FILL"  # what the card leaves to the user: the licence and the data's provenance
TAGS = ("histopathology", "pathology", "diffusion", "latent-diffusion", "cytosyn")
CITATION = """@misc{duboudin2026cytosyn,
  title = {CytoSyn: a Foundation Diffusion Model for Histopathology -- Tech Report},
  author = {Duboudin, Thomas and Fontaine, Xavier and Andrier, Etienne and Guillou, Lionel and Filiot, Alexandre and
            Baiocco-Rodrigues, Thalyssa and Olivier, Antoine and Romagnoni, Alberto and Klein, John and
            Schiratti, Jean-Baptiste},
  year = {2026},
  eprint = {2603.18089},
  archivePrefix = {arXiv},
  primaryClass = {cs.CV},
  note = {Owkin}
}"""


def benchmark_report(path):
    """evaluate.py's report.json -> its result rows (each: row, extractor, val, metric, value, std)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise MissingInput(f"--report {path}: no such file (evaluate.py writes OUT/report.json)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"--report {path} is not evaluate.py's report.json ({err})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise InputError(f"--report {path} is not evaluate.py's report.json (no list of results)")
    return report


def front_matter(meta):
    lines = ["---"]
    if meta.get("layout") == "diffusers":
        lines.append("library_name: diffusers")
    lines += ["tags:"] + [f"- {tag}" for tag in TAGS]
    lines += [f"# license: {TO_FILL} (an SPDX id such as cc-by-nc-4.0, or `other` with license_name and "
              "license_link): what the training data and the weights you started from allow",
              f"# datasets: {TO_FILL} (hub ids of the training data, if any are public)", "---"]
    return lines


def usage(meta, repo):
    """How to sample from it: this project's tools (any layout), diffusers (the release's layout)."""
    lines = ["## Use", "", "With the CytoSyn reference implementation:", "", "```bash",
             f"python sample.py --ckpt hf-hub:{repo} --features cls.npy --n 1 --out samples", "```", ""]
    if meta.get("layout") == "diffusers":
        lines += ["With diffusers, as LazySlide loads CytoSyn (`h0_mini_embeds`: (N, 768) H0-mini CLS features):", "",
                  "```python", "from diffusers import DiffusionPipeline",
                  f'pipe = DiffusionPipeline.from_pretrained("{repo}", custom_pipeline="{repo}",',
                  "                                         trust_remote_code=True)",
                  "images = pipe(h0_mini_embeds=feats, num_inference_steps=250, guidance_scale=2.5, guidance_low=0.0, "
                  "guidance_high=0.75, seed=0)[\"images\"]", "```", ""]
    return lines


def settings_table(meta):
    config, training = meta.get("config", {}), meta.get("training", {})
    rows = [("step", meta.get("step")), *sorted(config.items()), *sorted(training.items())]
    lines = ["## Model and training settings", "", "From the export's config.json (the train.py checkpoint's "
             "settings; `python -m support.weights export`)." + ("" if training else " The source was not a train.py "
                                                                  "checkpoint: no training settings recorded."), "",
             "| setting | value |", "|---|---|"]
    return lines + [f"| {name} | {value} |" for name, value in rows] + [""]


def benchmark_table(report):
    """A row per run, metric and reference set, a column per extractor: the report's values (± std where given)."""
    results = report["results"]
    extractors = list(dict.fromkeys(r["extractor"] for r in results))
    keys = list(dict.fromkeys((r["row"], r["metric"], r["val"] or "tiles") for r in results))
    cells = {(r["row"], r["metric"], r["val"] or "tiles", r["extractor"]):
             f"{r['value']:.4g}" + (f" ± {r['std']:.3g}" if r.get("std") is not None else "") for r in results}
    lines = ["## Benchmark", "", f"evaluate.py's report.json of {report.get('date', 'an unknown date')} (every "
             "setting behind each number is in that file).", "",
             "| run | metric | reference | " + " | ".join(extractors) + " |",
             "|---|---|---|" + "---|" * len(extractors)]
    lines += [f"| {row} | {metric} | {val} | " + " | ".join(cells.get((row, metric, val, e), "-") for e in extractors)
              + " |" for row, metric, val in keys]
    return lines + [""]


def model_card(meta, repo, report=None):
    """An export's config.json (meta) and optionally evaluate.py's report.json (its path) -> README.md's text."""
    config = meta.get("config", {})
    lines = front_matter(meta) + [
        f"# {repo}", "",
        f"A CytoSyn model ([arXiv 2603.18089](https://arxiv.org/abs/2603.18089)) trained with the CytoSyn reference "
        f"implementation: SiT {config.get('model')} and VAE {config.get('vae')}, conditioned on the CLS features of "
        f"`{config.get('encoder')}`, {config.get('image_size')} px tiles at 0.5 µm/px; step {meta.get('step')}.", ""]
    lines += usage(meta, repo) + settings_table(meta)
    lines += benchmark_table(benchmark_report(report)) if report else ["## Benchmark", "", "Not given (push --report "
                                                                   "OUT/report.json of evaluate.py adds it).", ""]
    lines += ["## Licence", "", f"{TO_FILL}: the licence of these weights, which the training data's and the "
              "starting weights' licences bound.", "",
              "## Training data and provenance", "", f"{TO_FILL}: which slides (cohorts, number of slides and tiles, "
              "tiling settings), where they come from, and under which licence and consent they were used.", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)
