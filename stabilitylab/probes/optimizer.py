"""Gradient, parameter and update norms, and Adam eps dominance, from optimizer step hooks.

Metrics (``module`` is the parameter's name, "" for whole-model values):

- ``grad.rms``            sqrt(mean(g^2)) per tensor, **before** gradient clipping
- ``grad.global_norm``    sqrt(sum over tensors of ||g||^2), before clipping (what HF Trainer logs)
- ``param.rms``           sqrt(mean(p^2)) per tensor after the step
- ``update.rms``          sqrt(mean(dp^2)) with dp = p_after - p_before
- ``update.ratio``        ||dp|| / ||p_before|| per tensor
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
per-tensor RMS and ``update.ratio`` as (sum of squares, count / ||p||^2) pairs, whole-model sums scaled
by ``1 / replication`` so each element counts once (see ``stabilitylab.distributed``).
"""

from __future__ import annotations

from typing import Any

import torch

from stabilitylab import distributed as D
from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab.probes.base import Probe


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
        self._grad_sq: torch.Tensor | None = None
        self._grad_nonfinite: torch.Tensor | None = None
        self._before: list[torch.Tensor] | None = None
        self._consts: dict[tuple[str, torch.device], torch.Tensor] = {}

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
        self._inv_rep = [1.0 / D.replication(p) for p in self._params]
        self._inv_world = 1.0 / D.rank_and_world()[1]
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

    def _grad_stats(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        idx = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not idx:
            return None, None
        grads = [_local(self._params[i].grad) for i in idx]
        sq = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        counts = F.nonfinite_counts(grads).double()
        inv_rep = self._per_tensor_const("inv_rep", sq.device)
        if len(idx) < len(self._params):
            at = torch.tensor(idx, device=sq.device)
            sq = torch.zeros(len(self._params), dtype=sq.dtype, device=sq.device).index_copy(0, at, sq)
            inv_rep = inv_rep[at]
        return sq, (counts * inv_rep).sum()

    def _per_tensor_const(self, name: str, device: torch.device) -> torch.Tensor:
        """``numel`` (float32) or ``inv_rep`` (float64) of every tracked tensor, built once per device."""
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
        before_norm = torch.stack(torch._foreach_norm(self._before)).float()
        upd = torch._foreach_sub(params, self._before)
        u_sq = torch.stack(torch._foreach_norm(upd)).float().pow(2)
        self._before = None
        names = tuple(self._names)
        if self.per_tensor:
            self.record_many(M.PARAM_RMS, names, p_sq, numel)
            self.record_many(M.UPDATE_RMS, names, u_sq, numel)
            self.record_many(M.UPDATE_RATIO, names, u_sq, before_norm.pow(2))
        if self._grad_sq is not None:
            if self.per_tensor:
                self.record_many(M.GRAD_RMS, names, self._grad_sq, numel)
            inv_rep = self._per_tensor_const("inv_rep", dev)
            self.record(M.GRAD_GLOBAL_NORM, "", (self._grad_sq.double() * inv_rep).sum(), self._inv_world)
            self.record(M.HEALTH_NONFINITE, "grad", self._grad_nonfinite, 1.0)
        self._grad_sq = None
        self.record_value(M.LR, "", float(self.optimizer.param_groups[0]["lr"]))
        self._adam_stats()

    def _adam_stats(self) -> None:
        """eps dominance and v_hat RMS for Adam-family optimizers (state 'exp_avg_sq').

        Per tensor with ``b = 1 - beta2^t``: ``sqrt(v / b) < eps`` is tested as ``v < eps^2 b`` and
        ``sum(v_hat) = sum(v) / b``. The ``b`` of all tensors come from one vector op over the stacked step
        counts (no per-tensor host reads), so each tensor costs two reductions.
        """
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        names, vs, steps, beta2s, eps2s = [], [], [], [], []
        for name, p in zip(self._names, self._params):
            st = self.optimizer.state.get(p)
            if not st or "exp_avg_sq" not in st:
                continue
            g = group_of[id(p)]
            names.append(name)
            vs.append(_local(st["exp_avg_sq"]))
            steps.append(st.get("step", 1))
            beta2s.append(g.get("betas", (0.9, 0.999))[1])
            eps2s.append(None if g.get("eps") is None else g["eps"] ** 2)
        if not names:
            return
        dev = vs[0].device
        if all(isinstance(t, torch.Tensor) for t in steps) and len({t.device for t in steps}) == 1:
            step = torch.stack(steps).double()
        else:
            step = torch.stack([torch.as_tensor(t, dtype=torch.float64, device=dev) for t in steps])
        bc2 = 1 - torch.tensor(beta2s, dtype=torch.float64, device=step.device) ** step
        thr = torch.tensor([e or 0.0 for e in eps2s], dtype=torch.float64, device=step.device) * bc2
        have = [i for i, e in enumerate(eps2s) if e is not None]
        counts = [(vs[i] < thr[i]).sum() for i in have]
        sums = torch.stack([v.sum(dtype=torch.float32) for v in vs])
        numel = torch.tensor([float(v.numel()) for v in vs], device=dev)
        self.record_many(M.ADAM_V_RMS, tuple(names), sums / bc2.to(dev, torch.float32), numel)
        if have:
            c = torch.stack(counts).float()
            n = numel[have]
            if self.per_tensor:
                self.record_many(M.ADAM_EPS_DOMINANCE, tuple(names[i] for i in have), c, n)
            self.record(M.ADAM_EPS_DOMINANCE, "", c.sum(), n.sum())
