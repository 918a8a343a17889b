"""TensorBoard sink: event files read back with TensorBoard's own reader equal the Monitor's history."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from stabilitylab import metrics as M
from stabilitylab.probes.base import Event
from stabilitylab.sinks.tensorboard import CONFIG_TAG, EVENTS_TAG, TensorBoard

pytest.importorskip("tensorboard")




def _read(logdir):
    """TensorBoard's reader over one run directory: (scalars {tag: {step: value}}, texts {tag: {step: str}},
    hparams plugin content)."""
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(logdir), size_guidance={TENSORS: 0})
    acc.Reload()
    scalars, texts = {}, {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        for ev in acc.Tensors(tag):
            arr = tensor_util.make_ndarray(ev.tensor_proto)
            if plugin == "scalars":
                assert ev.step not in scalars.setdefault(tag, {}), f"{tag}: step {ev.step} written twice"
                scalars[tag][ev.step] = float(arr)
            elif plugin == "text":
                texts.setdefault(tag, {}).setdefault(ev.step, []).append(arr.item().decode())
    for tag in acc.Tags()["scalars"]:  # old-style float32 scalars (the user's own add_scalar calls)
        scalars[tag] = {ev.step: ev.value for ev in acc.Scalars(tag)}
    try:
        hparams = acc.PluginTagToContent("hparams")
    except KeyError:  # no hparams written
        hparams = {}
    return scalars, texts, hparams


def _expected(history, max_modules):
    """Independent construction of every series from the tidy history: {tag: {step: value}}."""
    want: dict[str, dict[int, float]] = {}
    for (step, metric), g in history.groupby(["step", "metric"]):
        named = g[g["module"] != ""]
        for v in g.loc[g["module"] == "", "value"]:
            want.setdefault(f"{metric}/model", {})[int(step)] = float(v)
        if max_modules is None or len(named) <= max_modules:
            for m, v in zip(named["module"], named["value"]):
                want.setdefault(f"{metric}/{m}", {})[int(step)] = float(v)
        if len(named):
            how = M.METRICS[metric].summary
            want.setdefault(f"{metric}/{how}", {})[int(step)] = float(getattr(named["value"], how)(skipna=True))
    return want


def _assert_series_equal(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for tag, series in want.items():
        assert set(got[tag]) == set(series), tag
        for step, v in series.items():
            g = got[tag][step]
            assert (math.isnan(v) and math.isnan(g)) or g == v, (tag, step, g, v)  # float64: exact


def test_event_files_hold_every_value_of_the_history_events_and_hparams(train_monitored, tiny_model, tiny_batch, tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    sink = TensorBoard(tmp_path / "tb", max_modules=3)
    mon = train_monitored(tiny_model, tiny_batch, 5, every=2, sinks=[sink], run_id="r-1",
                 config={"lr": 1e-3, "size": "xs", "variant": "baseline"})
    events = [Event("r-1", 4, "loss_spike", "", 9.0, "spike | one"), Event("r-1", 4, "nonfinite", "grad", 3.0, "3 nan")]
    mon.emit(events)
    hist = mon.history()
    mon.close()
    mon.close()

    scalars, texts, hparams = _read(tmp_path / "tb")
    want = _expected(hist, max_modules=3)
    _assert_series_equal(scalars, want)
    assert sorted(scalars["loss/model"]) == [0, 2, 4]
    # per-tensor metrics have > 3 modules: summary only; the two attention layers keep their own series
    assert "grad.rms/max" in scalars and not any(t.startswith("grad.rms/blocks") for t in scalars)
    assert {"attn.max_logit/blocks.0.attn", "attn.max_logit/blocks.1.attn", "attn.entropy/min"} <= set(scalars)

    (table,) = texts[f"{EVENTS_TAG}/text_summary"][4]  # add_text appends /text_summary
    lines = table.splitlines()
    assert lines[0] == "| kind | module | value | message |"
    assert lines[2:] == ["| loss_spike | - | 9 | spike \\| one |", "| nonfinite | grad | 3 | 3 nan |"]
    (config,) = texts[f"{CONFIG_TAG}/text_summary"][0]
    assert "| run_id | r-1 |" in config and "| lr | 0.001 |" in config

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in
          start.session_start_info.hparams.items()}
    assert hp["lr"] == 1e-3 and hp["size"] == "xs" and hp["run_id"] == "r-1" and hp["every"] == 2
    assert hp["n_params"] == sum(p.numel() for p in tiny_model.parameters())
    assert hp["probes"] == str(mon.config.get("probes", [p.name for p in mon.probes]))


def test_logs_into_lightnings_writer_and_leaves_it_open(train_monitored, tiny_model, tiny_batch, tmp_path):
    TensorBoardLogger = pytest.importorskip("lightning.pytorch.loggers").TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="lt", version=0)
    writer = logger.experiment
    writer.add_scalar("train/loss", 1.5, global_step=0)
    mon = train_monitored(tiny_model, tiny_batch, 3, every=1, probes=["optimizer"], sinks=[TensorBoard(writer=writer)])
    hist = mon.history()
    mon.close()
    writer.add_scalar("train/loss", 1.25, global_step=1)  # still open: the sink did not close it
    writer.close()

    scalars, _, hparams = _read(logger.log_dir)
    assert scalars.pop("train/loss") == {0: 1.5, 1: 1.25}
    _assert_series_equal(scalars, _expected(hist, max_modules=128))
    assert not hparams  # hparams are left to the writer's owner


class _FlakyWriter:
    """A real SummaryWriter whose add_scalar raises for calls ``fail_from`` .. ``fail_from + n_fail - 1``."""

    def __init__(self, logdir, fail_from, n_fail):
        from torch.utils.tensorboard import SummaryWriter

        self.inner = SummaryWriter(str(logdir))
        self.calls, self.fail_from, self.n_fail = 0, fail_from, n_fail

    def add_scalar(self, tag, value, global_step=None, walltime=None, new_style=False, double_precision=False):
        self.calls += 1
        if self.fail_from <= self.calls < self.fail_from + self.n_fail:
            raise OSError("No space left on device")
        self.inner.add_scalar(tag, value, global_step, walltime, new_style, double_precision)

    def add_text(self, *args, **kwargs):
        self.inner.add_text(*args, **kwargs)

    def flush(self):
        self.inner.flush()


def test_failing_writes_warn_once_training_goes_on_and_retries_write_each_point_once(train_monitored, tiny_model, tiny_batch,
                                                                                      tmp_path):
    writer = _FlakyWriter(tmp_path / "tb", fail_from=30, n_fail=3)  # inside step 0's row, then its 2 retries
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = train_monitored(tiny_model, tiny_batch, 7, every=1, sinks=[TensorBoard(writer=writer)])
        hist = mon.history()
        mon.close()
    writer.inner.close()
    ours = [w for w in caught if "stabilitylab" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "TensorBoard" in str(ours[0].message) and "No space left" in str(ours[0].message)
    assert sorted(hist["step"].unique()) == list(range(7))  # training and the history went on
    scalars, _, _ = _read(tmp_path / "tb")
    _assert_series_equal(scalars, _expected(hist, max_modules=128))  # nothing lost, nothing written twice


def test_a_writer_that_always_raises_never_stops_training(train_monitored, tiny_model, tiny_batch, tmp_path):
    class Broken:
        def add_scalar(self, *a, **k):
            raise RuntimeError("writer is gone")

        add_text = add_scalar

        def flush(self):
            raise RuntimeError("writer is gone")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = train_monitored(tiny_model, tiny_batch, 4, every=1, sinks=[TensorBoard(writer=Broken())])
        mon.close()
    assert sorted(mon.history()["step"].unique()) == [0, 1, 2, 3]
    assert any("TensorBoard" in str(w.message) for w in caught)


@pytest.mark.parametrize("kwargs, match", [
    ({"logdir": "a", "writer": object()}, "pass one of them"),
    ({"writer": object()}, "expected a SummaryWriter"),
    ({"logdir": ""}, "logdir=''"),
    ({"max_modules": -1}, "max_modules=-1"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TensorBoard(**kwargs)


def test_default_logdir_is_per_run(train_monitored, tiny_model, tiny_batch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mon = train_monitored(tiny_model, tiny_batch, 1, every=1, probes=["logits"], sinks=[TensorBoard()], run_id="abc")
    mon.close()
    scalars, _, _ = _read(tmp_path / "runs" / "tensorboard" / "abc")
    assert np.isclose(scalars["loss/model"][0], mon.history().query("metric == 'loss'")["value"].iloc[0], rtol=0)
