"""AdamMonitorCallback under the Hugging Face Trainer: what lands where, on which step, and what an
alert does to the run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from adam_monitor import InstabilityError, InstabilityWarning  # noqa: E402
from adam_monitor.integrations.transformers import AdamMonitorCallback  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BAD_BETAS = (0.99, 0.9)  # β1² ≥ β2: the beta_coupling error, before any step


def tiny_gpt2():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def token_data(n=64, length=16):
    ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer_for(tmp_path, callbacks, *, model=None, optimizers=(None, None), **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=TrainingArguments(**settings),
        train_dataset=token_data(),
        callbacks=callbacks,
        optimizers=optimizers,
    )


def train(tmp_path, callbacks, **kwargs):
    trainer = trainer_for(tmp_path, callbacks, **kwargs)
    trainer.train()
    return trainer


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def alert_records(folder) -> list[dict]:
    text = (Path(folder) / "adam_monitor" / "alerts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class UpdateRecorder(TrainerCallback):
    """The pooled RMS of each applied step over its learning rate, rebuilt from the parameters
    before and after ``optimizer.step``: sqrt(Σ over tensors of Σ u² / total numel)."""

    def __init__(self):
        self.rms: dict[int, float] = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._before = [
            (p.detach().double().clone(), group["lr"]) for group in optimizer.param_groups for p in group["params"]
        ]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sum_sq = sum((((b - p.detach().double()) / lr) ** 2).sum().item() for (b, lr), p in zip(self._before, params))
        self.rms[state.global_step + 1] = math.sqrt(sum_sq / sum(p.numel() for p in params))


class NaNGradientAt(TrainerCallback):
    """A NaN in one gradient just before the optimizer step of ``step``: a nonfinite error there."""

    def __init__(self, step):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(model.parameters()).grad.view(-1)[0] = math.nan


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "user AdamW"])
def test_scalars_are_the_applied_updates_on_the_global_step_axis(tmp_path, monkeypatch, optim):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = tiny_gpt2()
    optimizers, extra = (None, None), {"optim": optim}
    if optim == "user AdamW":
        optimizers, extra = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), None), {}
    recorder = UpdateRecorder()
    callback = AdamMonitorCallback(log_every_n_steps=1)
    # lr 1e-2: a step far above the float32 rounding of the parameters, so before - after is exact
    train(tmp_path, [recorder, callback], model=model, optimizers=optimizers, learning_rate=1e-2, **extra)
    logged = scalars(tmp_path / "tb")
    assert [s for s, _ in logged["train/loss"]] == [2, 4, 6, 8, 10, 12]  # the Trainer's own, same folder
    steps = [s for s, _ in logged["adam/update_rms"]]
    assert steps == list(range(1, 13)) == sorted(recorder.rms)
    assert {"adam/staleness", "adam/gradient_jump", "adam/eps_dominance"} <= set(logged)
    errors = [abs(v - recorder.rms[s]) / recorder.rms[s] for s, v in logged["adam/update_rms"]]
    print(f"{optim}: max relative error of update_rms {max(errors):.2e}")
    assert max(errors) < 1e-5
    assert any(tag.endswith("/transformer.h.0.attn.c_attn.weight") for tag in logged)  # names as the model's
    assert alert_records(tmp_path / "tb") == []


@pytest.mark.parametrize(
    "optim, resolution", [("adamw_bnb_8bit", 1e-3), ("adamw_torch_8bit", 1e-3), ("adamw_torch_4bit", 3e-2)]
)
def test_the_trainers_low_bit_optimizers_are_read_to_their_resolution(tmp_path, monkeypatch, optim, resolution):
    # bitsandbytes' and torchao's: another library's class, verified from its second step on
    pytest.importorskip("bitsandbytes" if "bnb" in optim else "torchao")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    recorder = UpdateRecorder()
    train(tmp_path, [recorder, AdamMonitorCallback(log_every_n_steps=1)], learning_rate=1e-2, optim=optim)
    logged = scalars(tmp_path / "tb")
    assert [s for s, _ in logged["adam/update_rms"]] == list(range(2, 13))
    errors = [abs(v - recorder.rms[s]) / recorder.rms[s] for s, v in logged["adam/update_rms"]]
    assert max(errors) < resolution
    assert alert_records(tmp_path / "tb") == []


def test_gradient_accumulation_logs_once_per_optimizer_step_beside_the_trainers_logs(tmp_path):
    # No TENSORBOARD_LOGGING_DIR: transformers 5 picks output_dir/runs/<time>_<host> itself.
    callback = AdamMonitorCallback()
    trainer = train(tmp_path, [callback], max_steps=6, gradient_accumulation_steps=2)
    (folder,) = {Path(f).parent for f in tmp_path.glob("runs/**/events.out.tfevents.*")}
    logged = scalars(folder)
    assert [s for s, _ in logged["adam/update_rms"]] == [s for s, _ in logged["train/loss"]] == [2, 4, 6]
    assert trainer.state.global_step == 6
    (monitored,) = json.loads((folder / "adam_monitor" / "run.json").read_text())["monitored"]
    assert (monitored["steps"], monitored["steps_applied"], monitored["steps_skipped"]) == (6, 6, 0)
    assert callback.metrics["adam/update_rms"] == pytest.approx(logged["adam/update_rms"][-1][1], rel=1e-6)


def test_stop_on_a_configuration_error_ends_training_after_its_first_step(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=BAD_BETAS)
    callback = AdamMonitorCallback(on_alert="stop", fail_on="error")
    trainer = trainer_for(tmp_path, [callback], model=model, optimizers=(optimizer, None), report_to=[])
    with pytest.warns(InstabilityWarning, match="beta_coupling"):
        trainer.train()  # an early stop, as the Trainer's own: train() returns
    assert trainer.state.global_step == 1  # the Trainer checks should_training_stop after a step
    assert [r["rule"] for r in alert_records(tmp_path)] == ["beta_coupling"]
    assert [a.rule for a in callback.stop_alerts] == ["beta_coupling"]


def test_raise_on_a_configuration_error_ends_train_before_its_first_step(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=BAD_BETAS)
    trainer = trainer_for(
        tmp_path, [AdamMonitorCallback(on_alert="raise")], model=model, optimizers=(optimizer, None), report_to=[]
    )
    with pytest.raises(InstabilityError, match="beta_coupling"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert [r["rule"] for r in alert_records(tmp_path)] == ["beta_coupling"]


@pytest.mark.parametrize("on_alert", ["stop", "raise"])
def test_a_step_alert_acts_at_its_step_and_no_checkpoint_of_the_state_after_it_is_saved(
    tmp_path, monkeypatch, on_alert
):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = AdamMonitorCallback(on_alert=on_alert, log_every_n_steps=1)
    trainer = trainer_for(tmp_path, [NaNGradientAt(3), callback], save_strategy="steps", save_steps=1)
    if on_alert == "stop":
        with pytest.warns(InstabilityWarning, match="nonfinite"):
            trainer.train()
        assert trainer.state.global_step == 3
    else:
        with pytest.raises(InstabilityError, match="nonfinite") as raised:
            trainer.train()  # from optimizer.step of step 3, before the Trainer counts it
        assert trainer.state.global_step == 2
        assert [a.step for a in raised.value.alerts] == [3]
    (record,) = alert_records(tmp_path / "tb")
    assert (record["rule"], record["step"]) == ("nonfinite", 3)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    logged = scalars(tmp_path / "tb")
    assert logged["adam/alerts"][-1] == (3, 1.0)  # the alert, at its step
    # "stop" completes step 3 and writes its log point (its NaN diagnostics are left out, the
    # step counts are there); "raise" leaves the step's log point unwritten
    assert logged["adam/skipped_steps"][-1][0] == (3 if on_alert == "stop" else 2)


def test_warn_never_ends_the_run_and_without_tensorboard_alerts_go_under_output_dir(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=BAD_BETAS)
    callback = AdamMonitorCallback()
    trainer = trainer_for(
        tmp_path, [NaNGradientAt(3), callback], model=model, optimizers=(optimizer, None), report_to=[]
    )
    with pytest.warns(InstabilityWarning):
        trainer.train()
    assert trainer.state.global_step == 12
    assert {r["rule"] for r in alert_records(tmp_path)} == {"beta_coupling", "nonfinite"}
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert callback.metrics["adam/alerts"] == 2.0  # the last log point's values (step 12)


def test_resuming_continues_the_step_axis(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    train(tmp_path, [AdamMonitorCallback()], max_steps=4, save_strategy="steps", save_steps=4)
    resumed = trainer_for(tmp_path, [AdamMonitorCallback()], max_steps=8)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    assert [s for s, _ in scalars(tmp_path / "tb")["adam/update_rms"]] == [2, 4, 6, 8]
    (monitored,) = json.loads((tmp_path / "tb" / "adam_monitor" / "run.json").read_text())["monitored"]
    assert monitored["steps"] == 8  # the optimizer's own count, restored from the checkpoint


def test_an_optimizer_it_cannot_read_is_warned_about_and_trains_on(tmp_path):
    with pytest.warns(UserWarning, match="not monitoring SGD"):
        trainer = train(tmp_path, [AdamMonitorCallback()], optim="sgd", report_to=[], max_steps=2)
    assert trainer.state.global_step == 2


def test_bad_options_are_refused_naming_the_callback(tmp_path):
    with pytest.raises(ValueError, match=r"AdamMonitorCallback\(on_alert=\.\.\.\)"):
        AdamMonitorCallback(on_alert="halt")
    with pytest.raises(TypeError, match="AdamMonitorCallback"):
        AdamMonitorCallback(every=5)
    with pytest.raises(TypeError, match="log_dir"):
        AdamMonitorCallback(log_dir=5)


def test_torch_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    # The eager backend: the same compiled wrapper (_orig_mod) without inductor's compile time.
    train(tmp_path, [AdamMonitorCallback()], torch_compile=True, torch_compile_backend="eager", max_steps=4)
    logged = scalars(tmp_path / "tb")
    assert [s for s, _ in logged["adam/update_rms"]] == [2, 4]
    assert any(tag.endswith("/transformer.wte.weight") for tag in logged)
    assert not any("_orig_mod" in tag for tag in logged)


WATCH_IMPORTS = """
import sys, traceback
from pathlib import Path
importers = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers":
            frames = [f.filename for f in traceback.extract_stack() if not f.filename.startswith("<frozen")]
            importers.append(frames[-2])  # the module whose import statement this is
        return None

