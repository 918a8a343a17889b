"""Output-logit probe: log Z drift of the LM head, over the positions the loss counts.

Metrics (``module`` ""):

- ``logits.lse_mean``  mean over counted positions of log Z = logsumexp(z) over the vocabulary
- ``logits.lse_std``   std over counted positions of log Z (unbiased, per forward; weighted by the number
                       of counted positions over micro-batches)
- ``logits.max``       max output logit over counted positions

The logits are read from the output of ``module`` (default: the model itself) on logged steps: a tensor,
the first tensor of a tuple (the proxy returns ``(logits, loss)``), an object with ``.logits`` (Hugging
Face) or a dict with ``"logits"``.

Which positions count (the first rule that applies, per forward of the model):

1. inside ``with stabilitylab.loss_mask(mask):``, the positions where ``mask`` (bool, shaped like the
   logits without the vocabulary dim, aligned with the logits) is True: the way for a plain loop that
   computes its own loss to say which logits it scores;
2. a ``labels`` argument of the model's forward (keyword or positional, as Hugging Face models take it)
   shaped like the logits' positions: positions whose label is not ``ignore_index`` (-100). Causal LMs
   shift: the logits at position t are scored against ``labels[t + 1]``, so position t counts when
   ``labels[t + 1] != ignore_index`` and the last position never counts. Masked LMs, encoder-decoder
   (seq2seq) models and classifiers score position t against ``labels[t]``. ``shift_labels=None`` (the
   default) shifts for Hugging Face causal LMs (class name ending in ``ForCausalLM`` or ``LMHeadModel``,
   not encoder-decoder); pass True or False for other models;
3. an ``attention_mask`` argument shaped like the logits' positions: positions where it is non-zero
   (padding excluded; no shift, as the positions are the tokens themselves);
4. otherwise every position (the behaviour for models that take neither).

A ``labels`` or ``attention_mask`` whose shape does not match the logits is ignored with one warning. A
forward with no counted position adds nothing; a logged step with none records NaN means and a -inf max.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab import shards
from stabilitylab.probes.base import Probe


def find_logits(output: Any) -> torch.Tensor | None:
    """The logits tensor in a model output, or None."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() >= 2 and output.is_floating_point() else None
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.dim() >= 2 and item.is_floating_point():
                return item
    return None


#: Masks of the enclosing ``loss_mask`` blocks, innermost last.
_LOSS_MASKS: list[torch.Tensor] = []


@contextmanager
def loss_mask(mask: torch.Tensor) -> Iterator[None]:
    """Count only the positions where ``mask`` is True in ``logits.*`` for forwards inside this block.

    For loops that compute the loss themselves::

        with stabilitylab.loss_mask(targets != pad_id):
            logits = model(x)              # the logits probe reads the mask here
        loss = masked_cross_entropy(logits, targets)

    Args:
        mask: bool (or 0/1 integer) tensor shaped like the logits without the vocabulary dim, aligned with
            the logits (for a causal LM scored against next tokens, the mask of the scored logits).
    """
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"loss_mask(mask=...): pass a bool tensor shaped like the logits' positions, "
                        f"got {type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
    _LOSS_MASKS.append(mask)
    try:
        yield
    finally:
        _LOSS_MASKS.pop()


