"""Gradient, parameter and update norms, and Adam eps dominance, from optimizer step hooks.

Metrics (``module`` is the parameter's name, "" for whole-model values):

- ``grad.rms``            sqrt(mean(g^2)) per tensor, **before** gradient clipping
- ``grad.global_norm``    sqrt(sum over tensors of ||g||^2), before clipping (what HF Trainer logs)
- ``param.rms``           sqrt(mean(p^2)) per tensor after the step
- ``update.rms``          sqrt(mean(dp^2)) with dp = p_after - p_before
- ``update.ratio``        ||dp|| / sqrt(||p_after||^2 + n * eps^2) per tensor (n elements, eps = 1e-8),
                          i.e. update.rms / sqrt(param.rms^2 + eps^2) of the same step. It is finite for
                          every tensor: a zero-initialised tensor (LayerNorm or linear biases at init)
                          gets 1 on its first update (the step wrote all of it), a tensor that stays zero
                          gets 0; for a small step it equals ||dp|| / ||p_before|| to first order in it
- ``adam.eps_dominance``  share of elements with sqrt(v_hat) < eps, v_hat = v / (1 - beta2^t)
                          (per tensor and "" for the whole model)
- ``adam.v_rms``          sqrt(mean(v_hat)) per tensor
- ``health.nonfinite``    module "grad": count of non-finite gradient elements (before clipping)
- ``lr``                  learning rate of the first parameter group

Gradients are captured at the end of each backward pass on logged steps (post-accumulate-grad hooks
queue one end-of-backward callback), so a loop that clips before ``optimizer.step()`` still gets the
unclipped values, gradient accumulation gives the accumulated gradient, and a closure-based
``optimizer.step(closure)`` (Lightning) is covered because its backward runs inside the step. Norms
use ``torch._foreach_norm``: a handful of kernels for any number of tensors.

Under DDP and FSDP2 (DTensor parameters, gradients and optimizer state) every statistic is computed on
the local tensors (``to_local()``, never an all-gather) as partial sums that the Monitor sums over ranks:
per-tensor RMS and ``update.ratio`` as (sum of squares, count / ||p_after||^2 + n eps^2) pairs (every
term is a sum over elements, so shard sums add up to the global value), whole-model sums scaled by
``1 / replication`` so each element counts once (see ``stabilitylab.distributed``).
"""

from __future__ import annotations

from typing import Any

import torch

from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab import shards
from stabilitylab.probes.base import Probe

