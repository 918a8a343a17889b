"""The early warning's shipped defaults on a model that is not in the warnings benchmark (issue 17's scenario).

    python benchmarks/warnings_external.py            # prints a table, writes results/warnings_external.json

A small GPT written here (pre-LayerNorm, fused qkv, SDPA, GELU MLP, untied head; not the proxy, not Hugging
Face), byte-level text from the Python standard library's sources, batch 16 x 64, AdamW (betas 0.9/0.95,
weight decay 0.1), clipping at 1, a linear LR ramp of ``RAMP`` steps to the peak, then flat, ``STEPS`` steps.
Peaks ``STABLE_PEAKS`` train stably and ``HIGH_PEAKS`` are high enough to break some runs; 2 seeds each, the
Monitor at every=1 and every=10 with ``EarlyWarning()`` (its defaults, nothing recalibrated). Outcomes come
from the loss alone (``detectors.label_outcome``). Reported per run: outcome, divergence step, first warning,
lead, leading signal; and the share of stable runs warned and of diverged runs warned >= 50 steps ahead.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STEPS, RAMP = 400, 300
STABLE_PEAKS = (1e-3, 3e-3, 3e-2)
HIGH_PEAKS = (0.3, 1.0)
SEEDS = (0, 1)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, 2))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.lnf(x))


def text() -> torch.Tensor:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "[a-h]*.py")))[:40]
    return torch.tensor(list(b"".join(Path(f).read_bytes() for f in files)), dtype=torch.long)


def train(peak: float, every: int, seed: int = 0, steps: int = STEPS, ramp: int = RAMP) -> dict:
    """One run with ``EarlyWarning()``; returns its outcome, losses and warnings."""
    import stabilitylab as sl
    from stabilitylab.detectors import label_outcome

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data, model = text(), GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / ramp))
    mon = sl.Monitor(model, opt, every=every, probes=[*sl.probes.DEFAULT, sl.EarlyWarning()], sinks=[])
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ix = torch.randint(len(data) - 65, (16,), generator=g)
        x = torch.stack([data[i:i + 64] for i in ix])
        y = torch.stack([data[i + 1:i + 65] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        mon.step(loss)
        losses.append(loss.item())
    warned = [e for e in mon.events if e.kind == "early_warning"]
    mon.close()
    o = label_outcome(range(len(losses)), losses)
    w = warned[0] if warned else None
    return {"peak": peak, "every": every, "seed": seed, "outcome": o.label, "diverge_step": o.diverge_step,
            "first_warning": w.step if w else None, "metric": w.extra.get("metric") if w else None,
            "module": w.module if w else None, "n_warnings": len(warned),
            "lead": (o.diverge_step - w.step) if (w and o.label == "diverged") else None,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses}


def _one(args):
    return train(*args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "warnings_external.json"))
    args = ap.parse_args()
    jobs = [(p, e, s) for e in (1, 10) for p in (*STABLE_PEAKS, *HIGH_PEAKS) for s in SEEDS]
    with ProcessPoolExecutor(args.workers) as ex:
        rows = list(ex.map(_one, jobs))
    summary = {}
    for e in (1, 10):
        r = [x for x in rows if x["every"] == e]
        stable = [x for x in r if x["outcome"] != "diverged"]
        div = [x for x in r if x["outcome"] == "diverged"]
        summary[e] = {"stable_or_spiked": len(stable), "stable_warned": sum(x["first_warning"] is not None for x in stable),
                      "diverged": len(div), "warned_50": sum((x["lead"] or -math.inf) >= 50 for x in div),
                      "warned_before": sum((x["lead"] or -math.inf) > 0 for x in div)}
    print("| every | peak LR | seed | outcome | diverge step | first warning | lead | leading signal |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['every']} | {x['peak']:g} | {x['seed']} | {x['outcome']} | {x['diverge_step']} | "
              f"{x['first_warning']} | {x['lead']} | {x['metric'] or ''} {x['module'] or ''} |")
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": STEPS, "ramp": RAMP, "summary": summary,
                                          "runs": [{k: v for k, v in x.items() if k != "losses"} for x in rows]},
                                         indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
