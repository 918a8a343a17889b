"""Executors: where grid points train. Each yields ``(point, row, history)`` as runs finish; the driver
(``sweep``) writes the store, so every executor shares one writer and one resume logic.

* ``local``: one after another in this process.
* ``processes``: N spawned worker processes on this machine (``concurrent.futures``); each sets
  ``torch.set_num_threads(max(1, cores // N))`` so N workers do not oversubscribe the cores.
* ``ray``: one Ray task (1 CPU) per point, on a local Ray started by ``ray.init()`` or an existing
  cluster (``address=``). Results travel back through Ray's object store and the *driver* writes them:
  workers of a cluster need not share a filesystem with the driver, a single writer cannot race, and a
  worker lost mid-run leaves nothing behind. The cost is that each run's history is sent to the driver
  (small: one row per metric and module every ``every`` steps).
* ``vectorized``: ``stabilitylab.proxy.vectorized.train_many`` trains the points that share a model
  shape together (proxy only).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from stabilitylab.sweeps.runner import TrainFn, failed_row, run_point
from stabilitylab.sweeps.spec import Point

Outcome = tuple[Point, dict[str, Any], "pd.DataFrame | None"]


def run_local(points: list[Point], train_fn: TrainFn | None, workers: int | None, address: str | None,
              run_progress: bool) -> Iterator[Outcome]:
    """Sequential, in this process (``workers`` and ``address`` unused)."""
    for p in points:
        yield (p, *run_point(p, train_fn, run_progress=run_progress))


def run_processes(points: list[Point], train_fn: TrainFn | None, workers: int | None, address: str | None,
                  run_progress: bool) -> Iterator[Outcome]:
    """``workers`` spawned processes (default: one per core); a dead worker's points are recorded as failed."""
    import concurrent.futures as cf
    import multiprocessing as mp

    cores = os.cpu_count() or 1
    n = workers or cores
    if train_fn is not None:
        try:
            pickle.dumps(train_fn)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(f"sweep(train_fn={train_fn!r}): executor='processes' sends train_fn to spawned "
                            f"workers, so it must be picklable: a module-level function of an importable module, "
                            f"not a lambda or closure ({e}); or use executor='local'") from None
    pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))
    try:
        futures = {pool.submit(run_point, p, train_fn, max(1, cores // n)): p for p in points}
        for fut in cf.as_completed(futures):
            p = futures[fut]
            try:
                yield (p, *fut.result())
            except Exception as e:  # BrokenProcessPool: a worker died (killed, out of memory, segfault)
                yield p, failed_row(p, f"{type(e).__name__}: {e}"), None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_ray(points: list[Point], train_fn: TrainFn | None, workers: int | None, address: str | None,
            run_progress: bool) -> Iterator[Outcome]:
    """One Ray task per point; at most ``workers`` in flight (default: as many as Ray schedules).

    Joins Ray if already initialised, else ``ray.init(address=address)`` (a new local cluster with
    ``num_cpus=workers`` when ``address`` is None) and shuts it down at the end. The driver writes the store.
    """
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray, an optional extra: pip install 'stabilitylab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=workers if address is None else None, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_point)
    todo = list(reversed(points))
    pending: dict[Any, Point] = {}
    limit = workers or len(points)
    try:
        while todo or pending:
            while todo and len(pending) < limit:
                p = todo.pop()
                pending[remote.remote(p, train_fn, 1)] = p
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            p = pending.pop(ref)
            try:
                yield (p, *ray.get(ref))
            except ray.exceptions.RayError as e:  # the worker died or the task could not run
                yield p, failed_row(p, f"{type(e).__name__}: {e}"), None
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def run_vectorized(points: list[Point], train_fn: TrainFn | None, workers: int | None, address: str | None,
                   run_progress: bool) -> Iterator[Outcome]:
    """``stabilitylab.proxy.vectorized.train_many`` on each group of points with the same model config."""
    from stabilitylab.proxy.vectorized import group_compatible, train_many, unsupported

    if train_fn is not None:
        raise ValueError("sweep(executor='vectorized') trains the built-in proxy only; drop train_fn or use "
                         "executor='local', 'processes' or 'ray'")
    for p in points:  # what train_many does not implement (other optimizers, schedules) runs one at a time
        if unsupported(p.config):
            yield from run_local([p], None, workers, address, run_progress)
    points = [p for p in points if not unsupported(p.config)]
    for idx in group_compatible([p.config for p in points]):
        group = [points[i] for i in idx]
        try:
            results = train_many([p.config for p in group], monitor_every=group[0].every, progress=run_progress,
                                 run_ids=[p.run_id for p in group])
        except Exception as e:  # noqa: BLE001 - a failing group is recorded, the sweep goes on
            for p in group:
                yield p, failed_row(p, f"{type(e).__name__}: {e}"), None
            continue
        for p, r in zip(group, results):
            hist = r.history.assign(run_id=p.run_id) if r.history is not None else None
            yield p, {**p.row(), **r.to_row()}, hist


EXECUTORS: dict[str, Callable[..., Iterator[Outcome]]] = {
    "local": run_local, "processes": run_processes, "ray": run_ray, "vectorized": run_vectorized,
}
