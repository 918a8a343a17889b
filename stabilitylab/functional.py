"""Pure functions behind every statistic. Probes, analysis and tests all call these.

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: ``q`` is ``(B, H, Tq, D)``, ``k`` is
``(B, Hk, Tk, D)`` with ``H % Hk == 0`` (grouped-query attention repeats each key head ``H // Hk`` times).
Nothing here syncs with the host: every result is a tensor on the input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Budget, in elements, of one chunk of materialised attention scores (float32: 64 MiB).
ATTN_CHUNK_ELEMENTS = 1 << 24


@dataclass
class AttentionStats:
    """Per-head attention statistics of one attention call.

    Attributes:
        head_max: ``(H,)`` max over batch and allowed (query, key) pairs of the pre-softmax score
            ``q.k * scale (+ additive mask)``; ``-inf`` for a head with no allowed pair. Under soft-capping
            this is the raw score before the cap.
        entropy_sum: ``(H,)`` sum over softmax rows with at least one allowed key of the row entropy
            ``-sum_j p_j log p_j`` (nats).
        rows: ``(H,)`` number of such rows (float), so ``entropy_sum / rows`` is the mean entropy.
        capped_head_max: ``(H,)`` max of the soft-capped score the softmax sees, or None without a cap.
    """

    head_max: torch.Tensor
    entropy_sum: torch.Tensor
    rows: torch.Tensor
    capped_head_max: torch.Tensor | None = None

    @property
    def max_logit(self) -> torch.Tensor:
        """Max over heads, 0-d."""
        return self.head_max.amax()

    @property
    def entropy(self) -> torch.Tensor:
        """Mean entropy over all heads' rows, 0-d."""
        return self.entropy_sum.sum() / self.rows.sum()


