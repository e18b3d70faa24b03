"""Plant one-line bugs one at a time and report which ones the tests let through (issue 26).

    python tools/mutate.py                       # the default list below; about 6 minutes on 2 cores
    python tools/mutate.py --only 1,5,12         # some of them (numbers as the report prints them)
    python tools/mutate.py --list mutations.json # [{"file", "old", "new", "tests": [...], "kind"}, ...]

Each mutation replaces `old` (an exact substring that must occur once in `file`) by `new` and runs its
related tests (pytest node ids or files) with -x -q; a mutation survives when they all pass. Everything
runs in a copy of the working tree under /tmp (the files git tracks and the untracked ones it does not
ignore), made once, each file restored after its mutation: the repo itself is never modified. First the
related tests run once unmutated, so that a failure is the mutation's.

Not part of CI (slow), and not collected by pytest (tools/ is outside pytest.ini's testpaths). Left out:
mutations that span several lines, running mutations in parallel.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support.cli import InputError, MissingInput, run  # noqa: E402  (the repo's one error path)


@dataclass
class Mutation:
    file: str
    old: str
    new: str
    tests: list = field(default_factory=list)
    kind: str = ""


M, O, S, E = "tests/test_metrics.py", "tests/test_options.py", "tests/test_seeds.py", "tests/test_saved_files.py"
CLI_ROWS = [f"{M}::test_command_line_rows_hold_precision_recall_fd_bootstrap_and_cosine_by_hand"]
WEIGHTS = [f"{O}::test_each_network_loads_the_weights_its_own_keyword_names",
           f"{O}::test_sample_weight_flags_reach_their_own_network"]
EXPORT = [f"{O}::test_export_writes_the_tensors_each_flag_names"]
SAMPLING = [f"{O}::test_each_sampling_flag_reaches_the_sampler_and_changes_only_its_setting",
            f"{O}::test_the_api_keywords_reach_the_sampler"]
EVALUATE_FLAGS = [f"{O}::test_evaluate_passes_each_sampling_flag_to_sample_py"]
METRICS_PREP = [f"{O}::test_metrics_preprocessing_and_extractor_flags_reach_each_set"]
EVALUATE_PREP = [f"{O}::test_evaluate_preprocessing_flags_reach_each_set"]
PIXELS = [f"{O}::test_the_resize_kernel_crop_and_jpeg_reach_the_pixels_the_extractor_sees"]
ENCODER_FLAG = [f"{O}::test_the_encoder_flag_and_seed_reach_the_encoder_train_and_features_load"]
ENCODER = [f"{O}::test_encoder_input_is_normalised_with_the_model_cards_constants",
           f"{O}::test_tiles_of_another_size_are_resized_to_224_bicubic_antialiased_before_normalising",
           f"{O}::test_cls_is_token_0_and_the_patches_follow_the_4_registers",
           f"{O}::test_the_16_to_14_token_resize_lands_where_bicubic_puts_it"]
CONSTANTS = [f"{O}::test_the_tile_size_and_mpp_are_read_from_tiling_py_everywhere_else",
             f"{O}::test_features_writes_the_token_grid_train_builds_for_every_preset"]
SAVED = [f"{E}::test_each_checkpoint_entry_is_the_tensor_it_names",
         f"{E}::test_a_checkpoint_loads_each_entry_into_the_network_it_names",
         f"{E}::test_each_export_file_is_the_checkpoint_tensor_it_names",
         f"{E}::test_a_run_interrupted_after_a_checkpoint_resumes_to_the_straight_runs_weights"]
MASK = ["tests/test_tissue_mask.py"]
ORDER, OPTION = "metric argument order", "option not reaching its code"
SEEDS, SUBSET, KEY = "non-unique seeds", "bootstrap subset", "checkpoint key"
THRESHOLD, ENCODING, CONSTANT = "threshold direction", "encoder preprocessing", "restated constant"

DEFAULT = [
    # a metric's arguments in the wrong order
    Mutation("metrics.py", "p, r = precision_recall(real, gen, args.k, device)",
             "p, r = precision_recall(gen, real, args.k, device)", CLI_ROWS, ORDER),
    Mutation("metrics.py", 'add("precision", p, k=args.k)', 'add("precision", r, k=args.k)', CLI_ROWS, ORDER),
    Mutation("metrics.py", "precision = coverage(generated, real, knn_radii(real, k))",
             "precision = coverage(generated, real, knn_radii(generated, k))", [M], ORDER),
    Mutation("metrics.py", "a, b = real[ri].astype(np.float64), generated[fi].astype(np.float64)",
             "a, b = real[fi % len(real)].astype(np.float64), generated[fi].astype(np.float64)", [M], ORDER),
    # an option that does not reach its code
    Mutation("sample.py", 'models = load_models(path, device, sit_weights == "ema", vae_weights == "ema")',
             'models = load_models(path, device, sit_weights == "ema", sit_weights == "ema")', WEIGHTS, OPTION),
    Mutation("sample.py", "pipe = load_pipeline(args.ckpt, device, args.sit_weights, args.vae_weights,",
             "pipe = load_pipeline(args.ckpt, device, args.vae_weights, args.sit_weights,", WEIGHTS, OPTION),
    Mutation("support/weights.py", 'pick(get, "vae", vae_ema, path)', 'pick(get, "vae", sit_ema, path)', WEIGHTS,
             OPTION),
    Mutation("support/weights.py", 'name = f"{net}_ema" if kind == "ema" else net',
             'name = f"{net}_ema" if kind == "ema" else "sit"', EXPORT, OPTION),
    Mutation("evaluate.py", '"--vae-weights",\n            args.vae_weights',
             '"--vae-weights",\n            args.sit_weights', EVALUATE_FLAGS, OPTION),
    Mutation("sample.py", 'heun=settings.sampler == "heun"', 'heun=settings.sampler != "sde"', SAMPLING, OPTION),
    Mutation("sample.py", "guidance_high=settings.guidance_high,", "guidance_high=0.75,", SAMPLING, OPTION),
    Mutation("sample.py", "SamplingSettings(sampler, num_inference_steps,",
             'SamplingSettings("sde", num_inference_steps,', SAMPLING, OPTION),
    Mutation("metrics.py", 'preps = {s: Preprocess(getattr(args, f"jpeg_{s}"), args.crop,',
             "preps = {s: Preprocess(args.jpeg_real, args.crop,", METRICS_PREP, OPTION),
    Mutation("metrics.py", "extractor, kernel = get_extractor(), prep.kernel or spec.kernel",
             "extractor, kernel = get_extractor(), spec.kernel", PIXELS, OPTION),
    Mutation("evaluate.py", 'measure(cohort.guidance, "guidance")', 'measure(cohort.guidance, "val")', EVALUATE_PREP,
             OPTION),
    Mutation("train.py", "encoder = load_encoder(args.encoder, pretrained=pretrained, seed=args.seed)",
             "encoder = load_encoder(args.encoder, pretrained=pretrained, seed=0)", ENCODER_FLAG, OPTION),
    # noise seeds that are not unique per image
    Mutation("support/sampling.py", "((i, 1.0),), i * n + k)", "((i, 1.0),), i + n * k)", [S], SEEDS),
    Mutation("support/sampling.py", 'Job(f"{j:06d}", (), j)', 'Job(f"{j:06d}", (), 0)', [S], SEEDS),
    Mutation("sample.py", "manual_seed(noise_seed(settings.seed, i)) for i in noise_ids]",
             "manual_seed(noise_seed(settings.seed, i)) for i in range(len(noise_ids))]", [S], SEEDS),
    Mutation("sample.py", "cond, ids = batch_conditioning(source, batch, pipe), [j.noise_id for j in batch]",
             "cond, ids = batch_conditioning(source, batch, pipe), list(range(start, start + len(batch)))", [S], SEEDS),
    Mutation("sample.py", "return int(np.random.SeedSequence([seed, noise_id])",
             "return int(np.random.SeedSequence([seed + noise_id])", [S], SEEDS),
    # a resampling statistic on the wrong subset
    Mutation("metrics.py", "rng.choice(len(generated), size, replace=False)",
             "rng.choice(len(generated), size, replace=True)", [M], SUBSET),
    Mutation("metrics.py", "bootstrap_fd(feature_stats(real), gen, args.bootstrap_draws, size, args.seed)",
             "bootstrap_fd(feature_stats(gen), real, args.bootstrap_draws, size, args.seed)", CLI_ROWS, SUBSET),
    Mutation("metrics.py", "std = float(np.std(values, ddof=1)) if draws > 1 else 0.0", "std = float(np.std(values))",
             [M], SUBSET),
    Mutation("evaluate.py", "order = np.random.default_rng(seed).permutation(len(real))",
             "order = np.arange(len(real))", [M], SUBSET),
    # a saved file whose keys do not hold what their names say
    Mutation("support/checkpoints.py", '"sit_ema": nets.sit_ema.state_dict()', '"sit_ema": nets.sit.state_dict()',
             SAVED, KEY),
    Mutation("support/checkpoints.py", '"vae_ema": nets.vae_ema.state_dict()', '"vae_ema": nets.vae.state_dict()',
             SAVED, KEY),
    Mutation("support/checkpoints.py", '"opt_vae": opts["vae"].state_dict()', '"opt_vae": opts["sit"].state_dict()',
             SAVED, KEY),
    Mutation("support/checkpoints.py", "getattr(nets, name).load_state_dict(ckpt[name])",
             'getattr(nets, name).load_state_dict(ckpt[name.replace("_ema", "")])', SAVED, KEY),
    Mutation("support/checkpoints.py", 'if ckpt and len(ckpt["rng"]) == world:',
             'if ckpt and len(ckpt["rng"]) != world:', SAVED, KEY),
    Mutation("support/weights.py", "            sd = get(name)\n", "            sd = get(net)\n", SAVED, KEY),
    # a threshold's direction
    Mutation("tiling.py", "mask = saturation > max(otsu_threshold(saturation), MIN_SATURATION)",
             "mask = saturation < max(otsu_threshold(saturation), MIN_SATURATION)", MASK, THRESHOLD),
    Mutation("tiling.py", "mask = saturation > max(otsu_threshold(saturation), MIN_SATURATION)",
             "mask = saturation > min(otsu_threshold(saturation), MIN_SATURATION)", MASK, THRESHOLD),
    Mutation("tiling.py", "keep = (fraction >= min_tissue)", "keep = (fraction > min_tissue)", MASK, THRESHOLD),
    # a frozen model's preprocessing
    Mutation("features.py", "H0_MINI_MEAN = (0.707223, 0.578729, 0.703617)", "H0_MINI_MEAN = (0.485, 0.456, 0.406)",
             ENCODER, ENCODING),
    Mutation("features.py", "H0_MINI_STD = (0.211883, 0.230117, 0.177517)", "H0_MINI_STD = (0.229, 0.224, 0.225)",
             ENCODER, ENCODING),
    Mutation("features.py", "x = tokens.transpose(1, 2).reshape(B, D, side, side)",
             "x = tokens.reshape(B, D, side, side)", ENCODER, ENCODING),
    Mutation("features.py", "return x.flatten(2).transpose(1, 2)",
             "return x.transpose(2, 3).flatten(2).transpose(1, 2)", ENCODER, ENCODING),
    Mutation("features.py", "tokens[:, encoder.num_prefix_tokens:]", "tokens[:, 1:]", ENCODER, ENCODING),
    Mutation("features.py", 'size=(token_grid, token_grid), mode="bicubic", antialias=True',
             'size=(token_grid, token_grid), mode="bicubic", antialias=False', ENCODER, ENCODING),
    Mutation("features.py", 'size=(ENCODER_SIZE, ENCODER_SIZE), mode="bicubic", antialias=True',
             'size=(ENCODER_SIZE, ENCODER_SIZE), mode="bilinear", antialias=True', ENCODER, ENCODING),
    # a constant restated instead of read from its owner
    Mutation("features.py", "grid = token_grid(args.model, latent_size(args.vae, args.image_size))",
             "grid = args.image_size // 16", CONSTANTS, CONSTANT),
    Mutation("sample.py", "size, mpp, dim = pipe.tile_size, args.cond_mpp or TILE_MPP, pipe.sit.cond_dim",
             "size, mpp, dim = pipe.tile_size, args.cond_mpp or 0.5, pipe.sit.cond_dim", CONSTANTS, CONSTANT),
    # this round's additions: restaining, the OOD split, evaluate's rows, the collapse watch, locks, checksums
    Mutation("sample.py", "t_start=strength if content is not None else 1.0)", "t_start=1.0)",
             ["tests/test_restain.py"], OPTION),
    Mutation("sample.py", "x = interpolate(self.encode(content), x, t)", "x = interpolate(x, self.encode(content), t)",
             ["tests/test_restain.py"], OPTION),
    Mutation("sampler.py", "ts = start_at(ode_time_grid(num_steps), t_start, 0.0)", "ts = ode_time_grid(num_steps)",
             ["tests/test_sampler.py"], OPTION),
    Mutation("evaluate.py", "precision, recall = M.precision_recall(real, gen, args.k, device)",
             "precision, recall = M.precision_recall(gen, real, args.k, device)", ["tests/test_evaluate.py"], ORDER),
    Mutation("evaluate.py", "score_set(adder(BASELINE, val, len(guide)), real, guide, None, args, device, with_fld=False)",
             "score_set(adder(BASELINE, val, len(guide)), guide, real, None, args, device, with_fld=False)",
             ["tests/test_evaluate.py"], ORDER),
    Mutation("support/logs.py", "COLLAPSE_INTERVALS = 3", "COLLAPSE_INTERVALS = 1", ["tests/test_logs.py"], THRESHOLD),
    Mutation("support/outputs.py", "fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
             ["tests/test_cli.py", "tests/test_tiling.py"], OPTION),
    Mutation("support/weights.py", "if sha256(path) != expected:", "if False:", ["tests/test_pipeline.py"], KEY),
    Mutation("train.py", 'p.add_argument("--image-size", type=IMAGE_SIZE, default=TILE_SIZE)',
             'p.add_argument("--image-size", type=IMAGE_SIZE, default=224)', CONSTANTS, CONSTANT),
]


def working_tree_files():
    """The files of the working tree that git tracks, and the untracked ones it does not ignore."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def copy_repo(dest):
    for f in working_tree_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def pytest(copy, tests, timeout, first_failure=True):
    """Run the tests in the copy -> (status, seconds, last line): status 0 all passed."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",  # one process: a few files
           *(["-x"] if first_failure else []), *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, f"timed out after {timeout} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, time.time() - start, (lines[-1] if lines else proc.stderr.strip()[-200:])


def plant(copy, m):
    """Apply one mutation in the copy -> the file's original text (to restore)."""
    path = copy / m.file
    if not path.is_file():
        raise MissingInput(f"mutation of {m.file}: no such file in the repo")
    text = path.read_text()
    if text.count(m.old) != 1:
        raise InputError(f"mutation of {m.file}: {m.old!r} occurs {text.count(m.old)} times there, not once; "
                         f"give a longer exact substring")
    path.write_text(text.replace(m.old, m.new))
    return text


