"""What kill -9 costs the Parquet sink: records lost per kill vs the ``flush_every_steps`` bound.

    python benchmarks/parquet_kill.py --kills 20     # prints a table, writes results/parquet_kill.json

For each kill a forked child writes logged steps (3 rows each) to a Parquet sink as fast as it can,
appending each step number to ``acked`` once ``write`` returned, and is SIGKILLed after a random delay
(seeded). Lost = steps acknowledged - steps readable from disk; the bound is ``flush_every_steps``.
The forking loop runs in its own process (``--loop``), which never writes Parquet itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROWS_PER_STEP = 3


def _child(d: str, every: int) -> None:
    from stabilitylab.sinks.base import Records
    from stabilitylab.sinks.parquet import Parquet

    sink = Parquet(d, flush_records=10**9, flush_every_s=None, flush_every_steps=every)
    sink.open("killed", {})
    fd = os.open(os.path.join(d, "acked"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for step in range(10**9):
        sink.write(Records("killed", step, 0.0, ["loss", "grad.global_norm", "lr"], ["", "", ""],
                           np.array([float(step), 2.0 * step, 1e-3])))
        os.write(fd, f"{step}\n".encode())


def _loop(base: str, kills: int, every: int, seed: int) -> None:
    import stabilitylab.sinks.parquet  # noqa: F401 - imported once, before forking

    rng = random.Random(seed)
    for i in range(kills):
        d = os.path.join(base, f"kill{i}")
        os.makedirs(d)
        pid = os.fork()
        if pid == 0:
            try:
                _child(d, every)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def kill_loop(base: Path, kills: int, every: int, seed: int = 0, timeout: float = 300) -> list[dict]:
    """Run ``kills`` write-and-kill rounds under ``base``; per kill: acked, on_disk, lost, parts, readable.

    ``readable`` is False when reading the history warned (a part skipped as corrupt); ``prefix`` is True
    when the steps on disk are exactly ``0 .. on_disk - 1``.
    """
    from stabilitylab.sinks.parquet import read_history

    subprocess.run([sys.executable, __file__, "--loop", str(base), str(kills), str(every), str(seed)],
                   check=True, timeout=timeout)
    out = []
    for i in range(kills):
        d = base / f"kill{i}"
        acked = len((d / "acked").read_text().split()) if (d / "acked").exists() else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = read_history(d)
        steps = sorted(set(df["step"].tolist()))
        out.append({"acked": acked, "on_disk": len(steps), "lost": acked - len(steps),
                    "parts": len(list((d / "history").glob("part-*.parquet"))), "readable": not caught,
                    "prefix": steps == list(range(len(steps))),
                    "full_steps": bool((df.groupby("step").size() == ROWS_PER_STEP).all())})
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--loop":
        _loop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "parquet_kill.json"))
    args = ap.parse_args()
    rows = []
    for every in (1, 10, 100):
        with tempfile.TemporaryDirectory() as d:
            kills = kill_loop(Path(d), args.kills, every, seed=every)
        lost = [k["lost"] for k in kills]
        rows.append({"flush_every_steps": every, "kills": len(kills), "lost_steps": lost, "max_lost": max(lost),
                     "all_readable": all(k["readable"] and k["prefix"] for k in kills),
                     "acked_steps": [k["acked"] for k in kills]})
        print(f"flush_every_steps={every:4d}: lost steps per kill {lost} (max {max(lost)}, bound {every}); "
              f"readable: {rows[-1]['all_readable']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows_per_step": ROWS_PER_STEP, "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
