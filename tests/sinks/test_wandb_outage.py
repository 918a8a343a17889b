"""The real W&B sink (offline mode) losing its service process mid-run: training goes on with one
warning, the Parquet sink holds every record, and ``close()`` returns (no network is used)."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import stabilitylab as sl
from stabilitylab.sinks.parquet import read_history
from stabilitylab.sinks.wandb import WandB

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds wandb-core through /proc")


def _children_named(prefix: str) -> list[int]:
    """Pids of this process's children whose command name starts with ``prefix`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == os.getpid() and name.startswith(prefix):
            out.append(int(d.name))
    return out


def _kill_and_wait(pids: list[int], timeout: float = 30.0) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[1][:3]
              for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_wandb_service_killed_mid_run_training_continues_and_parquet_keeps_every_record(
        tiny_model, tiny_batch, tmp_path, wandb_offline):
    x, y = tiny_batch
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    wb = WandB(project="outage")
    steps, kill_at = 10, 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = sl.Monitor(tiny_model, optimizer=opt, every=1, sinks=[sl.sinks.Parquet(tmp_path / "pq"), wb])
        core = _children_named("wandb-core")
        assert core, "no wandb-core service process found"
        got = []
        for step in range(steps):
            if step == kill_at:
                _kill_and_wait(core)
            _, loss = tiny_model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            got.append(mon.step(loss))
        closer = threading.Thread(target=mon.close, daemon=True)
        closer.start()
        closer.join(timeout=120)
        assert not closer.is_alive(), "Monitor.close() did not return with W&B's service gone"
    ours = [w for w in caught if "stabilitylab" in str(w.message)]
    assert len(ours) == 1 and "WandB" in str(ours[0].message), [str(w.message) for w in ours]
    assert all(v is not None for v in got)  # training and logging went on
    assert wb.broken is not None
    disk, mem = read_history(tmp_path / "pq"), mon.history()
    assert sorted(disk["step"].unique()) == list(range(steps))
    key = ["step", "metric", "module"]
    pd.testing.assert_frame_equal(disk.sort_values(key).reset_index(drop=True)[key + ["value"]],
                                  mem.sort_values(key).reset_index(drop=True)[key + ["value"]])
    import wandb

    assert wandb.run is None  # the dead run is released: a new W&B run in this process works
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sl.Monitor(tiny_model, every=1, probes=[], sinks=[WandB(project="after")]) as again:
            again.step(1.0)
