"""Monitor plumbing a reader of ``monitor.py`` does not need: its argument checks, the ``torch.compile``
stance on logged steps, wrapper unwrapping, the device of a model, and the one device -> host transfer of
a logged step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stabilitylab._checks import int_at_least
from stabilitylab.metrics import check_every
from stabilitylab.sinks.base import Sink


def check_monitor_args(*, model: Any, every: Any, sinks: Any, keep_history: Any, run_id: Any, start_step: Any,
                       config: Any, on_event: Any, rank_zero_only: Any, eager_logged_steps: Any,
                       max_events: Any) -> list[Sink]:
    """Validate ``Monitor(...)``'s arguments (one sentence naming the argument and the fix); returns the
    sinks as a list."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Monitor(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    check_every(every, "Monitor(every")
    if not int_at_least(start_step, 0):
        raise ValueError(f"Monitor(start_step={start_step!r}): must be an int >= 0")
    if sinks is None:
        sinks = []
    if isinstance(sinks, Sink):
        sinks = [sinks]
    if not isinstance(sinks, (list, tuple)):
        raise TypeError(f"Monitor(sinks={sinks!r}): pass a list of stabilitylab sinks (sinks.Parquet, "
                        "sinks.WandB, sinks.Console, sinks.Memory)")
    for s in sinks:
        if not isinstance(s, Sink):
            raise TypeError(f"Monitor(sinks=...): {s!r} is not a stabilitylab sink (sinks.Parquet, "
                            "sinks.WandB, sinks.Console, sinks.Memory)")
    if not (isinstance(keep_history, bool) or (isinstance(keep_history, int) and keep_history > 0)):
        raise ValueError(f"Monitor(keep_history={keep_history!r}): pass True, False or a positive int")
    if run_id is not None and not (isinstance(run_id, str) and run_id):
        raise TypeError(f"Monitor(run_id={run_id!r}): pass a non-empty str or None (a random id)")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"Monitor(config={config!r}): pass a dict of settings or None")
    if on_event is not None and not callable(on_event):
        raise TypeError(f"Monitor(on_event={on_event!r}): pass a callable fn(event) or None")
    if not isinstance(rank_zero_only, bool):
        raise TypeError(f"Monitor(rank_zero_only={rank_zero_only!r}): pass True or False")
    if not isinstance(eager_logged_steps, bool):
        raise TypeError(f"Monitor(eager_logged_steps={eager_logged_steps!r}): pass True or False")
    if not int_at_least(max_events, 1):
        raise ValueError(f"Monitor(max_events={max_events!r}): must be an int >= 1 (events kept in memory)")
    return list(sinks)


def param_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def to_host(t: torch.Tensor) -> np.ndarray:
    """The one device -> host transfer of a logged step, as numpy.

    It is the one deliberate sync of a logged step, so it is exempt from
    ``torch.cuda.set_sync_debug_mode``: under ``"error"`` any *other* sync still raises.
    """
    if t.device.type != "cuda":
        return t.cpu().numpy()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        return t.cpu().numpy()
    finally:
        torch.cuda.set_sync_debug_mode(mode)


class EagerStance:
    """Reference-counted ``force_eager`` compile stance shared by all armed Monitors.

    The stance is global, so it is switched on when the first Monitor arms and the previous stance is
    restored when the last one disarms, closes or is garbage-collected (an abandoned Monitor never leaves
    compiled code running eagerly).
    """

    def __init__(self) -> None:
        self.holders: set[int] = set()
        self.saved = None

    def hold(self, monitor: object) -> None:
        from torch._dynamo import eval_frame

        key = id(monitor)
        if key in self.holders:
            return
        if not self.holders:
            self.saved = eval_frame._set_stance(eval_frame.DynamoStance("force_eager"))
        self.holders.add(key)

    def release(self, key: int) -> None:
        if key not in self.holders:
            return
        self.holders.discard(key)
        if not self.holders and self.saved is not None:
            from torch._dynamo import eval_frame

            eval_frame._set_stance(self.saved)
            self.saved = None


EAGER = EagerStance()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module the user's code runs, without DDP / ``torch.compile`` wrappers (their names add prefixes)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
