"""``train_many(configs)``: K proxy runs that differ only in learning rate and seed, as one batched model.

The K runs of a group are one model with a leading member dimension: every weight is stacked to
``(K, *shape)``, every Linear is one ``torch.bmm``, attention runs over ``K * batch`` sequences, and
AdamW is written out over the stacked tensors with a per-member learning rate. This removes the
per-run cost of launching K times as many small operations (Python, dispatch, kernel launches) and the
per-run Monitor: large gains where those dominate (tiny models, GPUs); for a CPU-bound shape whose
matrix multiplies already run near the core's peak, the arithmetic stays and the gain is smaller
(``benchmarks/vectorized_throughput.py`` measures it).

Each member reproduces ``train_one`` on its own config (within float rounding): the same init (the
proxy built after ``torch.manual_seed(seed)``), the same batches (``ByteData.batch`` from
``torch.Generator().manual_seed(seed)``), the same optimizer (the parameter groups of
``build_optimizer``: per-group LR and weight decay, independent decay, muP LR scaling, betas, eps),
warm-up + cosine schedule, per-member global-norm clipping and the same held-out evaluation.

A member whose training loss becomes non-finite is frozen from that step on: its loss is left out of
the summed loss (``torch.where``, so NaN cannot flow back), its gradients are zeroed and its parameters
stop changing, so it never touches the other members. Its ``RunResult`` reads like ``train_one``'s:
``diverged``, ``steps_done`` = the first divergence check (every ``check_every`` steps) at or after the
first non-finite loss, NaN training losses from that step.

Monitoring (every ``monitor_every`` steps, one device-to-host transfer per logged step) gives each
member the tidy records a ``Monitor`` would write for ``loss``, ``lr``, ``grad.global_norm`` (before
clipping), ``logits.lse_mean`` / ``lse_std`` / ``max`` and, per attention module ``blocks.{i}.attn``,
``attn.max_logit`` and ``attn.entropy``, all computed with ``stabilitylab.functional``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

from stabilitylab import functional as SF
from stabilitylab import metrics as M
from stabilitylab.mitigations.schedules import warmup_cosine_factor
from stabilitylab.mitigations.softcap import softcap
from stabilitylab.mitigations.z_loss import z_loss
from stabilitylab.proxy.data import ByteData
from stabilitylab.proxy.model import ProxyConfig, ProxyTransformer
from stabilitylab.proxy.train import RunResult, TrainConfig, build_optimizer
from stabilitylab.sinks.base import Records, records_to_frame

#: The TrainConfig fields members of one ``train_many`` call may differ in.
VARYING = ("lr", "seed")

Params = dict[str, torch.Tensor]


def _fixed_fields(config: TrainConfig) -> dict[str, Any]:
    """Every TrainConfig field except ``VARYING``, model fields as ``model.<name>``."""
    d = config.to_dict()
    model = d.pop("model")
    d.update({f"model.{k}": v for k, v in model.items()})
    return {k: v for k, v in d.items() if k not in VARYING}


def group_compatible(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Partition configs into groups ``train_many`` accepts (equal in every field but ``lr`` and ``seed``).

    Args:
        configs: any list of ``TrainConfig``.

    Returns:
        Lists of indices into ``configs``, groups in order of first appearance, indices ascending.
    """
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        if not isinstance(c, TrainConfig):
            raise TypeError(f"group_compatible(configs[{i}]=...): expected a TrainConfig, got {type(c).__name__}")
        groups.setdefault(repr(sorted(_fixed_fields(c).items())), []).append(i)
    return list(groups.values())


def unsupported(config: TrainConfig) -> str | None:
    """Why ``train_many`` cannot train ``config`` (None when it can): it implements AdamW with warm-up +
    cosine only, not ``lr_schedule``, ``data_switch_step`` or ``freeze_until``."""
    if config.optimizer != "adamw":
        return f"optimizer={config.optimizer!r} is not vectorised (only 'adamw')"
    for name in ("lr_schedule", "data_switch_step", "freeze_until"):
        if getattr(config, name):
            return f"{name}={getattr(config, name)!r} is not vectorised"
    return None


