"""AdamMonitor under Lightning: what lands in TensorBoard, on which step, in which set-up."""

import io
import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from support import AdamBoring, quiet_trainer

from adam_monitor import DIAGNOSTICS, AdamMonitor
from adam_monitor.cli.events import read_scalars


def fit(tmp_path, model, *, callbacks=None, max_steps=10, name="run", ckpt_path=None, **trainer_kwargs):
    callbacks = callbacks if callbacks is not None else [AdamMonitor()]
    trainer_kwargs.setdefault("log_every_n_steps", 5)
    trainer = quiet_trainer(tmp_path, callbacks=callbacks, max_steps=max_steps, name=name, **trainer_kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, read_scalars(trainer.logger.log_dir)


def test_exact_tags_on_lightnings_own_step_axis(tmp_path):
    trainer, scalars = fit(tmp_path, AdamBoring())
    expected = (
        {"adam/alerts", "adam/skipped_steps"}
        | {f"adam/{d}" for d in DIAGNOSTICS}
        | {f"adam/worst/{d}" for d in DIAGNOSTICS}
        | {f"adam_per_parameter/{d}/layer.{n}" for d in DIAGNOSTICS for n in ("weight", "bias")}
    )
    assert expected <= set(scalars)
    assert set(scalars) - expected == {"loss", "epoch"}
    # The same x values as the loss logged by the module: steps 4 and 9 for log_every_n_steps=5.
    assert [s for s, _ in scalars["adam/update_rms"]] == [s for s, _ in scalars["loss"]] == [4, 9]
    assert all(math.isfinite(v) for _, v in scalars["adam/staleness"])


def test_log_every_n_steps_can_be_overridden(tmp_path):
    _, scalars = fit(tmp_path, AdamBoring(), callbacks=[AdamMonitor(log_every_n_steps=2, per_parameter=False)])
    assert [s for s, _ in scalars["adam/update_rms"]] == [1, 3, 5, 7, 9]
    assert not any(tag.startswith("adam_per_parameter/") for tag in scalars)


def test_gradient_accumulation_gives_one_record_per_optimizer_step(tmp_path):
    trainer, scalars = fit(tmp_path, AdamBoring(), max_steps=6, accumulate_grad_batches=4, log_every_n_steps=1)
    assert trainer.global_step == 6
    assert [s for s, _ in scalars["adam/update_rms"]] == [0, 1, 2, 3, 4, 5]


def test_gradient_accumulation_writes_each_log_point_once_pooling_its_window(tmp_path):
    # The step axis stands still for the 4 batches of a window: one write per window, not one a batch.
    runs = {}
    for every in (1, 5):
        L.seed_everything(0)
        runs[every] = fit(
            tmp_path, AdamBoring(), max_steps=10, accumulate_grad_batches=4, log_every_n_steps=every, name=f"e{every}"
        )[1]["adam/update_rms"]
    assert [s for s, _ in runs[5]] == [4, 9]
    per_step = dict(runs[1])
    for end, value in runs[5]:
        mean_sq = sum(per_step[s] ** 2 for s in range(end - 4, end + 1)) / 5
        assert value == pytest.approx(math.sqrt(mean_sq), rel=1e-5)


class TwoOptimizers(BoringModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.head = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        loss = self.head(self(batch)).pow(2).mean()
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()
        self.log("loss", loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.layer.parameters(), betas=(0.9, 0.95)), torch.optim.AdamW(self.head.parameters())


def test_manual_optimization_with_two_optimizers(tmp_path):
    _, scalars = fit(tmp_path, TwoOptimizers(), max_steps=12, log_every_n_steps=3)
    assert {
        "adam/Adam/update_rms",
        "adam/AdamW/update_rms",
        "adam_per_parameter/Adam/update_rms/layer.weight",
        "adam_per_parameter/AdamW/staleness/head.bias",
    } <= set(scalars)
    assert not any(tag in scalars for tag in ("adam/update_rms", "adam/staleness"))
    # 12 optimizer steps in all, 6 batches: Lightning's axis counts batches.
    assert [s for s, _ in scalars["adam/Adam/update_rms"]] == [s for s, _ in scalars["loss"]] == [2, 5]


def test_bf16_mixed_precision(tmp_path):
    _, scalars = fit(tmp_path, AdamBoring(), precision="bf16-mixed")
    assert all(math.isfinite(v) for tag in ("adam/update_rms", "adam/staleness") for _, v in scalars[tag])


class CompiledBoring(AdamBoring):
    def __init__(self):
        super().__init__()
        self.layer = torch.compile(torch.nn.Linear(32, 2))


@pytest.mark.slow
def test_compiled_submodule_names(tmp_path):
    _, scalars = fit(tmp_path, CompiledBoring(), max_steps=5)
    assert "adam_per_parameter/update_rms/layer.weight" in scalars
    assert not any("_orig_mod" in tag for tag in scalars)


def test_hooks_are_removed_at_teardown(tmp_path):
    trainer, _ = fit(tmp_path, AdamBoring(), max_steps=2)
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


def test_sgd_is_reported_once_and_training_goes_on(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, scalars = fit(tmp_path, BoringModel(), max_steps=4)
    assert trainer.global_step == 4
    assert not any(tag.startswith(("adam/", "adam_per_parameter/")) for tag in scalars)
    assert len([w for w in caught if "adam-monitor is not monitoring SGD" in str(w.message)]) == 1


def test_resume_from_checkpoint_logs_what_an_uninterrupted_run_logs(tmp_path):
    # log every 4 steps, checkpoint after step 6: two steps are pending in the monitor's state.
    L.seed_everything(0)
    _, full = fit(tmp_path / "full", AdamBoring(), max_steps=12, log_every_n_steps=4)
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    fit(tmp_path / "part", AdamBoring(), callbacks=[AdamMonitor(), ckpt], max_steps=6, log_every_n_steps=4)
    assert "AdamMonitor" in torch.load(tmp_path / "ckpt" / "epoch=0-step=6.ckpt", weights_only=False)["callbacks"]
    _, resumed = fit(
        tmp_path / "part",
        AdamBoring(),
        max_steps=12,
        log_every_n_steps=4,
        name="resumed",
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"),
    )
    assert [s for s, _ in resumed["adam/update_rms"]] == [7, 11]
    for tag in (
        "adam/update_rms",
        "adam/staleness",
        "adam/gradient_jump",
        "adam_per_parameter/update_rms/layer.weight",
    ):
        assert dict(resumed[tag])[7] == pytest.approx(dict(full[tag])[7], rel=1e-6)
        assert dict(resumed[tag])[11] == pytest.approx(dict(full[tag])[11], rel=1e-6)


def test_the_callback_state_round_trips(tmp_path):
    # The state a checkpoint holds mid-run (2 steps pending since the log at step 4, the rules'
    # baselines), through torch.save / torch.load(weights_only=True), into a new callback.
    assert AdamMonitor().state_key == "AdamMonitor"
    monitor, saved = AdamMonitor(log_every_n_steps=4), {}

    class Save(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                buffer = io.BytesIO()
                torch.save(monitor.state_dict(), buffer)
                buffer.seek(0)
                saved.update(torch.load(buffer, weights_only=True))

    fit(tmp_path, AdamBoring(), callbacks=[monitor, Save()], max_steps=6, log_every_n_steps=4)
    (entry,) = saved["optimizers"]
    assert (entry["step"], entry["pending_steps"], entry["applied"]) == (6, 2, 6)
    restored, seen = AdamMonitor(log_every_n_steps=4), {}
    restored.load_state_dict(saved)

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(restored.monitor.state_dict())

    fit(tmp_path, AdamBoring(), callbacks=[restored, Look()], max_steps=1, name="restored")
    (loaded,) = seen["optimizers"]
    assert {k: loaded[k] for k in ("step", "pending_steps", "applied")} == {
        k: entry[k] for k in ("step", "pending_steps", "applied")
    }
    assert torch.equal(loaded["sums"], entry["sums"])
    assert all(torch.equal(loaded["rules"][k], v) for k, v in entry["rules"].items() if isinstance(v, torch.Tensor))
    assert seen["alerts"] == saved["alerts"]


def test_check_alerts_and_the_summary_name_the_run(tmp_path, capsys):
    class Checking(L.Callback):
        found = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                Checking.found = monitor.check_alerts()

    monitor = AdamMonitor()
    trainer, _ = fit(tmp_path, AdamBoring(), callbacks=[monitor, Checking()])
    assert Checking.found == []  # a healthy run: every step checked, nothing found
    assert monitor.check_alerts() == []  # after fit: nothing left in flight
    alerts_file = f"{trainer.log_dir}/adam_monitor/alerts.jsonl"
    assert f"adam-monitor: no alert(s) in {alerts_file}." in capsys.readouterr().out
