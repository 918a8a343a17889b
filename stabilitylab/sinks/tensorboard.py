"""TensorBoard sink: the same series as the W&B sink, through ``torch.utils.tensorboard.SummaryWriter``.

What lands in the event files (see ``stabilitylab.sinks._keys``):

- scalars ``<metric>/<module>`` (``<metric>/model`` for whole-model values such as ``loss/model``) and
  ``<metric>/max`` (or ``/min``, ``/mean``, as the metric declares) summary series over modules, at
  ``global_step`` = the training step and the record's wall time; written in float64 (new-style tensor
  scalars) when the writer supports it, so values read back exactly. TensorBoard's Scalars tab groups
  them into one section per metric.
- text ``stabilitylab/events``: one markdown table per step with health events and early warnings
  (kind, module, value, message)
- text ``stabilitylab/config`` and hparams: the Monitor's settings (every, probes, run_id, n_params and a
  sweep point's lr, size, variant, seed), so TensorBoard's HParams tab lines runs up by configuration

Pass ``writer=`` to log into a writer you already have: Lightning's ``trainer.logger.experiment``, Hugging
Face's ``TensorBoardCallback.tb_writer`` or your own ``SummaryWriter``; the sink then flushes it but never
closes it, and leaves hparams to whoever owns it (``hparams=True`` to write them anyway).
A write that fails never stops training: the Monitor warns once and retries it later (no duplicate points).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from stabilitylab._checks import int_at_least
from stabilitylab.metrics import Event
from stabilitylab.sinks._keys import series_key, series_row
from stabilitylab.sinks.base import Records, Sink

EVENTS_TAG = "stabilitylab/events"
CONFIG_TAG = "stabilitylab/config"
#: Scalars listed as metrics in the HParams tab.
HPARAM_METRICS = (series_key("loss", ""), "attn.max_logit/max", series_key("logits.lse_mean", ""),
                  series_key("grad.global_norm", ""))


def _hparam_value(v: Any) -> int | float | str | bool:
    """A value TensorBoard's hparams accept (bool, int, float, str); anything else as its str()."""
    if isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and callable(v.item):
        try:
            return _hparam_value(v.item())
        except (TypeError, ValueError):
            pass
    return str(v)


def _md_cell(v: Any) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


class TensorBoard(Sink):
    """Stability signals to TensorBoard event files.

    Args:
        logdir: directory of the event files of a writer this sink creates (default:
            ``runs/tensorboard/<run_id>``); view with ``tensorboard --logdir runs/tensorboard``.
        writer: an existing ``SummaryWriter`` (or any object with ``add_scalar`` and ``add_text``) to log
            into instead; mutually exclusive with ``logdir``.
        max_modules: write the per-module series of a metric only when it has at most this many modules
            (None: always, 0: never); its summary series is always written.
        hparams: write the run config as hparams (default: only into a writer this sink creates).
    """

    def __init__(self, logdir: str | os.PathLike | None = None, writer: Any = None,
                 max_modules: int | None = 128, hparams: bool | None = None):
        if logdir is not None and writer is not None:
            raise ValueError("TensorBoard(logdir=..., writer=...): pass one of them; a given writer already "
                             "has its log directory")
        if logdir is not None and (not isinstance(logdir, (str, os.PathLike)) or str(logdir) == ""):
            raise ValueError(f"TensorBoard(logdir={logdir!r}): pass a directory path (str or Path)")
        if writer is not None and not all(callable(getattr(writer, a, None)) for a in ("add_scalar", "add_text")):
            raise TypeError(f"TensorBoard(writer=...): expected a SummaryWriter (with add_scalar and add_text), "
                            f"got {type(writer).__name__}")
        if max_modules is not None and not int_at_least(max_modules, 0):
            raise ValueError(f"TensorBoard(max_modules={max_modules!r}): pass an int >= 0 or None (no limit)")
        if hparams is not None and not isinstance(hparams, bool):
            raise TypeError(f"TensorBoard(hparams={hparams!r}): pass True, False or None")
        self.logdir = logdir
        self.writer = writer
        self.max_modules = max_modules
        self.hparams = hparams
        self._writer: Any = None
        self._owned = False
        self._closed = False
        self._scalar_kwargs: dict[str, bool] = {}
        self._partial: tuple[Records, int] | None = None  # (records, tags written) of a write that failed

    def open(self, run_id: str, config: dict[str, Any]) -> None:
        """Create the writer (or take ``writer``) and record the Monitor's settings as text and hparams."""
        if self._writer is not None or self._closed:
            return
        writer = self.writer
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=os.fspath(self.logdir or os.path.join("runs", "tensorboard", run_id)))
            self._owned = True
        try:
            params = inspect.signature(writer.add_scalar).parameters
        except (TypeError, ValueError):
            params = {}
        self._scalar_kwargs = {"new_style": True, "double_precision": True} if "double_precision" in params else {}
        self._writer = writer
        config = dict(config)
        rows = "\n".join(f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in config.items())
        writer.add_text(CONFIG_TAG, f"| setting | value |\n|---|---|\n{rows}", global_step=0)
        if self.hparams or (self.hparams is None and self._owned):
            self._write_hparams(writer, config)

    def _write_hparams(self, writer: Any, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        file_writer = writer._get_file_writer() if hasattr(writer, "_get_file_writer") else writer.file_writer
        for summary in hparams({str(k): _hparam_value(v) for k, v in config.items()},
                               dict.fromkeys(HPARAM_METRICS, math.nan)):
            file_writer.add_summary(summary)

    def write(self, records: Records) -> None:
        """Write one logged step's series; after a failure, resume where the failed write stopped."""
        if self._closed:
            return
        if self._writer is None:
            self.open(records.run_id, {"run_id": records.run_id})
        items = list(series_row(records, self.max_modules).items())
        done = self._partial[1] if self._partial is not None and self._partial[0] is records else 0
        for i in range(done, len(items)):
            tag, value = items[i]
            try:
                self._writer.add_scalar(tag, value, global_step=records.step, walltime=records.wall_time,
                                        **self._scalar_kwargs)
            except Exception:
                self._partial = (records, i)
                raise
        self._partial = None

    def write_events(self, events: Sequence[Event]) -> None:
        """One markdown table of events per step under ``stabilitylab/events``."""
        if self._writer is None or self._closed or not events:
            return
        by_step: dict[int, list[Event]] = {}
        for e in events:
            by_step.setdefault(int(e.step), []).append(e)
        for step, evs in sorted(by_step.items()):
            rows = "\n".join(f"| {_md_cell(e.kind)} | {_md_cell(e.module or '-')} | {_md_cell(float(e.value))} | "
                             f"{_md_cell(e.message)} |" for e in evs)
            self._writer.add_text(EVENTS_TAG, f"| kind | module | value | message |\n|---|---|---|---|\n{rows}",
                                  global_step=step)

    def flush(self) -> None:
        if self._writer is not None and not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this sink created it. Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        writer.flush()
        if self._owned:
            writer.close()