def _check(configs: Sequence[TrainConfig], monitor_every: int | None, run_ids: Sequence[str] | None) -> None:
    if not isinstance(configs, Sequence) or isinstance(configs, (str, bytes)) or not configs:
        raise ValueError(f"train_many(configs={configs!r}): pass a non-empty list of TrainConfig")
    for i, c in enumerate(configs):
        if not isinstance(c, TrainConfig):
            raise TypeError(f"train_many(configs[{i}]=...): expected a TrainConfig, got {type(c).__name__}")
    for i, c in enumerate(configs):
        why = unsupported(c)
        if why:
            raise ValueError(f"train_many: configs[{i}].{why}; use train_one for it")
    ref = _fixed_fields(configs[0])
    for i, c in enumerate(configs[1:], start=1):
        for name, v in _fixed_fields(c).items():
            if v != ref[name]:
                raise ValueError(f"train_many: configs[{i}].{name}={v!r} differs from configs[0].{name}="
                                 f"{ref[name]!r}; members may differ only in {' and '.join(VARYING)} (split "
                                 "the list with group_compatible(configs) and call train_many per group)")
    M.check_every(monitor_every, "train_many(monitor_every", none_ok=True)
    if run_ids is not None and (len(run_ids) != len(configs) or not all(isinstance(r, str) for r in run_ids)):
        raise ValueError(f"train_many(run_ids=...): need {len(configs)} strings (one per config), got {run_ids!r}")


# ---------------------------------------------------------------------------------------------- model
def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-member ``(K,)`` or ``(K, n)`` tensor viewed to broadcast against ``like`` ``(K, ..., n?)``."""
    return v.view(v.shape[0], *[1] * (like.dim() - v.dim()), *v.shape[1:])


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-member LayerNorm over the last dim without bias: ``x`` (K, ..., n), ``weight`` (K, n)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * _bcast(weight, x)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-member ``x @ W^T``: x (K, N, in), weight (K, out, in) -> (K, N, out)."""
    return torch.bmm(x, weight.transpose(1, 2))


