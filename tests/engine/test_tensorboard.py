"""What a user sees in TensorBoard: the custom-scalars layout, the alert text, the worst-tensor
text, and scalars written in one event that read back as add_scalar's."""

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.plugin_util import markdown_to_safe_html  # TensorBoard's own Markdown renderer

from adam_monitor import DIAGNOSTICS, Monitor
from adam_monitor.alerts.log import AlertLog, markdown_escaped
from adam_monitor.alerts.records import Alert
from adam_monitor.engine.tensorboard import (
    LINES_PER_CHART,
    LOSS_TAGS,
    WORST_SETTLED,
    TensorBoardSink,
    custom_scalars_layout,
    fast_record_checksums,
    write_scalars,
)

LOSS_LIKE = ["loss", "train_loss", "train/loss", "val_loss", "train/loss_step", "train/loss_epoch", "eval/Loss"]
NOT_LOSS = [
    "adam/update_rms",
    "adam/loss",
    "adam/Adam-1/loss",
    "adam_per_parameter/update_rms/loss_head.weight",
    "lossy/acc",
    "lr",
]


class FakeWriter:
    """Records what a ``SummaryWriter`` is asked to write; ``fail_text`` makes ``add_text`` raise."""

    log_dir = "fake"

    def __init__(self):
        self.texts: list[tuple[str, str, int]] = []
        self.scalars: list[tuple[str, float, int]] = []
        self.fail_text = False

    def add_text(self, tag, text, step):
        if self.fail_text:
            raise OSError("disk full")
        self.texts.append((tag, text, step))

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_custom_scalars(self, layout):
        self.layout = layout

    def add_histogram(self, *args):
        pass

    def flush(self):
        pass


def alert(message="update RMS jumped", *, rule="update_rms_spike", step=7, parameter="layers.0.weight"):
    return Alert(
        rule=rule,
        severity="warning",
        step=step,
        message=message,
        optimizer="Adam",
        parameter=parameter,
        value=3.5,
        threshold=2.0,
    )


# ---------------------------------------------------------------------------------------------- layout
def test_the_first_category_puts_the_loss_beside_the_pooled_diagnostics():
    layout = custom_scalars_layout({"adam": ["w"]})
    first = next(iter(layout.values()))
    assert list(first)[:4] == ["loss", "update_rms", "staleness", "alerts (count)"]
    assert set(first) == {"loss", "alerts (count)", *DIAGNOSTICS}
    assert first["loss"] == ["Multiline", [LOSS_TAGS]]


def test_the_loss_regex_matches_loss_tags_and_no_adam_tag():
    # The custom-scalars plugin selects a chart's tags with Python's re.match.
    regex = re.compile(LOSS_TAGS)
    assert [t for t in LOSS_LIKE if regex.match(t)] == LOSS_LIKE
    assert [t for t in NOT_LOSS if regex.match(t)] == []


