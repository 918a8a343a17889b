"""Monitor attention in *your own* model: one ``stabilitylab.record_qk`` call where attention is computed.

``GQAAttention`` below is user code: grouped-query attention (8 query heads share 2 key/value heads),
a hand-written softmax, a causal mask combined with a key-padding mask. It hands its q and k to
stabilitylab with the same arguments SDPA would take (``attn_mask``: True = may attend)::

    stabilitylab.record_qk(q, k, attn_mask=allowed, enable_gqa=True, module=self)

The call costs nothing on steps the Monitor does not log. To show the numbers are exact, each attention
module keeps its materialised scores of the last forward, and after training the script compares, per
layer, the Monitor's ``attn.max_logit`` (max of the allowed scores) and ``attn.entropy`` (mean over
query rows of the softmax entropy, nats) with the same statistics computed here in float64. It exits
with an error if they differ.

    python examples/custom_model.py --quick
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import stabilitylab as sl
from stabilitylab.proxy import ByteData


class GQAAttention(nn.Module):
    """Causal grouped-query self-attention with a key-padding mask, written out by hand."""

    stabilitylab_records_qk = True  # tells the Monitor's attention probe this module reports via record_qk

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_kv_heads * self.hd, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.last_scores: torch.Tensor | None = None  # kept only so this example can check the Monitor

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:  # x: (B, T, C), pad: (B, T) bool
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)                 # (B, H, T, hd)
        k, v = self.kv(x).view(B, T, 2, self.n_kv, self.hd).permute(2, 0, 3, 1, 4)      # (B, Hkv, T, hd)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = causal & ~pad[:, None, None, :]                                         # (B, 1, T, T)
        sl.record_qk(q, k, attn_mask=allowed, enable_gqa=True, module=self)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
        s = s.masked_fill(~allowed, float("-inf"))
        self.last_scores = s.detach()
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


class TinyLM(nn.Module):
    def __init__(self, d_model: int = 64, n_layers: int = 2, n_heads: int = 8, n_kv_heads: int = 2):
        super().__init__()
        self.emb = nn.Embedding(256, d_model)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(d_model), "attn": GQAAttention(d_model, n_heads, n_kv_heads),
            "ln2": nn.LayerNorm(d_model), "mlp": nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                                               nn.Linear(4 * d_model, d_model))})
            for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)

    def forward(self, idx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for blk in self.layers:
            h = h + blk["attn"](blk["ln1"](h), pad)
            h = h + blk["mlp"](blk["ln2"](h))
        return self.head(self.ln_f(h))


def reference_stats(scores: torch.Tensor) -> tuple[float, float]:
    """(max allowed score, mean over query rows with an allowed key of the softmax entropy), float64."""
    s = scores.double()
    rows = torch.isfinite(s).any(-1)
    s = s[rows]
    p = s.softmax(-1)
    ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    return s[torch.isfinite(s)].max().item(), ent.mean().item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 steps")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args(argv)
    steps = 30 if args.quick else args.steps

    torch.manual_seed(0)
    model = TinyLM()
    data = ByteData(seq_len=48)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    mon = sl.Monitor(model, optimizer=opt, every=args.every, probes=["attention", "logits", "optimizer", "health"])
    print("attention modules found:", mon.probe("attention").covered)
    last: dict = {}
    for step in range(steps):
        x, y = data.batch("train", 8, gen)
        pad = torch.arange(x.shape[1]) >= x.shape[1] - torch.randint(0, 12, (x.shape[0], 1), generator=gen)
        logits = model(x, pad)
        loss = F.cross_entropy(logits[~pad], y[~pad])                   # padded positions are not trained
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        logged = mon.step(loss)
        if logged:
            refs = {f"layers.{i}.attn": reference_stats(b["attn"].last_scores) for i, b in enumerate(model.layers)}
            last = {"step": step, "logged": logged, "refs": refs}
    mon.close()

    print(f"\nstep {last['step']}: Monitor (record_qk) vs materialised scores (float64)")
    print(f"{'module':16s} {'max_logit':>12s} {'reference':>12s} {'entropy':>10s} {'reference':>10s}")
    worst = 0.0
    for name, (ref_max, ref_ent) in last["refs"].items():
        got_max, got_ent = last["logged"][("attn.max_logit", name)], last["logged"][("attn.entropy", name)]
        print(f"{name:16s} {got_max:12.6f} {ref_max:12.6f} {got_ent:10.6f} {ref_ent:10.6f}")
        worst = max(worst, abs(got_max - ref_max) / abs(ref_max), abs(got_ent - ref_ent) / abs(ref_ent))
    print(f"largest relative difference: {worst:.2e}")
    if not worst < 1e-4:
        raise SystemExit(f"record_qk statistics differ from the materialised scores (relative {worst:.2e})")


if __name__ == "__main__":
    main()