class _Batched:
    """The proxy's forward over stacked weights (leading member dim K); mirrors ``ProxyTransformer``."""

    def __init__(self, members: list[ProxyTransformer]):
        self.cfg: ProxyConfig = members[0].cfg
        params, _ = stack_module_state(members)
        self.params: Params = params
        self.eps = {n: m.eps for n, m in members[0].named_modules() if isinstance(m, nn.LayerNorm)}
        self.output_mult = members[0].output_mult
        self.attn_scale = members[0].blocks[0].attn.scale
        self.K = len(members)

    def ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return _layer_norm(x, self.params[name + ".weight"], self.eps[name])

    def forward(self, idx: torch.Tensor, qk: list | None = None) -> torch.Tensor:
        """Logits ``(K, B, T, vocab)`` of member k on ``idx[k]`` (``idx``: (K, B, T) int64).

        If ``qk`` is a list, each layer appends its ``(q, k)``, shaped ``(K*B, heads, T, head_dim)``.
        """
        cfg, P, K = self.cfg, self.params, self.K
        _, B, T = idx.shape
        C, H, D, V = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size
        offsets = (torch.arange(K, device=idx.device) * V).view(K, 1, 1)
        x = F.embedding(idx + offsets, P["wte.weight"].flatten(0, 1)) + P["wpe.weight"][:, None, :T]
        x = x.view(K, B * T, C)
        for i in range(cfg.n_layers):
            a = f"blocks.{i}.attn"
            q, k, v = _linear(self.ln(x, f"blocks.{i}.ln_1"), P[f"{a}.c_attn.weight"]).split(C, dim=2)
            q, k, v = (t.reshape(K, B, T, H, D) for t in (q, k, v))
            if cfg.qk_layernorm:
                q, k = self.ln(q, f"{a}.q_norm.norm"), self.ln(k, f"{a}.k_norm.norm")
            q, k, v = (t.reshape(K * B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (K*B, H, T, D)
            if qk is not None:
                qk.append((q, k))
            if cfg.use_sdpa and cfg.attn_softcap is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
            else:
                att = (q @ k.transpose(-2, -1)) * self.attn_scale
                if cfg.attn_softcap is not None:
                    att = softcap(att, cfg.attn_softcap)
                mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
                y = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v
            y = y.transpose(1, 2).reshape(K, B * T, C)
            x = x + _linear(y, P[f"{a}.c_proj.weight"])
            h = F.gelu(_linear(self.ln(x, f"blocks.{i}.ln_2"), P[f"blocks.{i}.mlp.c_fc.weight"]))
            x = x + _linear(h, P[f"blocks.{i}.mlp.c_proj.weight"])
        lm_head = P.get("lm_head.weight", P["wte.weight"])  # tied embeddings: one stacked tensor
        logits = _linear(self.ln(x, "ln_f"), lm_head)
        if self.output_mult != 1.0:
            logits = logits * self.output_mult
        if cfg.logit_softcap is not None:
            logits = softcap(logits, cfg.logit_softcap)
        return logits.view(K, B, T, V)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-member mean token cross-entropy ``(K,)`` (nats), as ``F.cross_entropy`` per member."""
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="none")
        return ce.view(self.K, -1).mean(1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-member training loss ``(K,)``: cross-entropy (+ z-loss when the config has it)."""
        loss = self.cross_entropy(logits, targets)
        if self.cfg.z_loss > 0:
            loss = loss + torch.vmap(partial(z_loss, coef=self.cfg.z_loss))(logits)
        return loss


# ---------------------------------------------------------------------------------------------- data
class _Batches:
    """Per-member batches: one generator per distinct seed, so members sharing a seed share batches."""

    def __init__(self, data: ByteData, seeds: list[int], batch_size: int, device: str, offset: int = 0):
        uniq = sorted(set(seeds))
        self.gens = [torch.Generator().manual_seed(s + offset) for s in uniq]
        self.member = torch.tensor([uniq.index(s) for s in seeds], device=device)
        self.data, self.batch_size, self.device = data, batch_size, device

    def next(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, each (K, B, T)."""
        xs, ys = zip(*(self.data.batch(split, self.batch_size, g, self.device) for g in self.gens))
        return torch.stack(xs)[self.member], torch.stack(ys)[self.member]


@torch.no_grad()
def _evaluate(model: _Batched, data: ByteData, configs: list[TrainConfig]) -> np.ndarray:
    """Per-member held-out cross-entropy, exactly ``proxy.train.evaluate``'s batches (seed + 7919)."""
    c = configs[0]
    batches = _Batches(data, [k.seed for k in configs], c.batch_size, c.device, offset=7919)
    total = torch.zeros(model.K, device=c.device)
    for _ in range(c.eval_batches):
        x, y = batches.next("val")
        total += model.cross_entropy(model.forward(x), y)
    return total.cpu().double().numpy() / c.eval_batches


# ---------------------------------------------------------------------------------------------- optimizer
class _AdamW:
    """``torch.optim.AdamW`` (single-tensor algorithm) over stacked params with per-member LR schedules.

    Each member's parameter groups (LR, weight decay) come from ``build_optimizer`` on its own config,
    the schedule is ``warmup_cosine_factor`` with floor ``min(1, min_lr / lr)``, as in ``train_one``.
    Step t (from 1), per member: ``p <- p * (1 - lr_t * wd)``, ``m <- lerp(m, g, 1 - b1)``,
    ``v <- b2 v + (1 - b2) g^2``, ``p <- p - lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    """

    def __init__(self, model: _Batched, members: list[ProxyTransformer], configs: list[TrainConfig]):
        c = configs[0]
        self.params = model.params
        self.beta1, self.beta2, self.eps = c.beta1, c.beta2, c.eps
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        steps = np.arange(c.steps)
        factor = np.array([[warmup_cosine_factor(int(t), c.warmup_steps, c.steps, min(1.0, c.min_lr / k.lr))
                            for k in configs] for t in steps])  # (steps, K)
        bc1 = 1 - c.beta1 ** (steps + 1.0)
        self.bc2_sqrt = np.sqrt(1 - c.beta2 ** (steps + 1.0))
        groups: list[list[tuple[float, float]]] = [[] for _ in self.params]  # per param: (lr, wd) per member
        names = list(self.params)
        for member, cfg in zip(members, configs):
            index = {id(p): names.index(n) for n, p in member.named_parameters()}
            for g in build_optimizer(member, cfg).param_groups:
                for p in g["params"]:
                    groups[index[id(p)]].append((g["lr"], g["weight_decay"]))
        # Tables (steps, K) per distinct group: lr_t, decay factor 1 - lr_t * wd, step size lr_t / bc1.
        self.table: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for n, g in zip(names, groups):
            key = tuple(g)
            if key not in cache:
                lr0, wd = np.array(g).T
                lr_t = lr0 * factor
                cache[key] = tuple(torch.tensor(a, dtype=torch.float32, device=c.device)
                                   for a in (lr_t, 1 - lr_t * wd, -lr_t / bc1[:, None]))
            self.table[n] = cache[key]
        self.first = names[0]

    def lr(self, t: int) -> torch.Tensor:
        """``(K,)`` LR of the first parameter group at step t (what the Monitor logs as ``lr``)."""
        return self.table[self.first][0][t]

    @torch.no_grad()
    def step(self, t: int, active: torch.Tensor) -> None:
        """Step t (from 0) for members where ``active`` (K,) bool is True; the others stay unchanged."""
        b1, b2 = self.beta1, self.beta2
        for n, p in self.params.items():
            _, decay, neg_step = (a[t] for a in self.table[n])
            g, m, v = p.grad, self.m[n], self.v[n]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / self.bc2_sqrt[t]).add_(self.eps)
            new = p * _bcast(decay, p) + _bcast(neg_step, p) * m / denom
            p.copy_(torch.where(_bcast(active, p), new, p))


def _clip(grads: list[torch.Tensor], active: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Zero frozen members' grads, clip each member's global norm in place; returns the pre-clip norms (K,).

    ``norm_k = sqrt(sum_p ||g_pk||^2)``; scale ``min(1, max_norm / (norm_k + 1e-6))``
    (``torch.nn.utils.clip_grad_norm_`` per member).
    """
    for g in grads:
        g.copy_(torch.where(_bcast(active, g), g, 0.0))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]),
                                    dim=0)
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(_bcast(coef, g))
    return norm


# ---------------------------------------------------------------------------------------------- monitoring
def _partials(model: _Batched, loss: torch.Tensor, lr: torch.Tensor, grad_norm: torch.Tensor,
              logits: torch.Tensor, qk: list) -> tuple[list[tuple[str, str]], np.ndarray, torch.Tensor]:
    """Keys, reduce codes and a ``(2, n_keys, K)`` float64 tensor of partials ``(num, weight)`` of one
    step (still on the device), recorded as the probes record them: ``metrics.finalise`` turns them into
    the values a Monitor would log. Finished values have weight 1 (squared for ``rms`` metrics, as
    ``Probe.record_value``); ``attn.entropy`` is the row-weighted mean (``AttentionProbe``)."""
    K = model.K
    lse_mean, lse_std, lse_max = torch.vmap(SF.lse_stats)(logits.detach())
    one = torch.ones(K, dtype=torch.float64, device=loss.device)
    rows = [(M.LOSS, "", loss.detach().float(), one), (M.LR, "", lr, one),
            (M.GRAD_GLOBAL_NORM, "", grad_norm.double() ** 2, one), (M.LOGITS_LSE_MEAN, "", lse_mean, one),
            (M.LOGITS_LSE_STD, "", lse_std, one), (M.LOGITS_MAX, "", lse_max, one)]
    for i, (q, k) in enumerate(qk):
        # Members become extra heads: (K*B, H, T, D) -> (B, K*H, T, D), so one call gives per-member heads.
        KB, H, T, D = q.shape
        q, k = (t.reshape(K, KB // K, H, T, D).transpose(0, 1).reshape(KB // K, K * H, T, D) for t in (q, k))
        st = SF.attention_stats(q, k, is_causal=True, scale=model.attn_scale)
        rows.append((M.ATTN_MAX_LOGIT, f"blocks.{i}.attn", st.head_max.view(K, H).amax(1), one))
        rows.append((M.ATTN_ENTROPY, f"blocks.{i}.attn", st.entropy_sum.view(K, H).sum(1), st.rows.view(K, H).sum(1)))
    keys = [(metric, module) for metric, module, _, _ in rows]
    codes = np.array([M.REDUCE_CODE[M.spec(metric).reduce] for metric, _ in keys], dtype=np.int64)
    num = torch.stack([n.to(torch.float64) for _, _, n, _ in rows])
    w = torch.stack([w.to(torch.float64) for _, _, _, w in rows])
    return keys, codes, torch.stack([num, w])


# ---------------------------------------------------------------------------------------------- training
def train_many(configs: Sequence[TrainConfig], monitor_every: int | None = 10, progress: bool = False,
               run_ids: Sequence[str] | None = None) -> list[RunResult]:
    """Train K proxies that differ only in ``lr`` and/or ``seed`` at once, as one batched model.

    Member k reproduces ``train_one(configs[k])`` within float rounding (init, batches, AdamW groups
    and schedule, per-member clipping, held-out evaluation, divergence rule); a member whose loss turns
    non-finite is frozen and cannot affect the others (see the module docstring).

    Args:
        configs: the runs; every field except ``lr`` and ``seed`` must be equal (``group_compatible``
            splits an arbitrary list) and ``optimizer`` must be ``"adamw"``.
        monitor_every: log the monitored metrics every this many steps (the Monitor's schedule,
            ``metrics.is_logged``: step s is logged when ``s % monitor_every == 0``); None records nothing.
        progress: show a tqdm bar over steps.
        run_ids: ``run_id`` of each member's history rows (default "": the caller fills it).

    Returns:
        One ``RunResult`` per config, in order. ``wall_time`` is each member's share (total / K);
        ``history`` is the tidy frame (run_id, step, metric, module, value, wall_time) or None.
    """
    _check(configs, monitor_every, run_ids)
    t0 = time.time()
    configs = list(configs)
    c, K = configs[0], len(configs)
    data = ByteData(c.model.seq_len, c.data_path)
    members = []
    for cfg in configs:
        torch.manual_seed(cfg.seed)
        members.append(ProxyTransformer(cfg.model).to(c.device))
    model = _Batched(members)
    opt = _AdamW(model, members, configs)
    init_loss = _evaluate(model, data, configs)
    batches = _Batches(data, [k.seed for k in configs], c.batch_size, c.device)
    active = torch.ones(K, dtype=torch.bool, device=c.device)
    first_bad = torch.full((K,), -1, dtype=torch.long, device=c.device)
    losses: list[torch.Tensor] = []
    logged: list[tuple[int, float, list, np.ndarray]] = []  # (step, wall time, keys, (n_keys, K) values)
    grads = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, desc=f"{K} runs (vectorized)", leave=False)
    try:
        for t in range(c.steps):
            log = monitor_every is not None and M.is_logged(t, monitor_every)
            x, y = batches.next("train")
            qk: list | None = [] if log else None
            logits = model.forward(x, qk)
            loss = model.loss(logits, y)
            was_active = active
            finite = torch.isfinite(loss)
            first_bad = torch.where(active & ~finite, t, first_bad)
            active = active & finite
            torch.where(active, loss, 0.0).sum().backward()
            if grads is None:
                grads = [p.grad for p in model.params.values()]
            norm = _clip(grads, active, c.clip)
            lr = opt.lr(t)
            opt.step(t, active)
            for g in grads:
                g.zero_()
            losses.append(loss.detach())
            if log:
                keys, codes, partials = _partials(model, loss, lr, norm, logits, qk)
                n = len(keys)
                both = torch.cat([partials.flatten(0, 1), was_active[None].double()]).cpu().numpy()  # one transfer
                values = M.finalise(codes, both[:n], both[n:2 * n])
                logged.append((t, time.time(), keys, np.concatenate([values, both[-1:]])))
            if bar is not None:
                bar.update(1)
            if (t % c.check_every == 0 or t == c.steps - 1) and not bool(active.any()):
                break  # every member diverged (one host sync every check_every steps, as train_one)
    finally:
        if bar is not None:
            bar.close()
    final = _evaluate(model, data, configs)
    train_loss = torch.stack(losses).float().cpu().numpy()  # (steps run, K)
    first_bad_np = first_bad.cpu().numpy()
    checks = np.array([s for s in range(c.steps) if s % c.check_every == 0 or s == c.steps - 1])
    wall = (time.time() - t0) / K
    results = []
    for k in range(K):
        bad = int(first_bad_np[k])
        steps_done = int(checks[checks >= bad][0]) + 1 if bad >= 0 else c.steps
        tl = train_loss[:steps_done, k].astype(np.float64)
        if bad >= 0:
            tl[bad + 1:] = np.nan
        fl = float(final[k]) if bad < 0 else math.nan
        diverged = bad >= 0 or not math.isfinite(fl) or fl > init_loss[k]
        history = None
        if monitor_every is not None:
            rid = run_ids[k] if run_ids is not None else ""
            history = _history(rid, k, logged)
        results.append(RunResult(
            final_loss=fl, init_loss=float(init_loss[k]), diverged=bool(diverged), steps_done=steps_done,
            status="diverged" if diverged else "ok", n_params=members[k].n_params(), wall_time=wall,
            train_loss=tl.tolist(), history=history))
    return results


def _history(run_id: str, k: int, logged: list[tuple[int, float, list, np.ndarray]]) -> pd.DataFrame:
    """Member k's tidy records: every logged step it started as an active (not yet frozen) member."""
    batches = [Records(run_id, step, wall, [m for m, _ in keys], [mod for _, mod in keys], values[:-1, k])
               for step, wall, keys, values in logged if values[-1, k] > 0]
    return records_to_frame(batches)