def _allowed_and_bias(attn_mask: torch.Tensor | None, dtype: torch.dtype):
    """Split an SDPA mask into (allowed bool mask or None, additive float bias or None)."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    bias = attn_mask.to(dtype)
    # Additive masks mark forbidden positions with -inf or the dtype's most negative value.
    floor = torch.finfo(attn_mask.dtype).min / 2 if attn_mask.dtype.is_floating_point else -math.inf
    return attn_mask > floor, bias


def _query_rows(row_mask: torch.Tensor | None, B: int, Tq: int) -> torch.Tensor | None:
    """A ``(B, Tq)`` mask of query rows that count (True = counts) as ``(B, 1, Tq, 1)``; None if absent.

    A mask longer than ``Tq`` (keys from a cache) keeps its last ``Tq`` positions; one that does not fit
    ``(B, Tq)`` (e.g. queries packed by grouped-query decoding) is ignored: all rows count.
    """
    if row_mask is None or row_mask.dim() != 2 or row_mask.shape[0] != B or row_mask.shape[1] < Tq:
        return None
    return row_mask[:, -Tq:].bool()[:, None, :, None]


def _accumulate(s: torch.Tensor, forbidden: torch.Tensor | None, raw: torch.Tensor | None,
                acc: list[torch.Tensor]) -> None:
    """Add one chunk of scores ``s`` (B, H, c, Tk) to ``acc = [head_max, entropy_sum, rows, capped_max]``.

    ``raw`` (same shape, or None) is the pre-cap score whose max is reported as ``head_max``; ``s`` is
    the score the softmax sees, used for the entropy (and for ``capped_max`` when ``raw`` is given).
    """
    if forbidden is not None:
        s = s.masked_fill(forbidden, -math.inf)
    row_max = s.amax(dim=-1)  # (B, H, c); -inf for rows with no allowed key
    if raw is None:
        acc[0] = torch.maximum(acc[0], row_max.amax(dim=(0, 2)))
    else:
        r = raw if forbidden is None else raw.masked_fill(forbidden, -math.inf)
        acc[0] = torch.maximum(acc[0], r.amax(dim=(0, 2, 3)))
        acc[3] = torch.maximum(acc[3], row_max.amax(dim=(0, 2)))
    valid = ~torch.isinf(row_max)  # finite or NaN (NaN propagates into the result)
    # Entropy from scores shifted by the row max, z = s - max <= 0, so H = lse(z) - sum p z loses no
    # precision to large logits: the regime the probe watches. With max(z) = 0 a row's
    # sum(exp(z)) lies in [1, Tk], so lse(z) = log(sum e) and p = e / sum e need no second shift.
    z = s - torch.where(valid, row_max, 0.0).unsqueeze(-1)
    e = torch.exp(z)
    e_sum = e.sum(-1)
    ez = e.mul_(z if forbidden is None else z.masked_fill_(forbidden, 0.0)).sum(-1)
    ent = torch.log(e_sum) - ez / e_sum
    acc[1] = acc[1] + torch.where(valid, ent, 0.0).sum(dim=(0, 2))
    acc[2] = acc[2] + valid.to(s.dtype).sum(dim=(0, 2))


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    chunk_elements: int = ATTN_CHUNK_ELEMENTS,
    row_mask: torch.Tensor | None = None,
) -> AttentionStats:
    """Max pre-softmax logit and softmax entropy per head, with SDPA's mask semantics.

    The score of query i and key j is ``s_ij = scale * q_i . k_j`` (``scale`` defaults to
    ``1/sqrt(D)``) plus the additive float mask if one is given. A position is allowed when the boolean
    mask is True / the float mask is above ``finfo.min / 2`` and, with ``is_causal``, ``j <= i``
    (top-left aligned, like SDPA). Rows with no allowed key are excluded from the entropy, and so are
    query rows that ``row_mask`` marks False (padding). The row
    entropy is ``H_i = -sum_j p_ij log p_ij`` with ``p_i = softmax(s_i)`` over allowed keys (nats),
    computed as ``lse(z_i) - sum_j p_ij z_ij`` with ``z_i = s_i - max_j s_ij`` so it stays exact for
    large logits. NaN scores propagate into the result (they are data, never an error).

    Scores are materialised in query chunks of at most ``chunk_elements`` elements, in float32 for
    16-bit inputs and in the input dtype otherwise, so memory stays bounded for long sequences; with
    ``is_causal`` a chunk of query rows only scores the keys it can see (about half the work).

    Args:
        q: ``(B, H, Tq, D)`` queries (any leading batch dims are flattened into B).
        k: ``(B, Hk, Tk, D)`` keys.
        attn_mask: optional bool or additive float mask broadcastable to ``(B, H, Tq, Tk)``.
        is_causal: apply a causal mask (combined with ``attn_mask`` if both are given).
        scale: score scale; ``None`` means ``1/sqrt(D)``.
        enable_gqa: allow ``Hk < H`` (grouped-query attention); also accepted implicitly.
        chunk_elements: memory budget of one chunk of scores, in elements.
        row_mask: optional ``(B, Tq)`` mask of query rows that count (True/1 = counts, e.g. a Hugging Face
            2-D ``attention_mask``); rows marked False are left out of both statistics.

    Returns:
        AttentionStats with per-head tensors on q's device.
    """
    q = q.detach()
    k = k.detach()
    if q.dim() < 3 or k.dim() < 3:
        raise ValueError(f"attention_stats: q and k need shape (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dim() == 3:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
    q = q.reshape(-1, *q.shape[-3:])
    k = k.reshape(-1, *k.shape[-3:])
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    if Hk != H:
        if H % Hk:
            raise ValueError(f"attention_stats: q has {H} heads, not a multiple of the {Hk} key heads of k; "
                             "pass q (B, H, Tq, D) and k (B, Hk, Tk, D) with H % Hk == 0")
        k = k.repeat_interleave(H // Hk, dim=1)
    if k.shape[0] != B:
        k = k.expand(B, *k.shape[1:])
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    q = q.to(dtype)
    k = k.to(dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    allowed_full, bias_full = _allowed_and_bias(attn_mask, dtype)
    if allowed_full is not None:
        allowed_full = allowed_full.expand(B, H, Tq, Tk) if allowed_full.dim() == 4 else allowed_full
        if bias_full is not None and bias_full.dim() == 4:
            bias_full = bias_full.expand(B, H, Tq, Tk)
    rows_full = _query_rows(row_mask, B, Tq)
    kt = k.transpose(-2, -1)
    acc = [torch.full((H,), -math.inf, dtype=dtype, device=q.device), torch.zeros(H, dtype=dtype, device=q.device),
           torch.zeros(H, dtype=dtype, device=q.device), None]
    chunk = max(1, min(Tq, chunk_elements // max(1, B * H * Tk)))
    for i0 in range(0, Tq, chunk):
        i1 = min(Tq, i0 + chunk)
        kend = min(Tk, i1) if is_causal else Tk  # causal rows i0:i1 never see keys past i1 - 1
        s = torch.matmul(q[:, :, i0:i1], kt[..., :kend]) * scale  # (B, H, c, kend)
        allowed = None
        if allowed_full is not None:
            allowed = _rows(allowed_full, i0, i1, kend).expand_as(s)
            if bias_full is not None:
                s = s + _rows(bias_full, i0, i1, kend)
        if is_causal:
            causal = torch.ones(i1 - i0, kend, dtype=torch.bool, device=q.device).tril(diagonal=i0)
            allowed = causal if allowed is None else allowed & causal
        if rows_full is not None:
            r = rows_full[:, :, i0:i1]
            allowed = r if allowed is None else allowed & r
        _accumulate(s, None if allowed is None else ~allowed.expand_as(s), None, acc)
    return AttentionStats(acc[0], acc[1], acc[2])


def _rows(m: torch.Tensor, i0: int, i1: int, kend: int) -> torch.Tensor:
    """Query rows i0:i1 and keys :kend of a mask broadcastable to (..., Tq, Tk)."""
    m = m if m.shape[-2] == 1 else m[..., i0:i1, :]
    return m if m.shape[-1] == 1 else m[..., :kend]


def score_stats(
    scores: torch.Tensor,
    raw: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    chunk_elements: int = ATTN_CHUNK_ELEMENTS,
) -> AttentionStats:
    """Max logit and entropy per head from the materialised scores a model feeds to its softmax.

    ``scores`` is the softmax input ``(..., H, Tq, Tk)`` (3-D inputs count as one head): every bias the
    model added (ALiBi, relative position bias, soft-capping) is in it, and masked positions hold
    ``-inf`` or at most ``finfo(dtype).min / 2`` (a finfo.min mask plus any score). Allowed positions are
    the others; the row entropy is that of ``softmax(scores)`` over them, exactly as in
    ``attention_stats``.

    Args:
        scores: the softmax input, in any float dtype (16-bit is computed in float32).
        raw: optional pre-cap scores of the same shape (e.g. ``cap * tanh_input`` for a soft-capped
            model): then ``head_max`` is their max over allowed positions and ``capped_head_max`` the max
            of ``scores``.
        row_mask: optional ``(B, Tq)`` query rows that count (True = counts); leading dims of
            ``scores`` before the head dim are the batch.
        allowed: optional bool mask (True = may attend) broadcastable to ``scores``; pairs it forbids are
            masked even where the score is NaN.
        chunk_elements: memory budget of one chunk, in elements.

    Returns:
        AttentionStats with per-head tensors on the scores' device.
    """
    s = scores.detach()
    if s.dim() < 3:
        raise ValueError(f"score_stats: scores need shape (..., H, Tq, Tk); got {tuple(s.shape)}")
    s = s.reshape(-1, *s.shape[-3:])
    B, H, Tq, Tk = s.shape
    dtype = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
    floor = torch.finfo(s.dtype).min / 2
    if raw is not None:
        raw = raw.detach().expand(*scores.shape).reshape(B, H, Tq, Tk)
    rows_full = _query_rows(row_mask, B, Tq)
    if allowed is not None:
        allowed = allowed.expand(*scores.shape).reshape(B, H, Tq, Tk)
    acc = [torch.full((H,), -math.inf, dtype=dtype, device=s.device), torch.zeros(H, dtype=dtype, device=s.device),
           torch.zeros(H, dtype=dtype, device=s.device),
           None if raw is None else torch.full((H,), -math.inf, dtype=dtype, device=s.device)]
    chunk = max(1, min(Tq, chunk_elements // max(1, B * H * Tk)))
    for i0 in range(0, Tq, chunk):
        i1 = min(Tq, i0 + chunk)
        c = s[:, :, i0:i1]
        forbidden = c <= floor
        if allowed is not None:
            forbidden = forbidden | ~allowed[:, :, i0:i1]
        if rows_full is not None:
            forbidden = forbidden | ~rows_full[:, :, i0:i1]
        r = None if raw is None else raw[:, :, i0:i1].to(dtype)
        _accumulate(c.to(dtype), forbidden, r, acc)
    return AttentionStats(acc[0], acc[1], acc[2], acc[3])


def materialised_attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow, obvious reference: (max logit, mean row entropy) from the full score matrix in float64."""
    q, k = q.detach().double(), k.detach().double()
    H, Hk = q.shape[-3], k.shape[-3]
    if Hk != H:
        k = k.repeat_interleave(H // Hk, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    allowed = torch.ones_like(s, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.double()
            allowed = allowed & (attn_mask > torch.finfo(attn_mask.dtype).min / 2)
    if is_causal:
        allowed = allowed & torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril()
    s = s.masked_fill(~allowed, -math.inf)
    valid = allowed.any(-1)
    p = torch.softmax(s[valid], dim=-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return s[valid].max(), ent.mean()


def lse_stats(logits: torch.Tensor, chunk_elements: int = ATTN_CHUNK_ELEMENTS,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, max) of log Z over the counted tokens; std is the unbiased sample std (torch.std).

    ``log Z = logsumexp(z)`` over the last dim, in float32 (float64 for float64 input). Token rows are
    processed in chunks of at most ``chunk_elements`` elements, so the float32 copy of 16-bit logits and
    the temporaries of ``logsumexp`` stay bounded whatever the batch x vocabulary size (a full float32
    copy of GPT-2's 16 x 1024 x 50257 bf16 logits alone is 3.3 GB). Two-pass (centred) variance:
    log Z is large next to its spread, so sum(lse^2) - n*mean^2 would lose most digits in float32. A
    single token gives std 0.

    Args:
        logits: ``(..., vocab)``.
        chunk_elements: at most this many elements are upcast at once.
        mask: optional bool ``logits.shape[:-1]``: only positions where it is True count (their values,
            NaN included, enter all three statistics; the others are ignored whatever they hold). With
            no counted position the mean and std are NaN and the max is -inf.
    """
    z = logits.detach()
    z = z.reshape(-1, z.shape[-1])
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    if mask is not None:
        return _masked_lse_stats(z, mask, chunk_elements, dtype)
    lses, maxes = [], []
    for c in z.split(max(1, chunk_elements // max(1, z.shape[-1]))):
        c = c.to(dtype)
        lses.append(torch.logsumexp(c, dim=-1))
        maxes.append(c.amax())
    lse = torch.cat(lses) if len(lses) > 1 else lses[0]
    mean = lse.mean()
    var = (lse - mean).pow(2).sum() / max(lse.numel() - 1, 1)
    mx = torch.stack(maxes).amax() if len(maxes) > 1 else maxes[0]
    return mean, var.sqrt(), mx


def _masked_lse_stats(z: torch.Tensor, mask: torch.Tensor, chunk_elements: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lse_stats`` over the rows of ``z`` (``(N, vocab)``) where ``mask`` (N elements) is True."""
    if mask.numel() != z.shape[0]:
        raise ValueError(f"lse_stats(mask=...): mask has {mask.numel()} positions, the logits {z.shape[0]}; "
                         "pass a bool mask shaped like logits.shape[:-1]")
    keep = mask.detach().reshape(-1).to(device=z.device, dtype=torch.bool)
    lses, maxes = [], []
    for c in z.split(max(1, chunk_elements // max(1, z.shape[-1]))):
        c = c.to(dtype)
        lses.append(torch.logsumexp(c, dim=-1))
        maxes.append(c.amax(dim=-1))
    lse, row_max = torch.cat(lses), torch.cat(maxes)
    n = keep.sum().to(dtype)
    mean = torch.where(keep, lse, 0).sum() / n
    var = torch.where(keep, lse - mean, 0).pow(2).sum() / (n - 1).clamp(min=1)
    mx = torch.where(keep, row_max, float("-inf")).amax()
    return mean, var.sqrt(), mx


def nonfinite_counts(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Number of NaN/Inf elements of each tensor, ``(n,)`` (float64 for float64 inputs, else float32).

    ``count_i = ||x_i * 0||_0``: ``x * 0`` is exactly 0 where ``x`` is finite and NaN elsewhere, and the
    L0 norm counts the non-zero elements. Two ``torch._foreach_*`` calls for any number of tensors (a
    per-tensor ``isfinite().sum()`` loop costs two kernels and a Python round trip per tensor); float32
    counts are exact up to 2^24 non-finite elements per tensor. Integer tensors count 0.
    """
    out = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device if tensors else None)
    idx = [i for i, t in enumerate(tensors) if t.is_floating_point() or t.is_complex()]
    if not idx:
        return out
    ts = [tensors[i] for i in idx]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    counts = torch.stack(torch._foreach_norm(torch._foreach_mul(ts, 0.0), 0, dtype=dtype))
    if len(idx) == len(tensors):
        return counts
    return out.to(dtype).index_copy(0, torch.tensor(idx, device=out.device), counts)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square, ``sqrt(mean(x^2))``, in float32 or better."""
    x = x.detach()
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    return x.pow(2).mean().sqrt()


def batch_entropy(h: torch.Tensor, min_var: float = 1e-12) -> torch.Tensor:
    """Layer-wise batch entropy (Peer et al., 2022): mean over units of 0.5*log(2*pi*e*var).

    ``h`` is ``(..., D)``; every leading position is one sample of the ``D`` units. ``var`` is the
    unbiased variance over samples, clamped at ``min_var`` so a dead unit gives a finite value.
    """
    x = h.detach().reshape(-1, h.shape[-1])
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    var = x.var(dim=0).clamp_min(min_var)
    return (0.5 * torch.log(2 * math.pi * math.e * var)).mean()


def kurtosis(h: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the kurtosis across features, ``E[(h-mu)^4] / E[(h-mu)^2]^2``."""
    x = h.detach()
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    c2 = (x - x.mean(-1, keepdim=True)).square_()  # one temporary, squared in place
    m2 = c2.mean(-1)
    m4 = c2.square_().mean(-1)
    return (m4 / m2.pow(2).clamp_min(1e-30)).mean()


def sensitivity_threshold(lr: float, beta1: float = 0.9) -> float:
    """Edge-of-stability threshold of Adam's preconditioned sharpness: (2 + 2*beta1) / ((1 - beta1) * lr)."""
    return (2 + 2 * beta1) / ((1 - beta1) * lr)
