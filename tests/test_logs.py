"""support/logs.py's collapse watch, driven by synthetic loss histories through Logger.step, as train.py calls it:
one WARNING line (stdout and log.txt) when a symptom lasts COLLAPSE_INTERVALS log intervals in a row, once per
episode; quiet on a healthy history and on isolated bad intervals (a discriminator that wins one step has a zero
gradient: the tiny training runs show it)."""
import pytest
import torch

from support import logs

HEALTHY = dict(diffusion=0.8, gan=0.5, disc=0.6, grad_sit=2.0, grad_vae=9.0, grad_disc=15.0, logits_real=2.0,
               logits_fake=-1.5)
COLLAPSED = dict(HEALTHY, gan=0.0, disc=1.0, grad_disc=0.0, logits_real=0.0, logits_fake=0.0)  # D outputs a constant


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(logs, "plot_losses", lambda rows, path: None)  # loss.png: matplotlib's time, not the watch's


def history(tmp_path, kinds, log_every=1):
    """Feed one step's terms per entry of kinds (a dict of loss values) -> the WARNING lines of log.txt."""
    tmp_path.mkdir(exist_ok=True)
    log = logs.Logger(str(tmp_path), rank=0, log_every=log_every, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for step, terms in enumerate(kinds, start=1):
        noisy = {k: torch.tensor(v * (1 + 0.05 * torch.randn((), generator=g).item())) for k, v in terms.items()}
        log.step(step, noisy, last=step == len(kinds))
    return [line for line in (tmp_path / "log.txt").read_text().splitlines() if "WARNING" in line]


def test_a_flat_history_warns_once_at_the_third_interval(tmp_path, capsys):
    warnings = history(tmp_path, [HEALTHY] * 5 + [COLLAPSED] * 15)
    assert len(warnings) == 1 and "(step 8, 3 log intervals in a row)" in warnings[0], warnings
    assert "grad_disc = 0 is below" in warnings[0] and "discriminator's mean logits on real tiles (0)" in warnings[0]
    assert warnings[0].split("] ", 1)[1] in capsys.readouterr().out


def test_a_healthy_history_and_isolated_bad_intervals_stay_quiet(tmp_path):
    assert history(tmp_path / "a", [HEALTHY] * 30) == []
    blips = ([HEALTHY] * 3 + [COLLAPSED]) * 4 + [HEALTHY, COLLAPSED, COLLAPSED, HEALTHY]  # never 3 in a row
    assert history(tmp_path / "b", blips) == []


def test_each_episode_warns_once(tmp_path):
    warnings = history(tmp_path, [COLLAPSED] * 4 + [HEALTHY] + [COLLAPSED] * 6)
    assert [w.split("(step ")[1].split(",")[0] for w in warnings] == ["3", "8"]


def test_the_watch_sees_log_intervals_not_steps(tmp_path):
    """With --log-every 5, ten collapsed steps are two intervals: quiet; fifteen are three."""
    assert history(tmp_path / "a", [HEALTHY] * 5 + [COLLAPSED] * 10, log_every=5) == []
    assert len(history(tmp_path / "b", [HEALTHY] * 5 + [COLLAPSED] * 15, log_every=5)) == 1


@pytest.mark.parametrize("key", ["grad_sit", "grad_vae"])
def test_a_network_whose_gradient_vanishes_is_named(key, tmp_path):
    warnings = history(tmp_path, [HEALTHY] * 2 + [dict(HEALTHY, **{key: 1e-7})] * 3)
    assert len(warnings) == 1 and f"{key} = " in warnings[0] and "logits" not in warnings[0], warnings


def test_a_run_without_discriminator_is_watched_on_its_gradients_only(tmp_path):
    no_gan = {k: v for k, v in HEALTHY.items() if k not in ("gan", "disc", "grad_disc", "logits_real", "logits_fake")}
    assert history(tmp_path / "a", [no_gan] * 6) == []
    assert len(history(tmp_path / "b", [dict(no_gan, grad_sit=0.0)] * 3)) == 1