sys.meta_path.insert(0, Watch())
import adam_monitor, adam_monitor.engine, adam_monitor.engine.monitor, adam_monitor.integrations
assert "transformers" not in sys.modules
import adam_monitor.callback  # Lightning -> torchmetrics imports transformers where it is installed
package = str(Path(adam_monitor.__file__).parent)
assert not [f for f in importers if f.startswith(package)], importers
"""


def test_the_core_never_imports_transformers():
    subprocess.run([sys.executable, "-c", WATCH_IMPORTS], check=True, timeout=120)


def test_the_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    import hf_trainer

    callback = hf_trainer.main(["--steps", "10", "--output-dir", str(tmp_path)])
    assert "no alert" in capsys.readouterr().out
    (folder,) = {Path(f).parent for f in tmp_path.glob("runs/**/events.out.tfevents.*")}
    assert [s for s, _ in scalars(folder)["adam/update_rms"]] == [5, 10]
    assert callback.monitor.alerts_file == str(folder / "adam_monitor" / "alerts.jsonl")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_logs_the_applied_updates_once_from_rank_zero(tmp_path):
    # Two CPU processes under torchrun (gloo): each rank reads its replica, rank 0 alone writes.
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TENSORBOARD_LOGGING_DIR": str(tmp_path / "tb")}
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    done = subprocess.run([*command, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    applied = {int(k): v for k, v in json.loads((tmp_path / "applied.json").read_text()).items()}
    logged = scalars(tmp_path / "tb")
    assert [s for s, _ in logged["adam/update_rms"]] == sorted(applied) == list(range(1, 7))
    errors = [abs(v - applied[s]) / applied[s] for s, v in logged["adam/update_rms"]]
    assert max(errors) < 1e-5, errors
    assert any(tag.endswith("/transformer.h.0.attn.c_attn.weight") for tag in logged)  # no DDP "module." prefix
    assert not any("module." in tag for tag in logged)
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2  # the Trainer's and ours, rank 0's
    (entry,) = json.loads((tmp_path / "tb" / "adam_monitor" / "run.json").read_text())["monitored"]
    assert entry["steps"] == 6 and alert_records(tmp_path / "tb") == []
