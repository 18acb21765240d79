"""Monitor in a plain PyTorch loop, read back from the event files a user opens in TensorBoard."""

import math

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from adam_monitor import DIAGNOSTICS, Monitor
from adam_monitor.cli.events import read_scalars


def noise_run(tmp_path, *, betas, steps, jump_at=None, every=1, size=4096, seed=0):
    """Adam on i.i.d. N(0, 1) gradients (×10 from ``jump_at`` on), logged through a SummaryWriter."""
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(size))
    opt = torch.optim.Adam([p], lr=1e-3, betas=betas)
    writer = SummaryWriter(str(tmp_path))
    monitor = Monitor(opt, named_parameters=[("w", p)], writer=writer, log_every_n_steps=every)
    for t in range(1, steps + 1):
        p.grad = torch.randn(size) * (10.0 if jump_at and t >= jump_at else 1.0)
        opt.step()
    monitor.close()
    writer.close()
    return read_scalars(tmp_path)


def test_tags_and_steps_are_exact(tmp_path):
    p1, p2 = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    model = torch.nn.Module()
    model.lin = torch.nn.Module()
    model.lin.weight, model.lin.bias = p1, p2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    writer = SummaryWriter(str(tmp_path))
    monitor = Monitor(opt, named_parameters=model.named_parameters(), writer=writer, log_every_n_steps=5)
    for _ in range(12):
        for p in (p1, p2):
            p.grad = torch.randn_like(p)
        opt.step()
    monitor.close()  # writes the 2 pending steps at step 12
    scalars = read_scalars(tmp_path)
    expected = (
        {"adam/alerts", "adam/skipped_steps"}
        | {f"adam/{d}" for d in DIAGNOSTICS}
        | {f"adam/worst/{d}" for d in DIAGNOSTICS}
        | {f"adam_per_parameter/{d}/lin.{n}" for d in DIAGNOSTICS for n in ("weight", "bias")}
    )
    assert set(scalars) == expected
    assert [s for s, _ in scalars["adam/update_rms"]] == [5, 10, 12]
    # The first logged gradient_jump pools steps 2..5 only: step 1 has no previous moment.
    assert all(math.isfinite(v) for _, v in scalars["adam/gradient_jump"])


def test_noise_level_matches_theory_at_beta2_095(tmp_path):
    scalars = noise_run(tmp_path, betas=(0.9, 0.95), steps=1200, every=200)
    # Steady state (after 1000 steps): the value pools steps 1001..1200.
    ((step, update_rms),) = [(s, v) for s, v in scalars["adam/update_rms"] if s == 1200]
    assert update_rms == pytest.approx(0.226, abs=0.01)  # theory √((1-β1)/(1+β1)) = 0.2294; simulated 0.226
    assert dict(scalars["adam/staleness"])[1200] == pytest.approx(0.98, abs=0.01)
    assert dict(scalars["adam/gradient_jump"])[1200] == pytest.approx(1.03, abs=0.015)
    assert dict(scalars["adam/eps_dominance"])[1200] == 0.0


def test_a_tenfold_noise_jump_shows_at_the_jump_step(tmp_path):
    scalars = noise_run(tmp_path, betas=(0.9, 0.999), steps=1520, jump_at=1500, every=1, size=2048)
    jump = dict(scalars["adam/gradient_jump"])
    stale = dict(scalars["adam/staleness"])
    rms = dict(scalars["adam/update_rms"])
    assert jump[1499] == pytest.approx(1.0, abs=0.05)
    assert jump[1500] == pytest.approx(10.0, rel=0.05)
    assert stale[1500] == pytest.approx(8.94, rel=0.05)
    # The update grows for several steps after the jump (DESIGN §3: peak ≈ 1.5 about 8 steps later).
    peak_step = max(range(1500, 1521), key=rms.get)
    assert 1505 <= peak_step <= 1512 and rms[peak_step] == pytest.approx(1.5, rel=0.1)


def test_logged_values_pool_every_step_since_the_last_log(tmp_path):
    per_step = noise_run(tmp_path / "a", betas=(0.9, 0.95), steps=20, every=1, size=64)
    pooled = noise_run(tmp_path / "b", betas=(0.9, 0.95), steps=20, every=10, size=64)
    # update_rms² pools as a mean of per-step mean squares (every step has the same count).
    for end in (10, 20):
        mean_sq = sum(v**2 for s, v in per_step["adam/update_rms"] if end - 10 < s <= end) / 10
        assert dict(pooled["adam/update_rms"])[end] == pytest.approx(math.sqrt(mean_sq), rel=1e-5)


