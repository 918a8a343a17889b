"""One table of every probe and every sink drives the same contract checks (composer style).

Construct, attach / detach twice, close twice, a short training under a Monitor, tidy records, and
(probes) training unchanged. The coverage tests fail when a probe or sink is added to the package
(registered, exported or defined in ``stabilitylab.probes`` / ``stabilitylab.sinks``) without a row here.
"""

from __future__ import annotations

import importlib
import io
import pkgutil

import numpy as np
import pytest
import torch

import stabilitylab.probes as probes_pkg
import stabilitylab.sinks as sinks_pkg
from stabilitylab import Monitor, sinks
from stabilitylab import metrics as M
from stabilitylab.probes import REGISTRY, Probe, register_optional_probes
from stabilitylab.probes.early_warning import EarlyWarning
from stabilitylab.sinks.base import Sink

register_optional_probes()

#: Every probe: name -> factory. ``records`` False: a host-side probe that declares no metrics of its own
#: (it reads the others' values and emits events).
PROBES = {name: (cls, True) for name, cls in REGISTRY.items()}
PROBES["early_warning"] = (lambda: EarlyWarning(burn_in=0, window=3), False)
PROBE_CLASSES = {name: (cls if isinstance(cls, type) else type(cls())) for name, (cls, _) in PROBES.items()}

SINKS = {
    "memory": lambda tmp: sinks.Memory(),
    "parquet": lambda tmp: sinks.Parquet(tmp / "pq", flush_records=1),
    "console": lambda tmp: sinks.Console(io.StringIO()),
    "null": lambda tmp: sinks.Null(),
    "tensorboard": lambda tmp: sinks.TensorBoard(tmp / "tb"),
    "wandb": lambda tmp: sinks.WandB(project="contract"),
}
SINK_CLASSES = {"memory": sinks.Memory, "parquet": sinks.Parquet, "console": sinks.Console, "null": sinks.Null,
                "tensorboard": sinks.TensorBoard, "wandb": sinks.WandB}


def _subclasses(base: type, package) -> set[type]:
    """Every subclass of ``base`` defined in ``package`` (all of its modules imported first)."""
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
    out, todo = set(), [base]
    while todo:
        for c in todo.pop().__subclasses__():
            todo.append(c)
            if c.__module__.startswith(package.__name__ + "."):
                out.add(c)
    return out


def test_every_probe_in_the_package_has_a_contract_row():
    known = set(PROBE_CLASSES.values())
    missing = (_subclasses(Probe, probes_pkg) | set(REGISTRY.values())) - known
    assert not missing, f"add these probes to tests/test_contract.py PROBES: {sorted(c.__name__ for c in missing)}"
    assert set(REGISTRY) <= set(PROBES)


def test_every_sink_in_the_package_has_a_contract_row():
    exported = {getattr(sinks, n) for n in sinks.__all__}
    exported = {c for c in exported if isinstance(c, type) and issubclass(c, Sink) and c is not Sink}
    missing = (_subclasses(Sink, sinks_pkg) | exported) - set(SINK_CLASSES.values())
    assert not missing, f"add these sinks to tests/test_contract.py SINKS: {sorted(c.__name__ for c in missing)}"
    assert set(SINKS) == set(SINK_CLASSES)


def _hooks(model, opt) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    n += sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return n + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def _check_tidy(df, probe_metrics=None):
    assert list(df.columns) == ["run_id", "step", "metric", "module", "value", "wall_time"]
    assert df["step"].dtype == np.int64 and df["value"].dtype == np.float64
    assert set(df["metric"]) <= set(M.METRICS)
    assert all(isinstance(m, str) for m in df["module"])
    assert sorted(df["step"].unique()) == [0, 2]
    if probe_metrics is not None:
        assert set(df["metric"]) - {M.LOSS} <= set(probe_metrics) | {M.HEALTH_NONFINITE, M.HEALTH_SPIKE}
        assert set(df["metric"]) - {M.LOSS}, "the probe recorded nothing"


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_contract(name, tiny_model, tiny_batch, train_loop):
    factory, records = PROBES[name]
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    base = _hooks(tiny_model, opt)
    probe = factory()
    assert probe.name == name and set(probe.metrics) <= set(M.METRICS)
    assert bool(probe.metrics) == records
    probe.attach(tiny_model, opt)
    n = _hooks(tiny_model, opt)
    probe.attach(tiny_model, opt)  # idempotent
    assert _hooks(tiny_model, opt) == n
    probe.detach()
    probe.detach()
    assert _hooks(tiny_model, opt) == base and not probe.attached
    with torch.no_grad():
        before = [p.clone() for p in tiny_model.parameters()]
    mon = Monitor(tiny_model, optimizer=opt, every=2, probes=[probe])
    train_loop(tiny_model, opt, tiny_batch, 4, mon)
    mon.close()
    mon.close()
    assert _hooks(tiny_model, opt) == base
    hist = mon.history()
    _check_tidy(hist, probe.metrics if records else None)
    if not records:  # a host-side probe: what it emitted live is what it emits replaying the same history
        live = [(e.step, e.kind, e.module) for e in mon.events if e.kind != "probe_error"]
        assert [(e.step, e.kind, e.module) for e in probe.replay(hist)] == live
        assert not [e for e in mon.events if e.kind == "probe_error"]
    # probes never change training: same parameters as an unmonitored copy trained identically
    ref = type(tiny_model)(tiny_model.cfg)
    with torch.no_grad():
        for p, b in zip(ref.parameters(), before):
            p.copy_(b)
    train_loop(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3), tiny_batch, 4)
    for p, q in zip(tiny_model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SINKS))
def test_sink_contract(name, tiny_model, tiny_batch, tmp_path, train_loop, request):
    read_wandb = request.getfixturevalue("wandb_offline") if name == "wandb" else None
    sink = SINKS[name](tmp_path)
    assert type(sink) is SINK_CLASSES[name]
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with Monitor(tiny_model, optimizer=opt, every=2, sinks=[sink], run_id="c") as mon:
        train_loop(tiny_model, opt, tiny_batch, 4, mon)
    sink.close()
    sink.close()
    hist = mon.history()
    _check_tidy(hist)
    if isinstance(sink, sinks.Memory):
        assert len(sink.to_frame()) == len(hist)
    if isinstance(sink, sinks.Parquet):
        assert len(sinks.read_history(sink.path)) == len(hist)
    if isinstance(sink, sinks.Console):
        assert len(sink.stream.getvalue().splitlines()) >= 2
    if isinstance(sink, sinks.TensorBoard):
        assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file written"
    if read_wandb is not None:
        (run,) = read_wandb()
        steps = [r["stabilitylab/step"] for r in run["history"] if "stabilitylab/step" in r]
        assert steps == [0, 2] and run["history"][0]["loss/model"] == pytest.approx(
            hist.loc[(hist["step"] == 0) & (hist["metric"] == M.LOSS), "value"].item(), rel=1e-6)
