"""A sweep process for the concurrent-store tests: ``python _concurrent_sweep.py STORE LOG SLEEP LR...``.

Its ``train_fn`` appends ``start <run_id> <pid>`` and ``end <run_id> <pid>`` lines to LOG (O_APPEND, one
write each) around a ``SLEEP``-second fake training, so the test can count how often each point was
started and finished, by which process."""

from __future__ import annotations

import os
import sys
import time


def _log(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def train_fn(config, monitor) -> float:
    rid = monitor.point.run_id
    _log(LOG, f"start {rid} {os.getpid()}")
    time.sleep(SLEEP)
    _log(LOG, f"end {rid} {os.getpid()}")
    return 1.0 / (1.0 + config.lr)


if __name__ == "__main__":
    from stabilitylab.sweeps import SweepSpec, sweep

    store, LOG, SLEEP = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lrs = [float(x) for x in sys.argv[4:]]
    spec = SweepSpec(name=f"lr{min(lrs):g}-{max(lrs):g}", lrs=lrs, steps=2, every=1)
    sweep(spec, store=store, train_fn=train_fn, extend=True, progress=False)