def _is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a Hugging Face causal LM (its loss scores logits[t] against labels[t + 1])."""
    model = getattr(model, "_orig_mod", model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


class LogitsProbe(Probe):
    """log Z statistics of the output logits, over the positions the loss counts (module docstring).

    Args:
        module: dotted name of the submodule whose output holds the logits (default: the model).
        ignore_index: label value the loss ignores (PyTorch's and Hugging Face's -100).
        shift_labels: whether position t is scored against ``labels[t + 1]`` (causal LM) rather than
            ``labels[t]``; None decides from the model (Hugging Face causal LMs shift).
    """

    name = "logits"
    metrics = (M.LOGITS_LSE_MEAN, M.LOGITS_LSE_STD, M.LOGITS_MAX)

    def __init__(self, module: str | None = None, ignore_index: int = -100, shift_labels: bool | None = None):
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"LogitsProbe(ignore_index={ignore_index!r}): pass an int, e.g. -100")
        if shift_labels not in (None, True, False):
            raise TypeError(f"LogitsProbe(shift_labels={shift_labels!r}): pass None (decide from the model), "
                            "True or False")
        self.module_name = module
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self._inputs: dict[str, Any] = {}

    def _attach(self) -> None:
        target = self.model
        if self.module_name:
            try:
                target = self.model.get_submodule(self.module_name)
            except AttributeError:
                raise ValueError(f"LogitsProbe(module={self.module_name!r}): the model has no such submodule") from None
        try:
            params = list(inspect.signature(self.model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self._positional = {k: params.index(k) for k in ("labels", "attention_mask") if k in params}
        self._shift = _is_causal_lm(self.model) if self.shift_labels is None else self.shift_labels
        self._hook(self.model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True))
        self._hook(target.register_forward_hook(self._on_output))
        self._hook(self.model.register_forward_hook(self._forget_inputs))

    def _detach(self) -> None:
        self._inputs = {}

    def _keep_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.armed:
            return
        found = {k: kwargs[k] for k in ("labels", "attention_mask") if kwargs.get(k) is not None}
        for k, i in self._positional.items():
            if k not in found and i < len(args) and args[i] is not None:
                found[k] = args[i]
        self._inputs = found

    def _forget_inputs(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._inputs = {}

    def _on_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self.armed:
            return
        logits = find_logits(output)
        if logits is None:
            self.warn_once("nologits", "the model output holds no logits tensor; pass LogitsProbe(module='lm_head')")
            return
        self.observe(logits, self.counted(logits.to_local() if shards.is_dtensor(logits) else logits))

    def counted(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Bool mask of the positions of ``logits`` that count in this forward (module docstring), or None."""
        positions = tuple(logits.shape[:-1])
        if _LOSS_MASKS:
            mask = _LOSS_MASKS[-1]
            if tuple(mask.shape) == positions:
                return mask.to(device=logits.device, dtype=torch.bool)
            self.warn_once("maskshape", f"loss_mask(mask) has shape {tuple(mask.shape)}, the logits' positions "
                                        f"{positions}; counting every position. Pass a mask shaped {positions}")
            return None
        for key in ("labels", "attention_mask"):
            value = self._inputs.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            if tuple(value.shape) != positions:
                self.warn_once(f"{key}shape", f"{key} has shape {tuple(value.shape)}, the logits' positions "
                                              f"{positions}; ignoring it for logits.*")
                continue
            value = value.to(logits.device)
            if key == "attention_mask":
                return value != 0
            valid = value != self.ignore_index
            if not self._shift:
                return valid
            return torch.cat([valid[..., 1:], torch.zeros_like(valid[..., :1])], dim=-1)
        return None

    def observe(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Record log Z statistics of ``logits`` (``(..., vocab)``) over the positions where ``mask`` is True.

        Args:
            logits: output logits.
            mask: optional bool tensor shaped ``logits.shape[:-1]``; None counts every position.
        """
        if shards.is_dtensor(logits):
            mean, std, mx = _dtensor_lse_stats(logits, mask)
            logits = logits.to_local()
        else:
            mean, std, mx = F.lse_stats(logits, mask=mask)
        if mask is None:
            n = logits[..., 0].numel()
            self.record(M.LOGITS_LSE_MEAN, "", mean * n, float(n))
            self.record(M.LOGITS_LSE_STD, "", std * n, float(n))
        else:
            n = mask.sum().to(mean.dtype)
            zero = torch.zeros_like(mean)  # a forward with no counted position adds nothing
            self.record(M.LOGITS_LSE_MEAN, "", torch.where(n > 0, mean * n, zero), n)
            self.record(M.LOGITS_LSE_STD, "", torch.where(n > 0, std * n, zero), n)
        self.record(M.LOGITS_MAX, "", mx, 1.0)


def _dtensor_lse_stats(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``functional.lse_stats`` of a DTensor's local positions; a vocabulary-parallel output (sharded on the
    last dim, torchtitan's loss-parallel head) gets each position's log Z from a log-sum-exp over the
    ranks of the local ones: ``log Z = logsumexp_r(logsumexp_{v in shard r} z_v)`` (one ``all_gather`` of a
    value per position on each mesh dimension that shards the vocabulary). The max is the local one;
    the Monitor's max reduction over ranks makes it global.

    Args:
        logits: DTensor ``(..., vocab)``; mask: optional bool, shaped like its local positions.
    """
    last = logits.ndim - 1
    vocab_dims = [i for i, pl in enumerate(logits.placements) if pl.is_shard() and pl.dim in (-1, last)]
    mesh = logits.device_mesh
    z = shards.local(logits)[0].detach()
    if not vocab_dims:
        return F.lse_stats(z, mask=mask)
    z = z.reshape(-1, z.shape[-1])
    z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    lse, row_max = torch.logsumexp(z, dim=-1), z.amax(dim=-1)
    for i in vocab_dims:
        group = mesh.get_group(i)
        parts = [torch.empty_like(lse) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, lse.contiguous(), group=group)
        lse = torch.logsumexp(torch.stack(parts), dim=0)
    if mask is None:
        keep = torch.ones_like(lse, dtype=torch.bool)
    else:
        if mask.numel() != lse.numel():
            raise ValueError(f"lse_stats(mask=...): mask has {mask.numel()} positions, the logits {lse.numel()}; "
                             "pass a bool mask shaped like the local logits' positions")
        keep = mask.detach().reshape(-1).to(device=lse.device, dtype=torch.bool)
    n = keep.sum().to(lse.dtype)
    mean = torch.where(keep, lse, 0).sum() / n
    var = torch.where(keep, lse - mean, 0).pow(2).sum() / (n - 1).clamp(min=1)
    return mean, var.sqrt(), torch.where(keep, row_max, float("-inf")).amax()
