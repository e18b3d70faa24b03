"""What a real machine does to a run, on the real tools in subprocesses: a full disk (a small tmpfs, as root),
a file-size limit (RLIMIT_FSIZE), Ctrl-C and SIGTERM (os.kill), no hub. Each ends in one line that says what
happened and how to continue, leaves no temporary file, and the rerun or resume ends on a straight run's result.
"""
import errno
import fcntl
import os
import pty
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import features
import metrics
import sample
import train
from support import checkpoints, cli, hub, outputs, weights
from support.slides import write_coords

ROOT = Path(__file__).resolve().parent.parent
TILES = ROOT / "tests" / "data" / "tiles"
STEPS = 6
TINY = ["--tiles", str(TILES), "--image-size", "32", "--resize", "scale", "--model", "SiT-T/2", "--vae", "tiny",
        "--encoder", "tiny", "--no-lpips", "--no-gan", "--global-batch-size", "2", "--num-workers", "0",
        "--log-every", "3", "--sample-every", "0", "--ckpt-every", "2", "--max-steps", str(STEPS)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
NETS = ("sit", "sit_ema", "vae", "vae_ema", "opt_sit", "opt_vae")


def tool(script, *argv, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, **kwargs)


def temporary_files(folder):
    return sorted(str(p) for p in Path(folder).rglob("*") if ".tmp" in p.name)


def same_weights(a, b):
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return all(torch.equal(a[n][k], b[n][k]) for n in NETS[:4] for k in a[n]) and \
        all(torch.equal(x, y) for n in NETS[4:] for s in a[n]["state"] for x, y in
            zip(a[n]["state"][s].values(), b[n]["state"][s].values()))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted tiny run every faulty one must end on."""
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = tool("train.py", *TINY, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step/s" not in proc.stderr and "s/step" not in proc.stderr  # no progress bar in a log
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a tmpfs of that size at tmp_path/disk (a disk that fills up); remount(size) frees space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size, remount=False):
        opts = f"{'remount,' if remount else ''}size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)], capture_output=True, text=True)
        denied = re.search(r"superuser|not permitted|permission denied", proc.stderr, re.I)
        if proc.returncode and not mounted and denied:
            pytest.skip(f"a small tmpfs needs root, or CAP_SYS_ADMIN (EPERM): {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stderr
        mounted.append(True)
        return disk
    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


def one_line(proc, status):
    """The process ended with `status`, no traceback, and one line saying why, the last on stderr (the tool's
    notes and progress bars may come before it) -> that line."""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == status and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    said = [line for line in lines if re.match(r"[\w.]+\.py: (error|interrupted)", line)]
    assert said == lines[-1:], proc.stderr[-3000:]
    return said[0]


# -------- A full disk ------------------------------------------------------------------------------------
def test_a_full_disk_stops_training_in_one_line_and_resume_ends_on_the_straight_run(straight, tmpfs):
    """A checkpoint is 12 MB: the 20 MB disk takes the first and refuses the second, mid-write."""
    out = tmpfs("20m") / "run"
    line = one_line(tool("train.py", *TINY, "--out", out), 1)
    needed = re.fullmatch(rf"train\.py: error: could not write {out}/checkpoints/0000004\.pt: no space left on device "
                          rf"\(the write needed about ([\d.]+) MB\); free space on its disk, then continue with "
                          rf"--resume \(the last checkpoint is step 2\)", line)
    assert needed, line
    real = os.path.getsize(straight / "checkpoints" / "0000004.pt") / 1e6
    assert abs(float(needed.group(1)) - real) < 0.05 * real  # what the checkpoint does take, not what fitted
    assert (out / "log.txt").read_text().splitlines()[-1].endswith(line)  # the log says why the run stopped
    assert temporary_files(out) == []
    assert sorted(os.listdir(out / "checkpoints")) == ["0000002.pt", "0000002.pt.sha256"]
    weights.load_file(str(out / "checkpoints" / "0000002.pt"))  # finished: valid, its sum checked

    tmpfs("60m", remount=True)  # space freed
    proc = tool("train.py", *TINY, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert same_weights(out / "checkpoints" / "0000006.pt", straight / "checkpoints" / "0000006.pt")


def test_a_file_size_limit_stops_training_before_its_first_checkpoint(straight, tmp_path):
    """RLIMIT_FSIZE (`ulimit -f`) below a checkpoint's size: EFBIG. Data workers would hang under it (it caps
    torch's shared memory too): --num-workers 0."""
    limit = 8 * 2 ** 20

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    out = tmp_path / "run"
    line = one_line(tool("train.py", *TINY, "--out", out, preexec_fn=limited), 1)
    assert re.fullmatch(rf"train\.py: error: could not write {out}/checkpoints/0000002\.pt: file larger than the "
                        rf"file-size limit \(ulimit -f\) \(the write needed about [\d.]+ MB\); raise the limit, then "
                        rf"continue with --resume \(no checkpoint was written yet\)", line), line
    assert temporary_files(out) == [] and os.listdir(out / "checkpoints") == []
    proc = tool("train.py", *TINY, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert same_weights(out / "checkpoints" / "0000006.pt", straight / "checkpoints" / "0000006.pt")


def two_slides(folder):
    folder.mkdir()
    for name in ("a", "b"):  # one real slide under two names: two slides of 30 tiles, about 4 MB each
        os.symlink(ROOT / "tests" / "data" / "cmu_small_region.svs", folder / f"{name}.svs")
    return folder


def test_a_full_disk_stops_tiling_in_one_line_and_the_rerun_writes_the_straight_runs_tiles(tmp_path, tmpfs):
    slides = two_slides(tmp_path / "slides")
    argv = ["--slides", slides, "--max-tiles-per-slide", "30"]
    reference = tmp_path / "straight"
    assert tool("tiling.py", *argv, "--out", reference).returncode == 0
    out = tmpfs("5m") / "tiles"  # slide a fits, slide b does not
    line = one_line(tool("tiling.py", *argv, "--out", out), 1)
    assert re.fullmatch(rf"tiling\.py: error: could not write {out}/tiles/b/b_\d+_\d+\.png: no space left on device "
                        rf"\(the write needed at most 151\.6 KB\); free space on its disk, then rerun the same "
                        rf"command: what is finished is kept", line), line  # a 224 px RGB tile: 150528 bytes + 1 KB
    assert temporary_files(out) == [] and not (out / "manifest.csv").exists()
    assert not (out / "tiles" / "b").exists() and (out / "slides" / "a.done.json").exists()  # b is redone, a kept

    tmpfs("16m", remount=True)
    proc = tool("tiling.py", *argv, "--out", out)
    assert proc.returncode == 0 and "1 slides already done, 1 tiled now" in proc.stdout, proc.stderr[-2000:]
    assert (out / "manifest.csv").read_text() == (reference / "manifest.csv").read_text()
    files = sorted(p.relative_to(reference) for p in (reference / "tiles").rglob("*.png"))
    assert files == sorted(p.relative_to(out) for p in (out / "tiles").rglob("*.png")) and len(files) == 60
    assert all((out / f).read_bytes() == (reference / f).read_bytes() for f in files)
    for name in ("a", "b"):
        with h5py.File(out / "coords" / f"{name}.h5") as f, h5py.File(reference / "coords" / f"{name}.h5") as g:
            assert np.array_equal(f["coords"][:], g["coords"][:])


def test_every_writer_on_a_full_disk_raises_one_disk_full_and_leaves_no_temporary_file(tmpfs):
    """Each writer's own error on a full disk (an errno, an errno only in the text (h5py), numpy's short write
    without one) becomes the one DiskFull, with the bytes the whole file needs where the writer knows them."""
    disk = tmpfs("64k")
    big = np.zeros((40_000,), np.float32)  # 160 kB
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)  # incompressible: 150 kB
    geo = type("Geo", (), dict(size=224, step=448.0, level=0, slide_mpp=0.25, mpp=0.5))
    writers = {"x.npy": (lambda p: outputs.save_npy(big, p), "about 160.1 KB"),
               "x.png": (lambda p: outputs.save_png(image, p), "at most 151.6 KB"),
               "x.json": (lambda p: outputs.save_json({"x": "y" * 100_000}, p), "at least"),
               "x.csv": (lambda p: outputs.save_csv([{"a": "y" * 100_000}], p, ["a"]), "at least"),
               "x.h5": (lambda p: write_coords(Path(p), np.zeros((10_000, 2), int), geo, "s"), "at least")}
    for name, (write, needed) in writers.items():
        with pytest.raises(cli.DiskFull, match=rf"^could not write {disk}/{name}: no space left on device \(the "
                                               rf"write needed {needed}"):
            write(str(disk / name))
        assert os.listdir(disk) == [], name
    (disk / "log.txt").write_text("x" * 60_000)
    with pytest.raises(cli.DiskFull, match=r"log\.txt: no space left on device \(the write needed about 10\.0 KB"):
        outputs.append_to(str(disk / "log.txt"), "y" * 9_999)


def test_an_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM in the middle of torch.save: the exception goes on, the half-written file does not."""
    def half_then_interrupted(obj, f):
        f.write(b"x" * 1000)
        raise cli.Interrupted(signal.SIGTERM)
    monkeypatch.setattr(torch, "save", half_then_interrupted)
    nets = type("Nets", (), {n: torch.nn.Linear(2, 2) for n in ("sit", "sit_ema", "vae", "vae_ema")})
    nets.disc = None
    opts = {n: torch.optim.SGD(getattr(nets, n).parameters()) for n in ("sit", "vae")}
    with pytest.raises(cli.Interrupted):
        checkpoints.save_checkpoint(str(tmp_path / "ck" / "0000002.pt"), nets, opts, 2, {}, [])
    assert os.listdir(tmp_path / "ck") == []


# -------- Ctrl-C and SIGTERM -----------------------------------------------------------------------------
def interrupt_when(cmd, ready, signum):
    """Start cmd in its own process group, wait until ready() is true, then send signum to the whole group (as a
    terminal's Ctrl-C or a scheduler does: the data workers too) -> the finished process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, ("the run ended before it could be interrupted", proc.communicate()[1][-3000:])
    os.killpg(proc.pid, signum)
    proc.stdout_text, proc.stderr = proc.communicate(timeout=120)
    return proc


def test_ctrl_c_stops_training_in_one_line_and_resume_ends_on_the_straight_run(straight, tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--num-workers", "2", "--max-steps", "1000", "--out", out]  # data workers get the Ctrl-C too
    proc = interrupt_when([sys.executable, "train.py", *map(str, argv)],
                          lambda: (out / "checkpoints" / "0000002.pt").exists(), signal.SIGINT)
    line = one_line(proc, 130)
    stopped = re.fullmatch(r"train\.py: interrupted after step (\d+) \(Ctrl-C, SIGINT\); the last checkpoint is step "
                           r"(\d+); continue with --resume", line)
    assert stopped, line
    last = int(stopped.group(2))
    assert sorted(os.listdir(out / "checkpoints"))[-1] == f"{last:07d}.pt.sha256" and last <= int(stopped.group(1))
    assert (out / "log.txt").read_text().splitlines()[-1].endswith(line)
    assert temporary_files(out) == [] and last < STEPS
    proc = tool("train.py", *TINY, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert same_weights(out / "checkpoints" / "0000006.pt", straight / "checkpoints" / "0000006.pt")


def finished(folder):
    """The images written so far (atomic() writes NAME.tmp.png first)."""
    return sorted(p.name for p in Path(folder).glob("*.png") if ".tmp" not in p.name)


def test_sigterm_stops_sampling_in_one_line_and_the_rerun_writes_the_straight_runs_images(ckpt_64px, tmp_path):
    argv = ["--ckpt", ckpt_64px, "--num-samples", "16", "--num-sampling-steps", "30", "--batch-size", "1",
            "--device", "cpu"]
    out, reference = tmp_path / "out", tmp_path / "straight"
    proc = interrupt_when([sys.executable, "sample.py", *argv, "--out", str(out)],
                          lambda: len(finished(out)) >= 2, signal.SIGTERM)
    assert one_line(proc, 143) == "sample.py: interrupted (SIGTERM); rerun the same command: what is finished is kept"
    done = finished(out)
    assert 2 <= len(done) < 16 and temporary_files(out) == [], done
    assert tool("sample.py", *argv, "--out", out).returncode == 0
    assert tool("sample.py", *argv, "--out", reference).returncode == 0
    names = sorted(p.name for p in reference.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == names and len(names) == 16
    assert all((out / n).read_bytes() == (reference / n).read_bytes() for n in names)


def test_ctrl_c_stops_tiling_with_slide_processes_in_one_line(tmp_path):
    """multiprocessing's workers would each print a KeyboardInterrupt traceback."""
    out = tmp_path / "tiles"
    cmd = [sys.executable, "tiling.py", "--slides", str(two_slides(tmp_path / "slides")), "--out", str(out),
           "--slide-processes", "2"]
    proc = interrupt_when(cmd, lambda: any((out / "tiles").rglob("*.png")), signal.SIGINT)
    assert one_line(proc, 130) == "tiling.py: interrupted (Ctrl-C, SIGINT); rerun the same command: what is finished " \
                                  "is kept"


def test_training_shows_a_progress_bar_on_a_terminal(tmp_path):
    """stderr on a terminal (a pseudo-terminal here): the bar with its rate and ETA; in a pipe, nothing (the
    straight fixture)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--max-steps", "3", "--out", str(tmp_path / "run")],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        try:
            chunk = os.read(master, 4096) if ready else b""
        except OSError as err:  # the terminal closed: the process ended
            assert err.errno == errno.EIO
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    bar = seen.decode(errors="replace").replace("\r", "\n").splitlines()
    assert any(re.search(r"3/3 \[\d\d:\d\d<00:00, +[\d.]+(step/s|s/step)\]", line) for line in bar), bar


# -------- No hub: one line per network, naming the tool's own flag --------------------------------------
@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network (the one probe says nothing answers) and empty caches: HF_HOME's hub and TORCH_HOME."""
    import extractors
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub, "reachable", lambda url: False)
    monkeypatch.setattr(extractors, "reachable", lambda url: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))


def flags_named(line):
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))


def own_flags(parser):
    return {opt for action in parser._actions for opt in action.option_strings}


def test_offline_every_network_is_one_line_naming_the_tools_own_flag(offline, tmp_path, ckpt, one_line_error):
    started = time.perf_counter()
    run_argv = [a for a in TINY if a != "--no-lpips"] + ["--out", str(tmp_path / "run")]
    lpips = one_line_error(train.main, run_argv)  # the tiny encoder needs nothing; LPIPS's VGG16 does
    assert "LPIPS's VGG16: could not load vgg16.tv_in1k (offline" in lpips and "`hf download timm/vgg16.tv_in1k`" \
        in lpips and lpips.endswith("or train without it: --no-lpips (no LPIPS term) or --random-weights (a pipeline "
                                    "check)")
    encoder = one_line_error(train.main, [*TINY, "--encoder", "h0-mini", "--out", str(tmp_path / "run2")])
    assert "h0-mini: could not load hf-hub:bioptimus/H0-mini" in encoder and "`hf download bioptimus/H0-mini`" \
        in encoder and encoder.endswith("--random-weights")
    tokens = one_line_error(features.main, ["--tiles", str(TILES), "--out", str(tmp_path / "tokens"),
                                            "--num-workers", "0"])
    assert "`hf download bioptimus/H0-mini`" in tokens and tokens.endswith("--random-weights")
    h0 = torch.load(ckpt, weights_only=True)
    h0["config"]["encoder"] = "h0-mini"  # a checkpoint trained with H0-mini: its tiles need the real one
    torch.save(h0, tmp_path / "h0.pt")
    sampled = one_line_error(sample.main, ["--ckpt", str(tmp_path / "h0.pt"), "--cond", str(TILES), "--n", "1",
                                           "--out", str(tmp_path / "samples"), "--device", "cpu"])
    assert "`hf download bioptimus/H0-mini`" in sampled and sampled.endswith("--features FILE.npy")
    for tool_main, line in ((train, lpips), (train, encoder), (features, tokens), (sample, sampled)):
        assert flags_named(line) and flags_named(line) <= own_flags(tool_main.build_parser()), line
    assert time.perf_counter() - started < 60  # each network fails at once, without retries


def test_offline_fid_inception_is_skipped_in_one_line_naming_metrics_flag(offline, tmp_path, capsys):
    from PIL import Image
    for folder in ("val", "gen"):
        (tmp_path / folder).mkdir()
        for i in range(4):
            Image.new("RGB", (32, 32), (i * 40, 100, 150)).save(tmp_path / folder / f"{i}.png")
    assert metrics.main(["--val", str(tmp_path / "val"), "--generated", str(tmp_path / "gen"), "--extractors",
                         "fid-inception", "--no-cache", "--num-workers", "0", "--out", str(tmp_path / "m")]) == 1
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 1 and f"copy it into {tmp_path}/torch/hub/checkpoints" in skipped[0], skipped
    assert flags_named(skipped[0]) == {"--random-weights"} <= own_flags(metrics.build_parser())


def test_a_disk_full_error_without_a_file_name_still_ends_in_one_line(capsys):
    """A library's own write (a symlink, a folder) refused by a full disk: run()'s last net."""
    def main(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "results/x/link")
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, [])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().endswith("error: could not write results/x/link: no space left on device; "
                                                    "free space on its disk, then rerun the same command: what is "
                                                    "finished is kept")