#: Floor of ``update.ratio``'s denominator, per element: only matters for a tensor that is exactly zero.
RATIO_EPS = 1e-8


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of a wrapper (accelerate, Lightning, ...)."""
    seen = set()
    opt = optimizer
    while id(opt) not in seen:
        seen.add(id(opt))
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer: expected a torch.optim.Optimizer (or a wrapper around one), got {type(optimizer).__name__}")
    return opt


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class OptimizerProbe(Probe):
    """Gradient / parameter / update norms and Adam eps dominance. Needs ``optimizer``."""

    name = "optimizer"
    metrics = (M.GRAD_RMS, M.GRAD_GLOBAL_NORM, M.PARAM_RMS, M.UPDATE_RMS, M.UPDATE_RATIO,
               M.ADAM_EPS_DOMINANCE, M.ADAM_V_RMS, M.HEALTH_NONFINITE, M.LR)

    def __init__(self, per_tensor: bool = True):
        super().__init__()
        self.per_tensor = per_tensor
        self._params: list[torch.Tensor] = []
        self._names: list[str] = []
        self._grad_hooks: list[Any] = []
        self._queued = False
        self._grad_sq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._grad_nonfinite: torch.Tensor | None = None
        self._before: list[torch.Tensor] | None = None
        self._consts: dict[tuple, Any] = {}

    def _attach(self) -> None:
        if self.optimizer is None:
            raise ValueError("OptimizerProbe: optimizer=None; pass Monitor(model, optimizer=opt, ...) "
                             "or drop the 'optimizer' probe")
        self.optimizer = unwrap_optimizer(self.optimizer)
        names = {id(p): n for n, p in self.model.named_parameters()}
        seen = set()
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                self._params.append(p)
                self._names.append(names.get(id(p), f"group{gi}.param{pi}"))
        self._inv_rep = [1.0 / shards.replication(p) for p in self._params]
        self._inv_world = 1.0 / shards.rank_and_world()[1]
        self._hook(self.optimizer.register_step_pre_hook(self._pre_step))
        self._hook(self.optimizer.register_step_post_hook(self._post_step))
        self.arm(self.armed)

    def _detach(self) -> None:
        self._disarm_grad_hooks()
        self._params, self._names = [], []
        self._consts = {}
        self._before = None
        self._grad_sq = None

    # ------------------------------------------------------------------ gradient capture
    def arm(self, armed: bool) -> None:
        super().arm(armed)
        if not self.attached:
            return
        if armed and not self._grad_hooks:
            self._grad_sq = None
            on_grad = self.guard(self._on_grad)
            self._grad_hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in self._params]
        elif not armed:
            self._disarm_grad_hooks()

    def _disarm_grad_hooks(self) -> None:
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.guard(self._after_backward))

    def _after_backward(self) -> None:
        """Defer the capture once more: callbacks queued during backward (DDP's gradient averaging,
        FSDP's reduce-scatter) run first, so the captured gradients are the final, synchronised ones."""
        torch.autograd.Variable._execution_engine.queue_callback(self.guard(self._capture_grads))

    def _capture_grads(self) -> None:
        """End of a backward pass: norms of the (accumulated, unclipped) gradients. Last one wins."""
        self._queued = False
        self._grad_sq, self._grad_nonfinite = self._grad_stats()

    def _grad_stats(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """``((sq, numel, inv_rep), nonfinite)`` of the gradients: per tracked tensor the local sum of
        squares, local element count and ``1 / replication`` of the *gradient* (its placements may differ
        from the parameter's: a row-wise embedding's gradient is replicated, a sequence-parallel norm's
        is ``Partial``), and the replication-weighted non-finite count."""
        idx = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not idx:
            return None, None
        pairs = [shards.local(self._params[i].grad) for i in idx]
        grads = [g for g, _ in pairs]
        sq = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        counts = F.nonfinite_counts(grads).double()
        layout = (tuple(idx), tuple(float(g.numel()) for g in grads), tuple(r for _, r in pairs))
        numel, inv_rep, at, full_numel, full_inv = self._grad_consts(layout, sq.device)
        nonfinite = (counts * inv_rep).sum()
        if at is not None:
            sq = torch.zeros(len(self._params), dtype=sq.dtype, device=sq.device).index_copy(0, at, sq)
            numel, inv_rep = full_numel, full_inv
        return (sq, numel, inv_rep), nonfinite

    def _grad_consts(self, layout: tuple, device: torch.device) -> tuple:
        """Device constants of one gradient layout (which tensors have gradients, their local sizes and
        replications), built once per layout and device: a logged step makes no host-to-device copy."""
        key = ("grad", layout, device)
        got = self._consts.get(key)
        if got is None:
            idx, numel, rep = layout
            n = torch.tensor(numel, dtype=torch.float32, device=device)
            inv = torch.tensor([1.0 / r for r in rep], dtype=torch.float64, device=device)
            at = full_n = full_inv = None
            if len(idx) < len(self._params):  # tensors without a gradient: weight of the parameter, sum 0
                at = torch.tensor(idx, device=device)
                full_n = self._per_tensor_const("numel", device).clone().index_copy(0, at, n)
                full_inv = self._per_tensor_const("inv_rep", device).clone().index_copy(0, at, inv)
            if len(self._consts) > 16:  # layouts change rarely (frozen tensors); bounded anyway
                self._consts.clear()
            got = self._consts[key] = (n, inv, at, full_n, full_inv)
        return got

    def _per_tensor_const(self, name: str, device: torch.device) -> torch.Tensor:
        """``numel`` (float32) or ``inv_rep`` (float64) of every tracked parameter, built once per device."""
        key = (name, device)
        if key not in self._consts:
            values = self._inv_rep if name == "inv_rep" else [float(_local(p).numel()) for p in self._params]
            self._consts[key] = torch.tensor(values, device=device,
                                             dtype=torch.float64 if name == "inv_rep" else torch.float32)
        return self._consts[key]

    # ------------------------------------------------------------------ step hooks
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.armed:
            return
        params = [_local(p.detach()) for p in self._params]
        self._before = torch._foreach_clone(params) if params else []

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.armed or self._before is None or not self._params:
            return
        if self._grad_sq is None:
            # No backward was seen on this logged step (grads set by hand): read them now.
            self._grad_sq, self._grad_nonfinite = self._grad_stats()
        params = [_local(p.detach()) for p in self._params]
        dev = params[0].device
        numel = self._per_tensor_const("numel", dev)
        p_sq = torch.stack(torch._foreach_norm(params)).float().pow(2)
        upd = torch._foreach_sub(params, self._before)
        u_sq = torch.stack(torch._foreach_norm(upd)).float().pow(2)
        self._before = None
        names = tuple(self._names)
        if self.per_tensor:
            self.record_many(M.PARAM_RMS, names, p_sq, numel)
            self.record_many(M.UPDATE_RMS, names, u_sq, numel)
            self.record_many(M.UPDATE_RATIO, names, u_sq, p_sq + numel * RATIO_EPS**2)
        if self._grad_sq is not None:
            g_sq, g_numel, g_inv_rep = self._grad_sq
            if self.per_tensor:
                self.record_many(M.GRAD_RMS, names, g_sq, g_numel)
            self.record(M.GRAD_GLOBAL_NORM, "", (g_sq.double() * g_inv_rep).sum(), self._inv_world)
            self.record(M.HEALTH_NONFINITE, "grad", self._grad_nonfinite, 1.0)
        self._grad_sq = None
        self.record_value(M.LR, "", float(self.optimizer.param_groups[0]["lr"]))
        self._adam_stats()

    def _adam_stats(self) -> None:
        """eps dominance and v_hat RMS for Adam-family optimizers (state 'exp_avg_sq').

        Per tensor with ``b = 1 - beta2^t``: ``sqrt(v / b) < eps`` is tested as ``v < eps^2 b`` and
        ``sum(v_hat) = sum(v) / b``. The ``b`` of all tensors come from one vector op over the stacked step
        counts (no per-tensor host reads), so each tensor costs two reductions. The per-tensor constants
        (beta2, eps^2, local sizes, replications) are device tensors built once per layout
        (:meth:`_adam_consts`), so a logged step copies nothing from the host. The whole-model share
        weights each tensor's counts by ``1 / replication``, so replicated tensors count once.
        """
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        idx, vs, steps, beta2s, eps2s = [], [], [], [], []
        for i, p in enumerate(self._params):
            st = self.optimizer.state.get(p)
            if not st or "exp_avg_sq" not in st:
                continue
            g = group_of[id(p)]
            idx.append(i)
            vs.append(_local(st["exp_avg_sq"]))
            steps.append(st.get("step", 1))
            beta2s.append(float(g.get("betas", (0.9, 0.999))[1]))
            eps2s.append(None if g.get("eps") is None else float(g["eps"]) ** 2)
        if not idx:
            return
        dev = vs[0].device
        if all(isinstance(t, torch.Tensor) for t in steps) and len({t.device for t in steps}) == 1:
            step = torch.stack(steps).double()
        else:
            step = torch.stack([torch.as_tensor(t, dtype=torch.float64, device=dev) for t in steps])
        beta2, eps2, numel, have, n_have, inv_rep = self._adam_consts(
            (tuple(idx), tuple(beta2s), tuple(eps2s)), dev, step.device)
        bc2 = 1 - beta2 ** step
        thr = eps2 * bc2
        names = tuple(self._names[i] for i in idx)
        sums = torch.stack([v.sum(dtype=torch.float32) for v in vs])
        self.record_many(M.ADAM_V_RMS, names, sums / bc2.to(dev, torch.float32, non_blocking=True), numel)
        if have:
            c = torch.stack([(vs[i] < thr[i]).sum() for i in have]).float()
            if self.per_tensor:
                self.record_many(M.ADAM_EPS_DOMINANCE, tuple(names[i] for i in have), c, n_have)
            self.record(M.ADAM_EPS_DOMINANCE, "", (c.double() * inv_rep).sum(), (n_have.double() * inv_rep).sum())

    def _adam_consts(self, layout: tuple, dev: torch.device, step_dev: torch.device) -> tuple:
        """``(beta2, eps^2, numel, have, numel[have], inv_rep[have])`` of one Adam state layout
        (``(tensor indices, beta2s, eps^2s)``): device tensors built on its first logged step, then reused."""
        key = ("adam", layout, dev, step_dev)
        got = self._consts.get(key)
        if got is None:
            idx, beta2s, eps2s = layout
            have = [j for j, e in enumerate(eps2s) if e is not None]
            numel = [float(_local(self._params[i]).numel()) for i in idx]
            if len(self._consts) > 16:
                self._consts.clear()
            got = self._consts[key] = (
                torch.tensor(beta2s, dtype=torch.float64, device=step_dev),
                torch.tensor([e or 0.0 for e in eps2s], dtype=torch.float64, device=step_dev),
                torch.tensor(numel, device=dev), have,
                torch.tensor([numel[j] for j in have], device=dev),
                torch.tensor([self._inv_rep[idx[j]] for j in have], dtype=torch.float64, device=dev))
        return got