def load_list(path):
    try:
        items = json.loads(Path(path).read_text())
        return [Mutation(**item) for item in items]
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"--list {path}: not a JSON list of {{file, old, new, tests, kind}} ({err})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", help="JSON file of mutations (default: the list in this file)")
    p.add_argument("--only", help="comma-separated mutation numbers (1-based) to run")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the related tests unmutated first")
    args = p.parse_args(argv)
    mutations = load_list(args.list) if args.list else DEFAULT
    numbers = [int(n) for n in args.only.split(",")] if args.only else range(1, len(mutations) + 1)
    chosen = [(n, mutations[n - 1]) for n in numbers]
    with tempfile.TemporaryDirectory(prefix="mutate-", dir="/tmp") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        for n, m in chosen:  # every mutation applies, before anything runs
            (copy / m.file).write_text(plant(copy, m))
        if not args.skip_baseline:
            tests = sorted({t for _, m in chosen for t in m.tests})
            status, seconds, last = pytest(copy, tests, args.timeout * 3, first_failure=False)
            print(f"baseline ({len(tests)} test targets, {seconds:.0f} s): {last}", flush=True)
            if status != 0:
                raise InputError("the related tests fail without any mutation: fix them first (see the line above)")
        survivors = []
        for n, m in chosen:
            original = plant(copy, m)
            try:
                status, seconds, last = pytest(copy, m.tests, args.timeout)
            finally:
                (copy / m.file).write_text(original)
            verdict = "SURVIVED" if status == 0 else "killed"
            print(f"{n:3d} {verdict:8s} {seconds:5.0f} s  [{m.kind}] {m.file}: {m.old.strip()!r} -> {m.new.strip()!r}"
                  + ("" if status in (0, 1) else f"  ({status}: {last})"), flush=True)
            if status == 0:
                survivors.append(n)
    killed = len(chosen) - len(survivors)
    print(f"\nkilled {killed} of {len(chosen)} ({100 * killed / len(chosen):.0f} %); survivors: {survivors or 'none'}")
    return 1 if survivors else 0


if __name__ == "__main__":
    run(main)