def test_several_optimizers_get_learning_rate_monitor_style_prefixes(tmp_path):
    ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opts = [torch.optim.Adam([ps[0]]), torch.optim.Adam([ps[1]]), torch.optim.AdamW([ps[2]])]
    writer = SummaryWriter(str(tmp_path))
    monitor = Monitor(opts, writer=writer, log_every_n_steps=2)
    for _ in range(2):
        for p, o in zip(ps, opts):
            p.grad = torch.randn(4)
            o.step()
    monitor.close()
    tags = set(read_scalars(tmp_path))
    assert {"adam/Adam/update_rms", "adam/Adam-1/update_rms", "adam/AdamW/update_rms"} <= tags
    assert "adam_per_parameter/Adam/update_rms/group0.param0" in tags


def _folders(tags):
    """Every tag that is also a folder of another (``a/b`` beside ``a/b/c``)."""
    return {t for t in tags for other in tags if other.startswith(t + "/")}


@pytest.mark.parametrize("optimizers", [1, 2])
def test_no_tag_is_a_folder_of_another(tmp_path, optimizers):
    # A store with one file per metric (MLflow's file store) cannot hold a/b beside a/b/c.
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opts = [torch.optim.AdamW(model[i].parameters()) for i in range(optimizers)]
    monitor = Monitor(opts, named_parameters=model.named_parameters(), log_every_n_steps=None)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        for o in opts:
            o.step()
    tags = set(monitor.flush(2))
    monitor.close()
    assert sum("_per_parameter/" in t for t in tags) == 4 * 2 * optimizers and _folders(tags) == set()


def test_compiled_model_names_have_no_wrapper_prefix():
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model)
    opt = torch.optim.Adam(compiled.parameters())
    monitor = Monitor(opt, named_parameters=compiled.named_parameters(), log_every_n_steps=None)
    model.weight.grad, model.bias.grad = torch.ones(2, 2), torch.ones(2)
    opt.step()
    assert {k.split("/", 2)[-1] for k in monitor.compute() if k.startswith("adam_per_parameter/update_rms/")} == {
        "weight",
        "bias",
    }
    monitor.close()


def test_state_dict_round_trip_continues_identically():
    def run(split):
        torch.manual_seed(3)
        p = torch.nn.Parameter(torch.zeros(16))
        opt = torch.optim.Adam([p], betas=(0.9, 0.95))
        monitor = Monitor(opt, log_every_n_steps=None)
        grads = [torch.randn(16) for _ in range(10)]
        for t, g in enumerate(grads, 1):
            if t == split:
                saved_opt, saved_mon = opt.state_dict(), monitor.state_dict()
                monitor.close()
                opt = torch.optim.Adam([p], betas=(0.9, 0.95))
                opt.load_state_dict(saved_opt)
                monitor = Monitor(opt, log_every_n_steps=None)
                monitor.load_state_dict(saved_mon)
            p.grad = g
            opt.step()
        return monitor.compute()

    assert run(split=6) == pytest.approx(run(split=None))


def test_histograms_and_layout_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, TENSORS, EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters())
    writer = SummaryWriter(str(tmp_path))
    monitor = Monitor(
        opt, named_parameters=model.named_parameters(), writer=writer, log_every_n_steps=2, histograms=True
    )
    for _ in range(4):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    monitor.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={HISTOGRAMS: 0, TENSORS: 0})
    acc.Reload()
    assert "adam/update/0.weight" in acc.Tags()["histograms"]
    assert [e.step for e in acc.Histograms("adam/update/1.bias")] == [2, 4]
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(acc.Tensors("custom_scalars__config__")[0].tensor_proto).item())
    titles = [c.title for c in layout.category]
    assert titles[0] == "adam: pooled over all tensors"
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    assert charts["update_rms"] == ["^adam/update_rms$"]
    assert titles[1].startswith("adam: worst tensor")
    assert titles[2:] == ["adam: 0", "adam: 1"]  # then one category per module
    summary = tensor_util.make_ndarray(acc.Tensors("adam/worst_tensors/text_summary")[-1].tensor_proto).item().decode()
    assert summary.startswith("| diagnostic | worst tensors (value) |")
    assert all(f"`{n}`" in summary for n in ("0.weight", "0.bias", "1.weight", "1.bias"))


