"""AdamMonitor with the loggers users pick: where the scalars go, and a folder of each run's own
for its alerts that ``adam-monitor check`` finds from the logger's folder."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from support import AdamBoring

from adam_monitor import AdamMonitor
from adam_monitor.callback import RUNS_WITHOUT_LOGGER
from adam_monitor.cli import main as cli
from adam_monitor.cli.events import read_scalars

#: β1² ≥ β2: a beta_coupling error at the first step, the alert every run here raises.
COUPLED = (0.99, 0.9)


def fit(root, logger, *, betas=COUPLED, steps=6):
    callback = AdamMonitor(log_every_n_steps=3)
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=steps,
        callbacks=[callback],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with pytest.warns(Warning):
        trainer.fit(AdamBoring(betas))
    return callback


def alerts_in(path) -> list[str]:
    return [json.loads(line)["rule"] for line in Path(path).read_text().splitlines()]


def test_without_a_logger_each_run_gets_a_folder_of_its_own(tmp_path, capsys):
    first = fit(tmp_path, False)
    second = fit(tmp_path, False, betas=(0.9, 0.95))
    runs = tmp_path / RUNS_WITHOUT_LOGGER
    assert Path(first._alerts_file) == runs / "version_0" / "adam_monitor" / "alerts.jsonl"
    assert alerts_in(first._alerts_file) == ["beta_coupling"]
    # The clean run after it passes: the earlier run's alert is not in its folder.
    assert cli(["check", str(runs / "version_1")]) == 0
    assert cli(["check", str(runs / "version_0")]) == 1
    assert second.alerts == []


class FolderlessLogger(Logger):
    """A logger with no local folder (as MLflow on a database or a server): ``save_dir`` is None."""

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    name = property(lambda self: "experiment-7")
    version = property(lambda self: "run-b41c")
    save_dir = property(lambda self: None)

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_logger_without_a_folder_still_gets_the_alerts_of_its_run_alone(tmp_path):
    logger = FolderlessLogger()
    callback = fit(tmp_path, logger)
    assert Path(callback._alerts_file) == tmp_path / "experiment-7" / "run-b41c" / "adam_monitor" / "alerts.jsonl"
    assert alerts_in(callback._alerts_file) == ["beta_coupling"]
    steps = [step for step, metrics in logger.logged if "adam/update_rms" in metrics]
    assert steps == [2, 5]


def test_several_loggers_each_receive_every_scalar(tmp_path):
    loggers = [CSVLogger(tmp_path / "csv", name="r"), TensorBoardLogger(tmp_path / "tb", name="r")]
    callback = fit(tmp_path, loggers)
    with open(loggers[0].log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    csv_tags = {k for row in rows for k, v in row.items() if v and k.startswith(("adam/", "adam_per_parameter/"))}
    tb_tags = {t for t in read_scalars(loggers[1].log_dir) if t.startswith(("adam/", "adam_per_parameter/"))}
    assert "adam_per_parameter/update_rms/layer.weight" in csv_tags
    assert csv_tags == tb_tags
    # The first logger's run folder holds the alerts, as it holds Lightning's checkpoints.
    assert Path(callback._alerts_file).parent.parent == Path(loggers[0].log_dir)


def test_mlflow_file_store_holds_every_tag_and_the_run_keeps_its_alerts(tmp_path, monkeypatch):
    import mlflow  # mlflow-skinny, a dev dependency
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a folder
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="adam", tracking_uri=uri)
    callback = fit(tmp_path, logger)
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(logger.run_id)
    history = client.get_metric_history(run.info.run_id, "adam_per_parameter/update_rms/layer.weight")
    assert [m.step for m in history] == [2, 5]
    assert {"adam/update_rms", "adam/staleness", "adam/alerts"} <= set(run.data.metrics)
    # Inside the run's own folder (mlruns/<experiment>/<run>), not at the store's root, where
    # MLflow would take the folder for a malformed experiment.
    run_dir = tmp_path / "mlruns" / logger.experiment_id / logger.run_id
    assert Path(callback._alerts_file) == run_dir / "adam_monitor" / "alerts.jsonl"
    assert {e.name for e in client.search_experiments()} == {"adam", "Default"}
    assert cli(["check", str(tmp_path / "mlruns")]) == 1
