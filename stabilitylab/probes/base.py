"""The Probe protocol: attach, arm for a logged step, record partials, collect, detach.

A probe observes training through hooks and never changes it. On a logged step it records *partials*
(see ``stabilitylab.metrics``) as device tensors; the Monitor collects them, reduces them once (across
micro-batches here, across ranks in the Monitor) and moves everything to the host in one transfer.

Subclasses implement ``_attach`` / ``_detach`` (register hooks with ``self._hook(handle)``), record with
``record`` / ``record_many`` while ``self.armed`` is True, and may implement ``on_host`` for
statistics that need the host-side history (e.g. loss-spike z-scores).

A probe never breaks training: every hook registered through ``self._hook`` (and any callable wrapped
with ``self.guard``) turns an exception raised inside the probe into one warning and a ``probe_error``
event (``self.faults``, emitted by the Monitor on the next logged step) instead of propagating into the
user's forward or backward pass.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from stabilitylab import metrics as M
from stabilitylab.metrics import Block, Event

__all__ = ["Block", "Event", "Probe"]  # Block and Event live in the record contract (metrics); re-exported


def _as_tensor(x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1)
    device = like.device if like is not None else "cpu"
    return torch.tensor([float(x)], device=device)


class Probe:
    """Base class of every probe. Attach and detach are idempotent.

    Attributes:
        name: registry name used in ``Monitor(probes=[...])``.
        metrics: metric names this probe can record.
    """

    name: ClassVar[str] = "probe"
    metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.armed = False
        self.run_id = ""
        self._handles: list[Any] = []
        self._blocks: dict[tuple[str, tuple[str, ...]], Block] = {}
        self._warned: set[str] = set()
        self.faults: list[Event] = []

    # ----------------------------------------------------------------- lifecycle
    @property
    def attached(self) -> bool:
        return self.model is not None

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Probe:
        """Register hooks on ``model`` / ``optimizer``. Attaching twice is a no-op."""
        if self.attached:
            return self
        self.model = model
        self.optimizer = optimizer
        try:
            self._attach()
        except Exception:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook. Detaching twice (or before attaching) is a no-op."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.model is not None:
            self._detach()
        self.model = None
        self.optimizer = None
        self.armed = False
        self._blocks.clear()

    def arm(self, armed: bool) -> None:
        """Called by the Monitor before each step: True when the coming step is logged."""
        self.armed = armed

    def _attach(self) -> None:  # pragma: no cover - overridden
        pass

    def _detach(self) -> None:
        pass

    def _hook(self, handle: Any) -> None:
        """Keep ``handle`` for ``detach`` and guard the hook it registered (torch ``RemovableHandle``)."""
        hooks = handle.hooks_dict_ref() if hasattr(handle, "hooks_dict_ref") else None
        if hooks is not None and handle.id in hooks:
            hooks[handle.id] = self.guard(hooks[handle.id])
        self._handles.append(handle)

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped so that an exception inside it becomes ``self.fault(exc)`` and returns None."""
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a probe must never break training
                self.fault(e)
                return None
        return guarded

    def fault(self, exc: BaseException) -> None:
        """Record an exception raised inside this probe: one warning, one ``probe_error`` event."""
        self.warn_once("fault", f"{type(exc).__name__}: {exc} (training continues; recorded as a "
                                "'probe_error' event, further errors are recorded silently)")
        if len(self.faults) < 100:  # drained every logged step; bounded if the hooks fail in between
            self.faults.append(Event(self.run_id, -1, "probe_error", self.name,
                                     message=f"{type(exc).__name__}: {exc}"))

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"stabilitylab {self.name} probe: {message}", stacklevel=3)

    # ----------------------------------------------------------------- recording
    def record_many(self, metric: str, modules: tuple[str, ...] | list[str], num: torch.Tensor,
                    weight: torch.Tensor | float = 1.0) -> None:
        """Record partials for several modules at once; combines with earlier micro-batches.

        ``num`` is the value for ``max``/``min``/``sum`` metrics, the weighted sum for ``mean`` and the
        sum of squares for ``rms``; ``weight`` the number of items behind it (tokens, elements).
        """
        spec = M.spec(metric)
        modules = tuple(modules)
        num = num.detach().reshape(-1)
        if isinstance(weight, torch.Tensor):
            weight = weight.detach().reshape(-1).to(num.dtype).expand_as(num)
        else:
            weight = torch.full_like(num, float(weight))
        key = (metric, modules)
        old = self._blocks.get(key)
        if old is None:
            self._blocks[key] = Block(metric, modules, num, weight)
            return
        self._blocks[key] = Block(metric, modules, M.combine(spec.reduce, old.num, num), old.weight + weight)

    def record(self, metric: str, module: str, num: Any, weight: Any = 1.0) -> None:
        """Record one partial (see ``record_many``)."""
        t = _as_tensor(num)
        w = _as_tensor(weight, t).to(t.dtype) if isinstance(weight, torch.Tensor) else float(weight)
        self.record_many(metric, (module,), t, w)

    def record_value(self, metric: str, module: str, value: Any) -> None:
        """Record a finished value with weight 1 (squared for ``rms`` metrics so it round-trips)."""
        t = _as_tensor(value)
        if M.spec(metric).reduce == "rms":
            t = t * t
        self.record_many(metric, (module,), t, 1.0)

    def collect(self) -> list[Block]:
        """Hand over this step's partials (device tensors, no host sync) and reset."""
        self._before_collect()
        blocks = list(self._blocks.values())
        self._blocks.clear()
        return blocks

    def _before_collect(self) -> None:
        pass

    def on_host(self, step: int, values: dict[tuple[str, str], float]) -> tuple[
            list[tuple[str, str, float]], list[Event]]:
        """Host-side statistics from this step's finished values: (extra records, events)."""
        return [], []

    def unused(self) -> str | None:
        """After ``attach``: why this probe has nothing to observe in the model, or None.

        The Monitor warns once with the returned sentence and detaches the probe (e.g. an optional
        attention probe on a model without attention it can find).
        """
        return None

    def loss_level(self) -> float | None:
        """The loss above which this probe flagged the last logged step (None: it flags no loss level).

        Under data parallelism the Monitor names the ranks whose local loss exceeds it in the event.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attached={self.attached})"