@pytest.mark.parametrize("fused", [False, True])
def test_a_plain_loop_counts_the_steps_a_grad_scaler_skips_once_it_announces_them(fused):
    # A non-fused optimizer's step() is not even called on a skipped step: only the loop knows.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8))
    opt = torch.optim.AdamW([p], fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1000)
    monitor = Monitor(opt, log_every_n_steps=None)
    for t in range(1, 11):
        opt.zero_grad()
        (scaler.scale((p * torch.randn(8)).sum()) * (float("inf") if t in (3, 7, 8) else 1.0)).backward()
        monitor.note_step_attempt(opt)
        scaler.step(opt)
        scaler.update()
    values = monitor.compute()
    monitor.close()
    assert values["adam/skipped_steps"] == 3 and int(opt.state[p]["step"]) == 7


def test_the_run_record_is_rewritten_when_its_verdict_changes_not_at_every_log_point(tmp_path, monkeypatch):
    import json

    import adam_monitor.alerts.log as log

    writes = []
    real = log.replace_file
    monkeypatch.setattr(log, "replace_file", lambda path, text: writes.append(json.loads(text)) or real(path, text))
    p = torch.nn.Parameter(torch.randn(16))
    opt = torch.optim.AdamW([p])
    monitor = Monitor(opt, log_dir=str(tmp_path), log_every_n_steps=1)
    for _ in range(20):
        p.grad = torch.randn(16)
        opt.step()
    # written at the start (nothing stepped yet) and at the first step; the counts of the 19 log
    # points after it wait, as a run killed now shows: it stepped
    assert [w["monitored"][0]["steps"] for w in writes] == [0, 1]
    on_disk = json.loads((tmp_path / "adam_monitor" / "run.json").read_text())
    assert on_disk["monitored"][0]["steps"] == 1 and not on_disk["closed"]
    monkeypatch.setattr(log.time, "monotonic", lambda: 1e12)  # STATUS_EVERY_S later
    p.grad = torch.randn(16)
    opt.step()
    assert writes[-1]["monitored"][0]["steps"] == 21
    monitor.close()
    assert writes[-1]["closed"] and writes[-1]["monitored"][0]["steps"] == 21


def test_a_wrapper_that_steps_like_an_optimizer_is_warned_about_and_not_monitored(tmp_path):
    # e.g. schedulefree.ScheduleFreeWrapper: it holds a torch optimizer but is none itself
    class Wrapper:
        def __init__(self, base):
            self.base = base

        def step(self):
            self.base.step()

    from adam_monitor.cli import main as cli

    p = torch.nn.Parameter(torch.randn(4))
    wrapper = Wrapper(torch.optim.AdamW([p]))
    with pytest.warns(UserWarning, match="not monitoring Wrapper: Wrapper is not a torch.optim.Optimizer"):
        monitor = Monitor(wrapper, log_dir=str(tmp_path))
    p.grad = torch.randn(4)
    wrapper.step()
    monitor.close()
    assert monitor.optimizers == [] and monitor.compute() == {}
    assert cli(["check", str(tmp_path)]) == 2  # nothing was monitored: never a pass
    with pytest.raises(TypeError, match="got NoneType"):
        Monitor(None)


def test_a_param_group_added_mid_run_is_monitored_under_its_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW(model[0].parameters())
    monitor = Monitor(opt, named_parameters=model.named_parameters(), log_every_n_steps=None)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.add_param_group({"params": model[1].parameters(), "betas": (0.9, 0.95)})
    for _ in range(2):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
    names = {k.split("/", 2)[-1] for k in monitor.compute() if k.startswith("adam_per_parameter/update_rms/")}
    monitor.close()
    assert names == {"0.weight", "0.bias", "1.weight", "1.bias"} and monitor.alerts == []


@pytest.mark.parametrize("on_alert", ["warn", "raise", "stop"])
def test_a_fault_of_the_monitors_own_never_ends_the_run(on_alert, monkeypatch):
    import adam_monitor.engine.reader as reader_module

    p = torch.nn.Parameter(torch.randn(8))
    opt = torch.optim.AdamW([p])
    monitor = Monitor(opt, log_every_n_steps=1, on_alert=on_alert)
    p.grad = torch.randn(8)
    opt.step()

    def broken(self, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(reader_module.StepReader, "read", broken)
    with pytest.warns(
        UserWarning, match="stopped monitoring AdamW: it failed while reading a step .RuntimeError: a bug"
    ):
        opt.step()
    for _ in range(3):  # unhooked: the next steps are the optimizer's alone
        opt.step()
    assert int(opt.state[p]["step"]) == 5 and not opt._optimizer_step_post_hooks
    monitor.close()
