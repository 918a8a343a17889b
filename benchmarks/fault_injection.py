"""Faults injected on rank 1 of a 2-process gloo run: the Monitor never hangs and names the rank.

    python benchmarks/fault_injection.py          # prints a table, writes results/fault_injection.json

Each fault is injected on rank 1 only, on logged step ``FAULT_AT`` of a ``STEPS``-step run at every=1
(tiny proxy per rank, same seed, each rank trains on its own data share; no DDP, so a rank may skip a
step without blocking the gradient all-reduce):

* ``probe_raises``: a probe raises inside its ``collect`` on rank 1;
* ``nonfinite``:    rank 1's activations are NaN (forward hook on ``blocks.0``);
* ``skip_data``:    rank 1 runs no forward/backward on that step and calls ``mon.step()`` with nothing;
* ``skip_call``:    rank 1 skips the ``mon.step()`` call (it logs one step fewer than rank 0);
* ``rank_dies``:    rank 1 exits (``os._exit``) before that step's ``mon.step()``.

"Time to recover" is rank 0's ``mon.step()`` wall time on the faulted step minus the median of its clean
steps (for ``skip_call`` the extra step is answered by rank 1's ``close()``, so it is rank 0's last
step). Every process must finish within ``timeout`` seconds, else the run counts as a hang.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import stabilitylab as sl
from stabilitylab import distributed as D
from stabilitylab import metrics as M
from stabilitylab.probes.base import Probe
from stabilitylab.proxy import ProxyConfig, ProxyTransformer

FAULTS = ("probe_raises", "nonfinite", "skip_data", "skip_call", "rank_dies")
STEPS = 6
FAULT_AT = 3
FLAKY = "test.rank_plus_one"
M.register_metric(FLAKY, "mean", "mean", "rank + 1 (a mean over ranks tells which ranks contributed)")


class Flaky(Probe):
    """Records ``rank + 1`` every logged step; raises in ``collect`` on rank 1 at step ``FAULT_AT``."""

    name = "flaky"
    metrics = (FLAKY,)

    def __init__(self, fail: bool):
        super().__init__()
        self.fail, self.calls = fail, 0

    def _attach(self) -> None:
        pass

    def collect(self):
        self.calls += 1
        if self.fail and self.calls == FAULT_AT + 1:
            raise RuntimeError("injected probe failure")
        self.record(FLAKY, "", float(D.rank_and_world()[0] + 1))
        return super().collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fault_worker(rank: int, world: int, port: int, out: str, fault: str, timeout_s: float) -> None:
    """One rank of a faulted run; writes ``rank<r>.pkl`` with per-step values, times and events."""
    from datetime import timedelta

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    D.CONTROL_TIMEOUT_S = timeout_s
    result: dict = {"values": [], "seconds": [], "events": [], "local_loss": []}
    try:
        torch.manual_seed(0)
        model = ProxyTransformer(ProxyConfig(d_model=16, n_layers=1, head_dim=8, seq_len=8))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mine = rank == 1
        mon = sl.Monitor(model, optimizer=opt, every=1, run_id=f"fault-{fault}",
                         probes=["attention", "logits", "activations", "optimizer", "health", Flaky(mine and fault == "probe_raises")],
                         on_event=lambda e: result["events"].append((e.step, e.kind, e.module, e.message,
                                                                     dict(e.extra))))
        g = torch.Generator().manual_seed(1 + rank)
        for step in range(STEPS):
            x = torch.randint(0, 256, (2, 8), generator=g)
            hit = mine and step == FAULT_AT
            if hit and fault == "rank_dies":
                os._exit(3)
            loss = None
            if not (hit and fault == "skip_data"):
                h = model.blocks[0].register_forward_hook(lambda m, a, o: o * float("nan")) \
                    if hit and fault == "nonfinite" else None
                _, loss = model(x, x)
                loss.backward()
                if h is not None:
                    h.remove()
                opt.step()
                opt.zero_grad(set_to_none=True)
            result["local_loss"].append(None if loss is None else loss.item())
            if hit and fault == "skip_call":
                continue
            t0 = time.perf_counter()
            vals = mon.step(loss)
            result["seconds"].append(time.perf_counter() - t0)
            result["values"].append(vals)
        t0 = time.perf_counter()
        mon.close()
        result["close_seconds"] = time.perf_counter() - t0
        result["history_steps"] = sorted(set(mon.history()["step"]))
    except Exception:  # noqa: BLE001 - reported to the caller
        import traceback

        result["error"] = traceback.format_exc()
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 - the peer may be gone
        pass


def run_fault(fault: str, out: Path, timeout_s: float = 60.0, world: int = 2) -> dict:
    """Spawn ``world`` gloo ranks with ``fault`` on rank 1; raise ``TimeoutError`` if they hang.

    Returns:
        ``{"ranks": [per-rank result or None], "exitcodes": [...], "wall_s": seconds}``.
    """
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ctx = mp.start_processes(fault_worker, args=(world, free_port(), str(out), fault, timeout_s),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + 3 * timeout_s + 60
    procs = ctx.processes
    while any(p.is_alive() for p in procs):
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise TimeoutError(f"fault {fault!r}: ranks still running after {3 * timeout_s + 60:.0f} s (a hang)")
        time.sleep(0.1)
    ranks = []
    for r in range(world):
        f = out / f"rank{r}.pkl"
        ranks.append(pickle.loads(f.read_bytes()) if f.exists() else None)
    return {"ranks": ranks, "exitcodes": [p.exitcode for p in procs], "wall_s": time.perf_counter() - t0}


def summarise(fault: str, run: dict) -> dict:
    """One table row: outcome on rank 0, the events naming rank 1, time to recover."""
    r0 = run["ranks"][0]
    if r0 is None or "error" in r0:
        return {"fault": fault, "rank": 1, "outcome": f"rank 0 failed: {r0 and r0['error'][-300:]}"}
    secs = r0["seconds"]
    at = len(secs) - 1 if fault == "skip_call" else FAULT_AT
    clean = float(np.median([s for i, s in enumerate(secs) if i != at]))
    named = [(s, k) for s, k, _, _, extra in r0["events"]
             if (1 in extra.get("ranks", []) and k != "loss_spike") or k == "collective_failed"]
    return {"fault": fault, "rank": 1, "steps_logged_rank0": len(secs),
            "events_on_rank0": sorted({f"{k}@{s}" for s, k in named}),
            "outcome": "no hang; " + ("recorded as " + ", ".join(sorted({k for _, k in named})) if named
                                      else "NOT recorded"),
            "exitcodes": run["exitcodes"], "clean_step_ms": 1e3 * clean,
            "time_to_recover_ms": 1e3 * (secs[at] - clean), "close_ms": 1e3 * r0["close_seconds"]}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fault_injection.json"))
    args = ap.parse_args()
    rows = []
    for fault in FAULTS:
        with tempfile.TemporaryDirectory() as d:
            row = summarise(fault, run_fault(fault, Path(d), args.timeout))
        rows.append(row)
        print(f"{fault:13s} rank 1: {row['outcome']}; recover {row.get('time_to_recover_ms', float('nan')):.1f} ms "
              f"(clean step {row.get('clean_step_ms', float('nan')):.1f} ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "python": platform.python_version(),
                                          "steps": STEPS, "fault_at": FAULT_AT, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
