"""The Probe protocol: attach, arm for a logged step, record partials, collect, detach.

A probe observes training through hooks and never changes it. On a logged step it records *partials*
(see ``stabilitylab.metrics``) as device tensors; the Monitor collects them, reduces them once (across
micro-batches here, across ranks in the Monitor) and moves everything to the host in one transfer.

Subclasses implement ``_attach`` / ``_detach`` (register hooks with ``self._hook(handle)``), record with
``record`` / ``record_many`` while ``self.armed`` is True, and may implement ``on_host`` for
statistics that need the host-side history (e.g. loss-spike z-scores).

A probe never breaks training: ``self._hook`` guards every hook it keeps, and ``self.guard(fn)`` any
callable, so an exception inside the probe becomes one warning and a ``probe_error`` event instead of
reaching the user's forward or backward pass (``probes._guard``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from stabilitylab import metrics as M
from stabilitylab.metrics import Block, Event
from stabilitylab.probes._guard import FaultGuard

__all__ = ["Block", "Event", "Probe"]  # Block and Event live in the record contract (metrics); re-exported


def _as_tensor(x: Any) -> torch.Tensor:
    """``x`` as a 1-D tensor (a Python number becomes a 1-element CPU tensor)."""
    return x.detach().reshape(-1) if isinstance(x, torch.Tensor) else torch.tensor([float(x)])


class Probe(FaultGuard):
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
        self.record_many(metric, (module,), _as_tensor(num), weight)

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
        """After ``attach``: why this probe has nothing to observe in the model, or None (the Monitor then
        warns once with that sentence and detaches it, e.g. an attention probe on a model without attention)."""
        return None

    def loss_level(self) -> float | None:
        """The loss above which this probe flagged the last logged step, or None (under data parallelism
        the Monitor names the ranks whose local loss exceeds it)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attached={self.attached})"