@pytest.mark.skipif(shutil.which("node") is None, reason="no JavaScript engine (node) here")
def test_the_loss_regex_means_the_same_in_javascript():
    # TensorBoard's frontend joins a chart's regexes in JavaScript; it must parse there too.
    script = (
        "const r = new RegExp(process.argv[1]);"
        "console.log(JSON.stringify(JSON.parse(process.argv[2]).map(t => { const m = t.match(r); return !!m && m.index === 0; })))"
    )
    tags = LOSS_LIKE + NOT_LOSS
    out = subprocess.run(
        ["node", "-e", script, LOSS_TAGS, json.dumps(tags)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [bool(re.match(LOSS_TAGS, t)) for t in tags]


def test_a_chart_holds_no_more_lines_than_tensorboard_has_markers():
    # TensorBoard colours a line by its run; within a run it tells lines apart by 5 marker symbols.
    names = [f"block.{k}.{kind}" for k in range(2) for kind in ("q", "k", "v", "o", "ln_w", "ln_b")]  # 12 tensors
    names += [f"head.{k}.weight" for k in range(12)]
    layout = custom_scalars_layout({"adam": names})
    per_module = {
        title: charts for title, charts in layout.items() if title.startswith("adam: ") and "pooled" not in title
    }
    per_module.pop("adam: worst tensor (named in the Text tab, adam/worst_tensors)")
    assert all(len(tags) <= LINES_PER_CHART for charts in per_module.values() for _, tags in charts.values())
    head = per_module["adam: head"]  # 12 tensors: 3 charts of 4, not 5, 5, 2
    assert [len(head[f"update_rms ({k}/3)"][1]) for k in (1, 2, 3)] == [4, 4, 4]
    shown = [
        t
        for charts in per_module.values()
        for _, tags in charts.values()
        for t in tags
        if "_per_parameter/update_rms/" in t
    ]
    assert len(shown) == len(names) == len(set(shown))  # every tensor in exactly one chart


# ---------------------------------------------------------------------------------------------- alert text
def test_all_alerts_of_a_step_are_one_text_and_read_as_written():
    writer = FakeWriter()
    log = AlertLog(None, writer=writer)
    log.record([alert("lower lr: 2*beta1*lr*x_y"), alert("lr*sharpness <b>near</b> 2", rule="edge_of_stability")], 40)
    ((tag, text, step),) = writer.texts
    assert (tag, step) == ("adam/alert", 40)
    html = markdown_to_safe_html(text)
    assert "2*beta1*lr*x_y" in html and "lr*sharpness &lt;b&gt;near&lt;/b&gt; 2" in html
    assert "<em>" not in html and "<b>" not in html
    assert html.count("<li>") == 2 and "update_rms_spike" in html and "edge_of_stability" in html


def test_later_alerts_at_the_same_step_rewrite_the_step_text_in_full():
    # TensorBoard shows each text written at a step (newest first): the newest must hold them all.
    writer = FakeWriter()
    log = AlertLog(None, writer=writer)
    log.record([alert("first")], 40)
    log.record([alert("second", rule="nonfinite")], 40)  # e.g. another optimizer at the same global step
    log.record([alert("third")], 41)
    assert [s for _, _, s in writer.texts] == [40, 40, 41]
    at_40 = markdown_to_safe_html(writer.texts[1][1])
    assert "2 alerts at step 40" in at_40 and "first" in at_40 and "second" in at_40
    at_41 = markdown_to_safe_html(writer.texts[2][1])
    assert "1 alert at step 41" in at_41 and "third" in at_41 and "first" not in at_41
    assert [v for t, v, _ in writer.scalars if t == "adam/alerts"] == [1, 2, 3]


@pytest.mark.parametrize("text", ["2*beta1*lr*x_y", r"a\b `c` {d} [e](f) #g +h -i .j !k |l <m> &n;", "one\ntwo"])
def test_markdown_escaped_text_renders_verbatim(text):
    html = markdown_to_safe_html(markdown_escaped(text))
    shown = html.removeprefix("<p>").removesuffix("</p>").replace("<br />", "\n").replace("<br>", "\n")
    assert shown.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == text


# ---------------------------------------------------------------------------------------------- worst tensors
def test_the_worst_tensor_table_is_written_when_the_worst_tensor_changes_for_good_or_after_an_alert():
    writer = FakeWriter()
    sink = TensorBoardSink(writer, scalar_sink=None, per_parameter=True)

    def point(x, *names, alerts=0.0, value=1.0):
        table = {"update_rms": [(value / (k + 1), n) for k, n in enumerate(names)]}
        sink.write("adam", {"adam/alerts": alerts}, x, worst=table)

    point(10, "a", "b")  # the first: written
    point(20, "a", "b", value=2.0)  # same tensors, other values: not written
    point(30, "a", "c", "b")  # the worst is the same tensor: not written
    point(40, "b", "a")  # another worst tensor, once: a flicker, not written
    point(50, "a", "b")
    point(60, "a", "b", alerts=1.0)  # an alert since the last log point: written
    point(70, "a", "b", alerts=1.0)
    point(80, "b", "a", alerts=1.0)
    point(90, "b", "a", alerts=1.0)
    point(100, "b", "a", alerts=1.0)  # b is the worst for WORST_SETTLED log points in a row: written
    point(110, "b", "a", alerts=1.0)
    writer.fail_text = True
    with pytest.warns(UserWarning, match="could not write text"):
        point(120, "c", alerts=2.0)  # due, but could not be written...
    writer.fail_text = False
    with pytest.warns(UserWarning, match="again"):
        point(130, "b", alerts=2.0)  # ...so written at the next log point
    assert WORST_SETTLED == 3
    assert [s for t, _, s in writer.texts if t == "adam/worst_tensors"] == [10, 60, 100, 130]


def test_a_long_run_writes_few_worst_tensor_tables(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from adam_monitor.cli.events import read_scalars

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    writer = SummaryWriter(str(tmp_path))
    texts = []
    add_text = writer.add_text
    writer.add_text = lambda tag, text, step: (texts.append((tag, step)), add_text(tag, text, step))
    monitor = Monitor(opt, named_parameters=model.named_parameters(), writer=writer, log_every_n_steps=5)
    x = torch.randn(64, 8)
    for _ in range(200):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    monitor.close()
    writer.close()
    points = len(read_scalars(tmp_path)["adam/update_rms"])
    tables = [s for tag, s in texts if tag == "adam/worst_tensors"]
    assert points == 40 and tables[0] == 5 and len(tables) < points / 2, tables


# ---------------------------------------------------------------------------------------------- batched scalars
#: Values add_scalar takes, the awkward ones included: non-finite, beyond float32, not a float.
AWKWARD = {
    "adam/update_rms": 0.1,
    "adam/nan": math.nan,
    "adam/inf": math.inf,
    "adam/-inf": -math.inf,
    "adam/beyond_float32": 1e40,
    "adam/denormal": 1e-45,
    "adam/rounded": 1 / 3,
    "adam/int": 7,
    "adam/numpy": np.float64(2.5),
    "adam/tensor": torch.tensor(0.25, dtype=torch.float64),
    "adam_per_parameter/update_rms/block.0.weight": 3.0,
}


def scalar_events(logdir) -> list[tuple[int, float, dict[str, float]]]:
    """``(step, wall_time, {tag: simple_value})`` of each scalar event in the folder, in file order,
    as written (TensorBoard's readers convert simple values to tensors)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    (path,) = [str(p) for p in logdir.glob("events.out.tfevents.*")]
    events = []
    for record in RawEventFileLoader(path).Load():
        event = Event.FromString(record)
        values = {v.tag: v.simple_value for v in event.summary.value if v.HasField("simple_value")}
        if values:
            events.append((event.step, event.wall_time, values))
    return events


def same_points(a: dict, b: dict) -> bool:
    """``read_scalars`` results equal, NaN equal to NaN."""
    as_text = lambda scalars: {tag: [(s, repr(v)) for s, v in points] for tag, points in scalars.items()}  # noqa: E731
    return as_text(a) == as_text(b)


def test_scalars_written_in_one_event_read_back_as_add_scalar_writes_them(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from adam_monitor.cli.events import read_scalars

    one_by_one, batched = SummaryWriter(str(tmp_path / "add_scalar")), SummaryWriter(str(tmp_path / "batched"))
    for step in (3, 7, 7, 12):  # a step written twice stays two points, as add_scalar's
        for tag, value in AWKWARD.items():
            one_by_one.add_scalar(tag, value, step)
        before = time.time()
        write_scalars(batched, AWKWARD, step)
        after = time.time()
        batched.flush()
        assert before <= scalar_events(tmp_path / "batched")[-1][1] <= after  # the time of the write, as add_scalar's
    one_by_one.close()
    batched.close()
    expected, got = read_scalars(tmp_path / "add_scalar"), read_scalars(tmp_path / "batched")
    assert set(got) == set(AWKWARD) and same_points(got, expected)
    assert math.isnan(got["adam/nan"][0][1]) and got["adam/inf"][0][1] == got["adam/beyond_float32"][0][1] == math.inf
    assert got["adam/-inf"][0][1] == -math.inf and got["adam/rounded"][0][1] == float(np.float32(1 / 3))
    events = scalar_events(tmp_path / "batched")
    assert [(step, len(values)) for step, _, values in events] == [(s, len(AWKWARD)) for s in (3, 7, 7, 12)]


def test_writers_other_than_torchs_own_get_one_add_scalar_per_tag(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    class Overriding(SummaryWriter):  # its add_scalar may do more than write: it must be called
        def add_scalar(self, tag, value, step=None, **kwargs):
            calls.append((tag, step))
            super().add_scalar(tag, value, step, **kwargs)

    metrics = {"adam/a": 1.0, "adam/b": math.nan, "adam/c": 2}
    fake = FakeWriter()
    write_scalars(fake, metrics, 5)
    assert fake.scalars == [("adam/a", 1.0, 5), ("adam/b", metrics["adam/b"], 5), ("adam/c", 2, 5)]
    calls: list = []
    overriding = Overriding(str(tmp_path / "subclass"))
    write_scalars(overriding, metrics, 5)
    patched = SummaryWriter(str(tmp_path / "patched"))
    patched.add_scalar = lambda tag, value, step=None: calls.append((tag, -step))
    write_scalars(patched, metrics, 5)
    assert calls == [(t, 5) for t in metrics] + [(t, -5) for t in metrics]
    overriding.close()
    patched.close()


def test_a_writer_that_fails_in_the_batch_is_one_warning_and_the_next_log_point_retries(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer, scalar_sink=None, per_parameter=False)
    real = writer._get_file_writer()

    class Full:
        def add_summary(self, *args):
            raise OSError(28, "No space left on device")

    writer.file_writer = Full()
    with pytest.warns(UserWarning, match="could not write scalars to TensorBoard.*No space left"):
        assert not sink.write("adam", {"adam/update_rms": 1.0}, 10, worst={})
    assert not sink.write("adam", {"adam/update_rms": 1.0}, 20, worst={})  # still failing: no second warning
    writer.file_writer = real
    with pytest.warns(UserWarning, match="writes scalars to TensorBoard.*again"):
        assert sink.write("adam", {"adam/update_rms": 2.0}, 30, worst={})
    writer.close()
    assert [(s, v) for s, _, values in scalar_events(tmp_path) for v in values.values()] == [(30, 2.0)]


def test_lightnings_tensorboard_logger_writes_the_same_scalars_in_one_event_per_log_point(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from support import AdamBoring

    from adam_monitor import AdamMonitor
    from adam_monitor.cli.events import read_scalars

    class OwnLogMetrics(TensorBoardLogger):
        """A logger with a log_metrics of its own: the callback calls it, which writes as Lightning does."""

        def log_metrics(self, metrics, step=None):
            super().log_metrics(metrics, step)

    batched = TensorBoardLogger(tmp_path, name="batched", version=0, prefix="train")
    lightnings = OwnLogMetrics(tmp_path, name="lightning", version=0, prefix="train")
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        log_every_n_steps=2,
        callbacks=[AdamMonitor()],
        logger=[batched, lightnings],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(AdamBoring())
    got, expected = read_scalars(batched.log_dir), read_scalars(lightnings.log_dir)
    adam = {tag for tag in expected if tag.startswith(("train-adam/", "train-adam_per_parameter/"))}
    assert "train-adam_per_parameter/update_rms/layer.weight" in adam and "train-adam/worst/update_rms" in adam
    assert [s for s, _ in expected["train-adam/update_rms"]] == [1, 3, 5]
    assert set(got) == set(expected) and same_points(got, expected)
    per_point = [(step, len(values)) for step, _, values in scalar_events(Path(batched.log_dir)) if len(values) > 1]
    assert per_point == [(s, len(adam)) for s in (1, 3, 5)]  # the callback's scalars: one event per log point


def test_event_records_are_checksummed_in_c_to_the_same_bytes(monkeypatch):
    import io

    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    monkeypatch.setattr(record_writer, "masked_crc32c", pywrap_tensorflow.masked_crc32c)  # restored after
    rng = np.random.default_rng(0)
    records = [rng.bytes(n) for n in (0, 1, 3, 8, 255, 4096, 60_000)]

    def written() -> bytes:
        out = io.BytesIO()
        writer = record_writer.RecordWriter(out)
        for r in records:
            writer.write(r)
        return out.getvalue()

    pure_python = written()
    assert fast_record_checksums() and record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c
    assert written() == pure_python
    assert fast_record_checksums(), "a second call keeps it"


def test_a_checksum_someone_else_installed_is_left_alone(monkeypatch):
    from tensorboard.summary.writer import record_writer

    def theirs(data):
        return 0

    monkeypatch.setattr(record_writer, "masked_crc32c", theirs)
    assert fast_record_checksums() is False and record_writer.masked_crc32c is theirs
