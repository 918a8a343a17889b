"""``sweep(spec)``: train every grid point once into a resumable store."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pandas as pd

from stabilitylab._checks import int_at_least
from stabilitylab.sweeps.executors import EXECUTORS
from stabilitylab.sweeps.runner import TrainFn
from stabilitylab.sweeps.spec import SweepSpec
from stabilitylab.sweeps.store import FINISHED, SweepStore, runs_frame

_TABLE_EVERY_S = 30.0


def trainer_name(train_fn: TrainFn | None) -> str:
    """The name a store records for ``train_fn`` (None: the built-in proxy trainer); stores refuse other trainers' runs."""
    if train_fn is None:
        return "stabilitylab.proxy"
    if not callable(train_fn):
        raise TypeError(f"sweep(train_fn={train_fn!r}): pass a function train_fn(config, monitor) or None")
    return f"{getattr(train_fn, '__module__', '?')}.{getattr(train_fn, '__qualname__', type(train_fn).__name__)}"


def sweep(spec: SweepSpec | str | os.PathLike, executor: str = "local", store: str | os.PathLike | None = None,
          workers: int | None = None, address: str | None = None, train_fn: TrainFn | None = None,
          extend: bool = False, progress: bool = True, run_progress: bool = False,
          retry_failed: bool = True) -> pd.DataFrame:
    """Train every point of ``spec`` once, resuming from ``store``; returns this spec's runs table.

    Points already finished in the store (status ``ok`` or ``diverged``) are skipped; ``failed`` ones are
    re-run unless ``retry_failed=False``; points with no row (never run, or in flight when a previous
    sweep was killed) are run. A run that raises is recorded as ``failed`` with its traceback and the
    sweep goes on. Other sweeps may run on the same store at the same time: a point another process is
    training is waited for and taken from the store, or re-trained here if that process died (see
    ``stabilitylab.sweeps.store``).

    Args:
        spec: a ``SweepSpec`` or the path of a TOML spec.
        executor: ``"local"`` (sequential), ``"processes"`` (``workers`` spawned processes),
            ``"ray"`` (one Ray task per point; ``address`` joins a cluster) or ``"vectorized"``
            (``stabilitylab.proxy.vectorized.train_many``). See ``stabilitylab.sweeps.executors``.
        store: directory of results (default ``runs/<spec.name>``).
        workers: processes (``processes``; default one per core), or most Ray tasks in flight and CPUs
            of a new local Ray (``ray``).
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``); None starts a local Ray.
        train_fn: ``train_fn(config, monitor) -> float | RunResult | dict`` to train your own model
            (contract in ``stabilitylab.sweeps.runner``); None trains the built-in proxy.
        extend: allow adding this spec's points to a store written by a different spec.
        progress: tqdm bar over grid points (done / diverged / failed / skipped, ETA).
        run_progress: also a per-step bar for each run (``local`` executor, proxy only).
        retry_failed: re-run points recorded as ``failed``.

    Returns:
        one row per point of ``spec`` in grid order (columns as ``load_sweep``).

    Raises:
        ValueError: unknown executor, or a store written by a different spec / train_fn.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = SweepSpec.from_toml(spec)
    if not isinstance(spec, SweepSpec):
        raise TypeError(f"sweep(spec=...): expected a SweepSpec or a TOML path, got {type(spec).__name__}")
    if executor not in EXECUTORS:
        raise ValueError(f"sweep(executor={executor!r}): choose one of {', '.join(EXECUTORS)}")
    if workers is not None and not int_at_least(workers, 1):
        raise ValueError(f"sweep(workers={workers!r}): must be a positive int or None")
    st = SweepStore(Path("runs") / spec.name if store is None else store)
    st.open(spec, trainer_name(train_fn), extend=extend)
    rows = st.rows()
    points = spec.points()
    keep = FINISHED if retry_failed else (*FINISHED, "failed")
    todo = [p for p in points if rows.get(p.run_id, {}).get("status") not in keep]
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": len(points) - len(todo)}
    claims, deferred = {}, []
    for p in todo:  # claim each point; one another process holds is waited for after ours
        lk = st.claim(p.run_id)
        if lk is None:
            deferred.append(p)
        elif st.status(p.run_id) in keep:  # finished by another sweep since rows() was read
            lk.release()
            counts["skipped"] += 1
        else:
            claims[p.run_id] = lk
    mine = [p for p in todo if p.run_id in claims]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(points), initial=counts["skipped"], desc=f"sweep {spec.name}", unit="run",
               disable=not progress, dynamic_ncols=True)
    bar.set_postfix(counts)
    last_table = time.monotonic()
    try:
        while mine:
            for point, row, history in EXECUTORS[executor](mine, train_fn, workers, address, run_progress):
                st.write(row, history)
                claims.pop(point.run_id).release()
                rows[point.run_id] = row
                counts["failed" if row["status"] == "failed" else "done"] += 1
                counts["diverged"] += row["status"] == "diverged"
                bar.set_postfix(counts, refresh=False)
                bar.update(1)
                if time.monotonic() - last_table > _TABLE_EVERY_S:
                    st.write_runs_table()
                    last_table = time.monotonic()
            mine = []
            for p in deferred:  # held by another sweep: wait; re-train what its holder did not finish
                lk = st.claim(p.run_id, wait=True)
                if st.status(p.run_id) in keep:
                    lk.release()
                    counts["skipped"] += 1
                    bar.update(1)
                else:
                    claims[p.run_id] = lk
                    mine.append(p)
            deferred = []
    finally:
        bar.close()
        for lk in claims.values():
            lk.release()
        rows = st.rows()
        st.write_runs_table()
    if counts["failed"]:
        warnings.warn(f"sweep {spec.name!r}: {counts['failed']} of {len(todo)} runs failed (see the 'error' "
                      f"column or `stabilitylab status {st.path}`); sweep() again to retry them", stacklevel=2)
    return runs_frame([rows[p.run_id] for p in points])
