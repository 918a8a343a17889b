"""Monitor: runs probes on a schedule, reduces their partials once, one host transfer per logged step.

    mon = Monitor(model, optimizer=opt, every=10)
    for batch in loader:
        loss = model(batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        mon.step(loss)          # non-logged steps: a counter increment, no host sync
    mon.close()
    df = mon.history()          # tidy DataFrame: run_id, step, metric, module, value, wall_time

Step ``s`` (counted from ``start_step``) is logged when ``s % every == 0`` (``metrics.is_logged``). Probes
are armed *before* a logged step's forward/backward (at construction for the first one, then by the
previous ``step()`` call), so hooks only compute on logged steps. Argument checks, wrapper unwrapping and
the ``torch.compile`` stance live in ``_runtime``; everything multi-rank lives in ``distributed``.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from stabilitylab import _runtime as R
from stabilitylab import distributed as D
from stabilitylab import metrics as M
from stabilitylab.metrics import Event
from stabilitylab.probes import attach_probes
from stabilitylab.probes.base import Probe
from stabilitylab.sinks.base import GuardedSink, Records, Sink
from stabilitylab.sinks.memory import Memory


class Monitor:
    """Attach stability probes to a model (and optimizer) and log their signals.

    Args:
        model: the ``nn.Module`` being trained (DDP and ``torch.compile`` wrappers are unwrapped; FSDP2,
            tensor-parallel and 2-D FSDP2 x TP models are supported; a ``Partial`` parameter is refused
            with ``distributed.UnsupportedParallelismError``).
        optimizer: its optimizer (any wrapper around a ``torch.optim.Optimizer``); needed for gradient,
            update and Adam metrics.
        every: log every ``every``-th step (``>= 1``).
        probes: ``"default"`` or a list of probe names / Probe objects.
        sinks: where records go (``sinks.Parquet``, ``sinks.WandB``, ``sinks.Console``, ...).
        run_id: name of this run in the records (default: a random id).
        keep_history: keep every record in memory for ``history()`` (an int keeps the last N logged
            steps; False keeps none and ``history()`` reads the Parquet sink instead).
        start_step: number of the first step (for resumed runs).
        config: extra settings stored with the run (sinks such as W&B record them).
        on_event: callback ``fn(event)`` for health events and early warnings.
        rank_zero_only: in a multi-rank run only rank 0 writes to ``sinks`` (every rank still computes the
            same values); False makes every rank write, as run ``<run_id>-rank<r>``.
        eager_logged_steps: run ``torch.compile``d code eagerly on logged steps (``set_stance
            ("force_eager")`` while probes are armed, also for a model compiled after the Monitor was
            attached), so every hook fires and compiled and eager models record the same values;
            non-logged steps run the compiled graph unchanged. False if you manage ``set_stance`` yourself.
        max_events: keep at most this many events in ``Monitor.events`` (oldest dropped first, counted in
            ``events_dropped``; ``close()`` then emits one ``events_dropped`` event); sinks get every event.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any = None,
        every: int = 10,
        probes: str | Sequence[str | Probe] = "default",
        sinks: Sequence[Sink] | None = None,
        run_id: str | None = None,
        keep_history: bool | int = True,
        start_step: int = 0,
        config: dict[str, Any] | None = None,
        on_event: Callable[[Event], None] | None = None,
        rank_zero_only: bool = True,
        eager_logged_steps: bool = True,
        max_events: int = 10_000,
    ):
        sinks = R.check_monitor_args(model=model, every=every, sinks=sinks, keep_history=keep_history,
                                     run_id=run_id, start_step=start_step, config=config, on_event=on_event,
                                     rank_zero_only=rank_zero_only, eager_logged_steps=eager_logged_steps,
                                     max_events=max_events)
        self.model = model = R.unwrap(model)
        # One process: a random run id, no reducer. Several ranks: rank 0's id, a cross-rank Reducer.
        self.run_id, self._reducer, writes = D.setup(model, run_id, rank_zero_only)
        self.optimizer = optimizer
        self.every = every
        self.step_count = start_step
        self.config = dict(config or {})
        self.on_event = on_event
        self._events: deque[Event] = deque(maxlen=max_events)
        self.events_dropped = 0
        self._memory: Memory | None = None
        if keep_history:
            self._memory = Memory(None if keep_history is True else int(keep_history), max_events=max_events)
        self.sinks: list[Sink] = list(sinks)
        self.rank_zero_only = rank_zero_only
        targets = ([self._memory] if self._memory else []) + (self.sinks if writes else [])
        self._guards = [GuardedSink(s) for s in targets]  # a failing sink never stops training
        self.eager_logged_steps = eager_logged_steps
        if eager_logged_steps:
            weakref.finalize(self, R.EAGER.release, id(self))  # an abandoned Monitor restores the stance
        self.probes = attach_probes(probes, model, optimizer, self.run_id)  # all attached, or none
        self._closed = False
        settings = {"every": every, "probes": [p.name for p in self.probes], "run_id": self.run_id,
                    "n_params": sum(p.numel() for p in model.parameters()), **self.config}
        for g in self._guards:
            g._call(g.sink.open, self.run_id, settings)
        self.arm(self._logged(self.step_count))

    # ------------------------------------------------------------------ schedule
    def _logged(self, step: int) -> bool:
        return M.is_logged(step, self.every)

    @property
    def logging_now(self) -> bool:
        """True when the step in progress will be logged (probes are armed)."""
        return self._logged(self.step_count)

    def arm(self, armed: bool) -> None:
        """Arm (or disarm) every probe by hand. ``step()`` does this on its own; integrations call it
        to keep probes off during evaluation forwards that fall between a logged step's micro-batches."""
        for p in self.probes:
            p.guard(p.arm)(armed)
        if self.eager_logged_steps:
            R.force_eager(self, armed)

    def set_step(self, step: int) -> bool:
        """Declare that the step in progress is number ``step`` and arm the probes if it is logged.

        For loops whose framework owns the step counter (the HF Trainer and Lightning callbacks call it
        before each optimizer step's first micro-batch); the next ``step()`` then moves on to ``step + 1``.

        Args:
            step: the number of the step in progress, counted like ``start_step`` (an int >= 0).

        Returns:
            True when step ``step`` is logged (the probes are armed for it).
        """
        R.check_set_step(self._closed, step)
        self.step_count = step
        logged = self._logged(step)
        self.arm(logged)
        return logged

    def probe(self, name: str) -> Probe:
        """The attached probe called ``name`` (e.g. ``"attention"``)."""
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(f"Monitor.probe({name!r}): no such probe attached; attached: {[p.name for p in self.probes]}")

    # ------------------------------------------------------------------ stepping
    def step(self, loss: torch.Tensor | float | None = None) -> dict[tuple[str, str], float] | None:
        """End of a training step. On logged steps collect, reduce, transfer once, write sinks.

        Returns the logged values ``{(metric, module): value}`` on logged steps, else None.
        """
        if self._closed:
            raise RuntimeError("Monitor.step: the monitor is closed")
        step = self.step_count
        out = None
        if self._logged(step):
            out = self._log_step(step, loss)
        self.step_count += 1
        self.arm(self._logged(self.step_count))
        return out

    def _log_step(self, step: int, loss) -> dict[tuple[str, str], float]:
        blocks = [b for p in self.probes for b in (p.guard(p.collect)() or [])]
        if loss is not None:
            blocks.append(R.loss_block(loss))  # last: the loss is the last row
        keys = [(b.metric, m) for b in blocks for m in b.modules]
        codes = np.array([M.REDUCE_CODE[M.spec(metric).reduce] for metric, _ in keys], np.int64)
        values, per_rank = np.zeros(0), np.zeros((2, 0))
        if blocks or self._reducer is not None:  # every rank joins the round, even with nothing recorded
            num, w = R.stack(blocks, self.model)  # every partial in two (N,) tensors on one device
            # Combine over ranks (the identity in one process): rows no rank recorded get weight -1, and
            # (2, world) columns of each rank's local non-finite count and loss come along for the events.
            loss_t = num[-1] if loss is not None else None
            codes, keys, both, failed = D.reduce_step(self._reducer, self.probes, codes, num, w, keys, loss_t,
                                                      step, self.run_id)
            if failed is not None:
                self.emit([failed])
            both = R.to_host(both)  # the one device -> host transfer
            n = len(keys)
            values, per_rank = M.finalise(codes, both[0, :n], both[1, :n]), both[:, n:]
            kept = both[1, :n] >= 0
            keys, values = [k for k, ok in zip(keys, kept) if ok], values[kept]
        # Same (metric, module) from several blocks: keep the last (probes own distinct keys).
        vals = dict(zip(keys, values.tolist()))
        events: list[Event] = []
        for p in self.probes:
            extra, ev = p.guard(p.on_host)(step, vals) or ([], [])
            vals.update({(metric, module): float(v) for metric, module, v in extra})
            events.extend(ev)
        events.extend(D.fault_events(self._reducer, self.probes, self.run_id, step))
        rec = Records(self.run_id, step, time.time(), [k[0] for k in vals], [k[1] for k in vals],
                      np.fromiter(vals.values(), dtype=np.float64, count=len(vals)))
        for g in self._guards:
            g.write(rec)
        D.blame_ranks(events, per_rank, self.probes)  # multi-rank: name the ranks where each problem began
        if events:
            self.emit(events)
        return vals

    @property
    def events(self) -> list[Event]:
        """The most recent events, oldest first (at most ``max_events``; see ``events_dropped``)."""
        return list(self._events)

    def emit(self, events: Sequence[Event]) -> None:
        """Send events (health, early warnings) to the sinks and the ``on_event`` callback."""
        self.events_dropped += max(0, len(self._events) + len(events) - self._events.maxlen)
        self._events.extend(events)
        for g in self._guards:
            g.write_events(events)
        if self.on_event is not None:
            for e in events:
                self.on_event(e)

    # ------------------------------------------------------------------ results
    def history(self) -> pd.DataFrame:
        """All logged records as a tidy DataFrame (run_id, step, metric, module, value, wall_time)."""
        if self._memory is not None:
            return self._memory.to_frame()
        return R.parquet_history(self.sinks, self.run_id)  # keep_history=False: read this run back

    def flush(self) -> None:
        """Push every sink's buffered records to storage."""
        for g in self._guards:
            g.flush()

    def close(self) -> None:
        """Detach probes and flush/close every sink. Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        if self._reducer is not None:  # answer the ranks still logging, so none waits for this one
            self._reducer.close(self.step_count, R.param_device(self.model), torch.float64)
        if self.eager_logged_steps:
            R.force_eager(self, False)
        for p in self.probes:
            p.detach()
        if self.events_dropped:
            self.emit([R.events_dropped_event(self)])
        for g in self._guards:
            g.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor(run_id={self.run_id!r}, every={self.every}, step={self.step_count}, "
                f"probes={[p.name for p in self.probes]}, sinks={[type(s).__name__ for s in self.sinks]})")
