"""Monitor: runs probes on a schedule, reduces their partials once, one host transfer per logged step.

    mon = Monitor(model, optimizer=opt, every=10)
    for batch in loader:
        loss = model(batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        mon.step(loss)          # non-logged steps: a counter increment, no host sync
    mon.close()
    df = mon.history()          # tidy DataFrame: run_id, step, metric, module, value, wall_time

Step ``s`` (counted from ``start_step``) is logged when ``s % every == 0`` (``metrics.is_logged``). Probes are armed *before*
a logged step's forward/backward (at construction for the first one, then by the previous ``step()``
call), so hooks only compute on logged steps.
"""

from __future__ import annotations

import time
import uuid
import warnings
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
from stabilitylab._checks import int_at_least
from stabilitylab.metrics import Block, Event
from stabilitylab.probes import build_probes
from stabilitylab.probes.base import Probe
from stabilitylab.sinks.base import GuardedSink, Records, Sink
from stabilitylab.sinks.memory import Memory
from stabilitylab.sinks.parquet import Parquet, read_history


class Monitor:
    """Attach stability probes to a model (and optimizer) and log their signals.

    Args:
        model: the ``nn.Module`` being trained (DDP/compiled wrappers are fine; a DDP wrapper is unwrapped
            so module names carry no ``module.`` prefix; FSDP2 ``fully_shard``, tensor parallel
            ``parallelize_module`` and 2-D FSDP2 x TP models are supported, a parameter with a ``Partial``
            placement is refused with ``distributed.UnsupportedParallelismError``).
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
        rank_zero_only: in a multi-rank run (DDP, FSDP2) only rank 0 writes to ``sinks`` (every rank
            still computes the same reduced values and keeps ``history()``). False makes every rank write,
            with run id ``<run_id>-rank<r>`` so per-rank files never collide (for debugging).
        eager_logged_steps: run ``torch.compile``d code eagerly on logged steps
            (``torch.compiler.set_stance("force_eager")`` while probes are armed, the previous stance
            restored after). Non-logged steps run the compiled graph unchanged (no graph breaks, no
            recompilation: the graph was traced with the probes disarmed), and logged steps see every hook
            and every attention call, so compiled and eager models record the same values. This also
            covers a model compiled after the Monitor was attached. Set False if you manage
            ``set_stance`` yourself.
        max_events: keep at most this many events in ``Monitor.events`` (and the in-memory history),
            oldest dropped first; ``events_dropped`` counts the dropped ones and ``close()`` emits one
            ``events_dropped`` event. Sinks still receive every event.
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
        model = R.unwrap(model)
        D.check_supported(model)
        rank, world = D.rank_and_world()
        if world > 1:
            run_id = D.broadcast_run_id(run_id)
            if not rank_zero_only:
                run_id = f"{run_id}-rank{rank}"
        self._reducer = D.Reducer() if world > 1 else None
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.run_id = run_id or uuid.uuid4().hex[:8]
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
        writes = not (rank_zero_only and rank != 0)
        targets = ([self._memory] if self._memory else []) + (self.sinks if writes else [])
        self._guards = [GuardedSink(s) for s in targets]
        self.eager_logged_steps = eager_logged_steps
        if eager_logged_steps:
            weakref.finalize(self, R.EAGER.release, id(self))  # an abandoned Monitor restores the stance
        self.probes = self._build(probes)
        self._closed = False
        self._t0 = time.time()
        settings = {"every": every, "probes": [p.name for p in self.probes], "run_id": self.run_id,
                    "n_params": sum(p.numel() for p in model.parameters()), **self.config}
        for g in self._guards:
            g._call(g.sink.open, self.run_id, settings)
        self.arm(self._logged(self.step_count))

    # ------------------------------------------------------------------ construction
    def _build(self, spec) -> list[Probe]:
        attached = []
        for p in build_probes(spec, self.optimizer is not None):
            p.run_id = self.run_id
            try:
                p.attach(self.model, self.optimizer)
            except Exception:
                for q in attached:  # a failed Monitor leaves no hooks behind
                    q.detach()
                raise
            why = p.unused()
            if why:
                warnings.warn(f"stabilitylab: {why}", stacklevel=3)
                p.detach()
                continue
            attached.append(p)
        return attached

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
            self._force_eager(armed)

    def set_step(self, step: int) -> bool:
        """Declare that the step in progress is number ``step`` and arm the probes if it is logged.

        For loops whose framework owns the step counter (the HF Trainer and Lightning callbacks call it
        before each optimizer step's first micro-batch); the next ``step()`` logs step ``step`` when it is
        logged and moves on to ``step + 1``.

        Args:
            step: the number of the step in progress, counted like ``start_step`` (an int >= 0).

        Returns:
            True when step ``step`` is logged (the probes are armed for it).
        """
        if self._closed:
            raise RuntimeError("Monitor.set_step: the monitor is closed")
        if not int_at_least(step, 0):
            raise ValueError(f"Monitor.set_step(step={step!r}): must be an int >= 0 (the number of the step "
                             "in progress)")
        self.step_count = step
        logged = self._logged(step)
        self.arm(logged)
        return logged

    def _force_eager(self, on: bool) -> None:
        """Make compiled code run eagerly while probes are armed (see ``eager_logged_steps``)."""
        try:
            R.EAGER.hold(self) if on else R.EAGER.release(id(self))
        except RuntimeError as e:  # Monitor.step called inside a compiled region
            self.eager_logged_steps = False
            warnings.warn(f"stabilitylab: cannot switch torch.compile to eager on logged steps ({e}); call "
                          "Monitor.step outside compiled code, or pass eager_logged_steps=False", stacklevel=3)

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

    def _gather(self, loss) -> list[Block]:
        blocks: list[Block] = []
        for p in self.probes:
            blocks.extend(p.guard(p.collect)() or [])
        if loss is not None:
            if isinstance(loss, torch.Tensor):
                t = loss.detach().reshape(-1)[:1]
                t = t if t.dtype == torch.float64 else t.float()
            else:
                t = torch.tensor([float(loss)], dtype=torch.float64)  # a Python float keeps its digits
            blocks.append(Block(M.LOSS, ("",), t, torch.ones_like(t)))
        return blocks

    def _log_step(self, step: int, loss) -> dict[tuple[str, str], float]:
        blocks = self._gather(loss)
        metrics_col: list[str] = []
        modules_col: list[str] = []
        if blocks or self._reducer is not None:  # every rank joins the round, even with nothing recorded
            # Device of the first block not on the CPU (CPU scalars such as the LR move to it, not back).
            device = next((b.num.device for b in blocks if b.num.device.type != "cpu"),
                          blocks[0].num.device if blocks else R.param_device(self.model))
            dtype = torch.float32 if device.type == "mps" else torch.float64
            num = torch.cat([b.num.to(device=device, dtype=dtype, non_blocking=True) for b in blocks]
                            or [torch.zeros(0, device=device, dtype=dtype)])
            w = torch.cat([b.weight.to(device=device, dtype=dtype, non_blocking=True) for b in blocks]
                          or [torch.zeros(0, device=device, dtype=dtype)])
            codes = []
            for b in blocks:
                metrics_col.extend([b.metric] * len(b.modules))
                modules_col.extend(b.modules)
                codes.extend([M.REDUCE_CODE[M.spec(b.metric).reduce]] * len(b.modules))
            reduce = np.asarray(codes, dtype=np.int64)
            loss_t = blocks[-1].num[0].to(device, non_blocking=True) if loss is not None else None
            reduce, num, w, keys, ranks_t, failed = D.reduce_step(
                self._reducer, self.probes, reduce, num, w, list(zip(metrics_col, modules_col)), loss_t, step,
                self.run_id)
            if failed is not None:
                self.emit([failed])
            metrics_col, modules_col = [k[0] for k in keys], [k[1] for k in keys]
            both = torch.stack([num, w])
            if ranks_t is not None:  # (2, world): each rank's local non-finite count and loss, for events
                both = torch.cat([both, ranks_t], dim=1)
            both = R.to_host(both)  # the one device -> host transfer
            n = len(metrics_col)
            values = M.finalise(reduce, both[0, :n], both[1, :n])
            per_rank = both[:, n:]
            kept = both[1, :n] >= 0  # rows that no rank recorded this step (weight -1) are not records
            if not kept.all():
                values = values[kept]
                metrics_col = [m for m, k in zip(metrics_col, kept) if k]
                modules_col = [m for m, k in zip(modules_col, kept) if k]
        else:
            values, per_rank = np.zeros(0), np.zeros((2, 0))
        # Same (metric, module) from several blocks: keep the last (probes own distinct keys).
        vals = dict(zip(zip(metrics_col, modules_col), values.tolist()))
        events: list[Event] = []
        for p in self.probes:
            extra, ev = p.guard(p.on_host)(step, vals) or ([], [])
            for metric, module, v in extra:
                vals[(metric, module)] = float(v)
            events.extend(ev)
        events.extend(D.fault_events(self._reducer, self.probes, self.run_id, step))
        rec = Records(self.run_id, step, time.time(), [k[0] for k in vals], [k[1] for k in vals],
                      np.fromiter(vals.values(), dtype=np.float64, count=len(vals)))
        for g in self._guards:
            g.write(rec)
        if events and per_rank.shape[1]:
            level = next((lv for p in self.probes if (lv := p.loss_level()) is not None), None)
            D.name_ranks(events, per_rank[0], per_rank[1], level)
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
        for s in self.sinks:
            if isinstance(s, Parquet):
                s.flush()
                df = read_history(s.path)
                return df[df["run_id"] == self.run_id].reset_index(drop=True)
        raise RuntimeError("Monitor.history(): keep_history=False and no Parquet sink; nothing to read")

    def flush(self) -> None:
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
            self._force_eager(False)
        for p in self.probes:
            p.detach()
        if self.events_dropped:
            dropped = self.events_dropped
            self.emit([Event(self.run_id, self.step_count, "events_dropped", "", float(dropped),
                             f"{dropped} events were dropped from Monitor.events (max_events="
                             f"{self._events.maxlen}); the sinks received all of them")])
        for g in self._guards:
            g.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor(run_id={self.run_id!r}, every={self.every}, step={self.step_count}, "
                f"probes={[p.name for p in self.probes]}, sinks={[type(s).__name__ for s in self.sinks]})")
