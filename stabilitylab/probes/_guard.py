"""How a probe never breaks training: guarded hooks, and each fault becomes one warning plus an event.

``Probe`` inherits this; every hook registered through ``Probe._hook`` (and any callable wrapped with
``guard``) turns an exception raised inside the probe into one warning and a ``probe_error`` event
(``self.faults``, emitted by the Monitor on the next logged step) instead of propagating into the user's
forward or backward pass.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from stabilitylab.metrics import Event


class FaultGuard:
    """Mixin of ``Probe``: ``_hook``, ``guard``, ``fault`` and ``warn_once``.

    Uses the probe's ``name``, ``run_id``, ``faults`` (list of Events), ``_warned`` (set) and
    ``_handles`` (list), which ``Probe.__init__`` creates.
    """

    name: str
    run_id: str
    faults: list[Event]
    _warned: set[str]
    _handles: list[Any]

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
        """Warn ``message`` the first time ``key`` is seen by this probe (not once per step)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"stabilitylab {self.name} probe: {message}", stacklevel=3)
