"""The early warning's shipped defaults on models that are not in the warnings benchmark (issue 17's scenario).

    python benchmarks/warnings_external.py            # prints tables, writes results/warnings_external.json
    python benchmarks/warnings_external.py --pool runs/ext_pool   # keeps each run's history; a second call with
                                                      # the same --pool replays them (seconds, not ~25 min)

Models: ``gpt``, a small GPT written here (pre-LayerNorm, fused qkv, SDPA, GELU MLP, untied head; not the
proxy, not Hugging Face); ``llama``, a Hugging Face ``LlamaForCausalLM`` built from a small config (RMSNorm,
RoPE, SwiGLU, grouped-query attention); ``neox``, a Hugging Face ``GPTNeoXForCausalLM`` (parallel attention and
MLP, partial rotary, LayerNorm). None is a family the benchmark trains; ``neox`` was added last and looked at
by no one before its numbers were written (gpt and llama runs were used while trying detector changes,
none of which was kept). Byte-level text from the
Python standard library's sources, batch 16 x 64, AdamW (betas 0.9/0.95, weight decay 0.1), clipping at 1,
``STEPS`` steps under two schedules: ``ramp300`` (a linear LR ramp of 300 steps to the peak, then flat) and
``warm50_cos`` (50 warm-up steps, then cosine to 0.1 x the peak). Peaks ``PEAKS`` span stable to breaking, 2
seeds each. Each run trains once with the Monitor at every=1 and ``EarlyWarning()`` (its defaults, nothing
recalibrated) live; the every=10 result replays the same defaults on the history subsampled to the steps a
Monitor with every=10 logs (probes never change training), and ``INTERVALS`` the same at every=2, 3, 5, 7 and 20.
``MARGINS`` replays both intervals with ``EarlyWarning(margin=m)``: the lead-time vs false-alarm trade-off on
models the defaults never saw (at every=1 the margin scales the sustained rule, ``Calibration.also``, alike);
``VARIANTS`` the same with the other adoptable settings (``min_metrics``, ``persist``) changed instead (they apply
to the main rule; the sustained rule keeps its own). ``--models falcon phi3 gemma3`` trains ``HELDOUT_MODELS``, added after the
defaults were fixed; ``--steps/--peaks/--schedules`` change the runs (e.g. long stable runs: ``--steps 3000
--peaks 0.001 0.003 --schedules warm50_cos``). Outcomes come from the loss alone
(``detectors.label_outcome``). Reported per run: outcome, divergence step, first warning, lead, leading signal;
per model and interval: the share of runs that did not diverge with any warning, and of diverged runs warned
before and >= 50 steps before the divergence (and how many diverged after step 100, where 50 steps of lead
after the 60-step burn-in are possible at all).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

STEPS, RAMP = 600, 300
PEAKS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
SEEDS = (0, 1)
MODELS = ("gpt", "llama", "neox")
#: Further held-out families (``--models qwen2 opt``): Qwen2 (RMSNorm, RoPE, qkv bias, GQA, tied embeddings) and
#: OPT (learned positions, ReLU MLP, LayerNorm); not in the default run or its committed JSON.
MORE_MODELS = ("qwen2", "opt")
#: Families added after every detector default was fixed (``--models falcon phi3 gemma3``): Falcon with ALiBi
#: (parallel attention and MLP, multi-query attention), Phi-3 (fused qkv and gate-up projections, RMSNorm, RoPE)
#: and Gemma 3 (RMSNorm with (1 + w), q/k norms, sliding-window layers, scaled embeddings); looked at once.
HELDOUT_MODELS = ("falcon", "phi3", "gemma3")
MARGINS = (1.0, 1.25, 1.5, 2.0)
#: Other settings replayed at every=1 and every=10 (``variants`` in the JSON): name -> ``EarlyWarning`` arguments.
#: (The every=10 default is min_metrics=1 at margin 2, every=1's min_metrics=2 at margin 1; the committed JSONs'
#: every=10 defaults and variants were replayed at margin 1.25, every=10's default until margin 2 was chosen on them.)
#: ``loss_gate=G``: the loss gate (``DetectorConfig.loss_gate``; 0.1 the default, chosen by ``warnings_gate.py``).
VARIANTS = {"min_metrics=2": {"min_metrics": 2}, "min_metrics=2, margin=1": {"min_metrics": 2, "margin": 1.0},
            "persist=10": {"persist": 10},
            **{f"loss_gate={g:g}": {"loss_gate": g} for g in (0.0, 0.05, 0.1, 0.15)}}
#: Further logging intervals the defaults are replayed at (``intervals`` in the JSON): the calibrations were made
#: at every=1 and every=10 only, and a detector takes the one whose slope window is nearest its own.
INTERVALS = (2, 3, 5, 7, 20)
SCHEDULES = {"ramp300": (RAMP, "flat"), "warm50_cos": (50, "cos")}


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


def lr_factor(warm: int, kind: str, steps: int):
    """LR multiplier of step ``t``: linear warm-up over ``warm`` steps, then flat or cosine to 0.1."""
    def f(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        return 1.0 if kind == "flat" else 0.1 + 0.45 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))
    return f


#: Special token ids inside the byte vocabulary (some configs default to ids of their own 32k+ vocabularies).
_BYTE_IDS = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
#: Hugging Face families: name -> (config class, model class, config fields beyond the shared shape: 2 layers of
#: width 64, 4 heads, 64 positions, byte vocabulary, SDPA).
HF_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 172, "num_key_value_heads": 2}),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"intermediate_size": 256}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"intermediate_size": 172, "num_key_value_heads": 2,
                                                  "tie_word_embeddings": True}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 256, "word_embed_proj_dim": 64, "dropout": 0.0,
                                            "attention_dropout": 0.0, "activation_function": "relu"}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"alibi": True, **_BYTE_IDS}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"intermediate_size": 172, "num_key_value_heads": 2, **_BYTE_IDS}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"intermediate_size": 172, "num_key_value_heads": 2,
                                                         "head_dim": 16, "query_pre_attn_scalar": 16,
                                                         "sliding_window": 32, **_BYTE_IDS}),
}


def build(model: str):
    """``(module to monitor, forward: ids -> logits)`` of a named model."""
    if model == "gpt":
        m = GPT()
        return m, m
    if model in HF_FAMILIES:
        import transformers

        config_cls, model_cls, kw = HF_FAMILIES[model]
        m = getattr(transformers, model_cls)(getattr(transformers, config_cls)(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            attn_implementation="sdpa", **kw))
        return m, lambda x: m(input_ids=x).logits
    raise ValueError(f"model={model!r}: choose from {(*MODELS, *MORE_MODELS, *HELDOUT_MODELS)}")


def train(peak: float, every: int = 1, seed: int = 0, steps: int = STEPS, ramp: int = RAMP, model: str = "gpt",
          schedule: str | None = None, history: bool = False) -> dict:
    """One run with ``EarlyWarning()`` live; returns its outcome, losses and warnings (``history``: and the
    Monitor's tidy history, for replays at other intervals)."""
    import stabilitylab as sl
    from stabilitylab.detectors import label_outcome

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    warm, kind = SCHEDULES[schedule] if schedule else (ramp, "flat")
    data = text()
    net, fwd = build(model)
    opt = torch.optim.AdamW(net.parameters(), lr=peak, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(warm, kind, steps))
    mon = sl.Monitor(net, opt, every=every, probes=[*sl.probes.DEFAULT, sl.EarlyWarning()], sinks=[],
                     keep_history=history)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ix = torch.randint(len(data) - 65, (16,), generator=g)
        x = torch.stack([data[i:i + 64] for i in ix])
        y = torch.stack([data[i + 1:i + 65] for i in ix])
        loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        mon.step(loss)
        losses.append(loss.item())
    warned = [e for e in mon.events if e.kind == "early_warning"]
    hist = mon.history() if history else None
    mon.close()
    o = label_outcome(range(len(losses)), losses)
    out = {"model": model, "schedule": schedule or f"ramp{ramp}", "peak": peak, "seed": seed, "outcome": o.label,
           "diverge_step": o.diverge_step, "losses": losses, "history": hist,
           "loss_first": losses[0], "loss_last": losses[-1]}
    out[every] = _first(warned, out)
    return out


def _first(warned: list, run: dict) -> dict:
    """The first warning of a run and its lead (divergence step minus warning step) when the run diverged."""
    w = warned[0] if warned else None
    return {"first_warning": w.step if w else None, "metric": w.extra.get("metric") if w else None,
            "module": w.module if w else None, "n_warnings": len(warned),
            "lead": (run["diverge_step"] - w.step) if (w and run["outcome"] == "diverged") else None}


def replay(run: dict, every: int, margin: float | None = None, calibration=None, **settings) -> dict:
    """The defaults (``margin``: with that margin; ``calibration``: those thresholds; ``settings``: other
    ``EarlyWarning`` arguments) replayed on a run's every=1 history subsampled to every ``every`` steps."""
    import stabilitylab as sl

    h = run["history"]
    ew = sl.EarlyWarning(margin=margin, calibration=calibration, **settings)
    return _first(ew.replay(h[h["step"] % every == 0]), run)


def nearest_interval_rule() -> dict:
    """The shipped calibrations without their recorded windows: a detector then takes the nearest logging
    interval (the rule before ``Calibration.window``: every=4-8 took every=10's)."""
    from dataclasses import replace as _replace

    from stabilitylab.detectors import DEFAULT_CALIBRATIONS

    return {k: _replace(c, window=0) for k, c in DEFAULT_CALIBRATIONS.items()}


def _pooled(model: str, schedule: str, peak: float, seed: int, pool: str | None, steps: int = STEPS) -> dict:
    """A run with its every=1 history: trained (and, with ``pool``, saved there as ``NAME.parquet`` +
    ``NAME.json``), or read back from ``pool`` where an earlier call saved it; a pooled run's every=1 result is
    the replay of its history (the live probe and the replay run the same detector code)."""
    name = f"{model}_{schedule}_{peak:g}_{seed}" + (f"_{steps}steps" if steps != STEPS else "")
    meta, hist = (Path(pool) / f"{name}.json", Path(pool) / f"{name}.parquet") if pool is not None else (None, None)
    if meta is not None and meta.is_file():
        r = json.loads(meta.read_text())
        r["history"] = pd.read_parquet(hist)
        r[1] = replay(r, 1)
        return r
    r = train(peak, 1, seed, steps, model=model, schedule=schedule, history=True)
    if meta is not None:
        meta.parent.mkdir(parents=True, exist_ok=True)
        r["history"].to_parquet(hist)
        meta.write_text(json.dumps({k: v for k, v in r.items() if k not in ("history", 1)}))
    return r


def _one(args):
    r = _pooled(*args)
    for e in (10, *INTERVALS):
        r[e] = replay(r, e)
    old = nearest_interval_rule()
    for e in INTERVALS:
        r[("interval_rule", e)] = replay(r, e, calibration=old)
    for e in (1, 10):
        for m in MARGINS:
            r[(e, m)] = replay(r, e, m)
        for name, kw in VARIANTS.items():
            r[("variant", e, name)] = replay(r, e, **kw)
    r.pop("history")
    return r


def _key_columns(e) -> dict:
    """The columns naming a result key of ``summarise``."""
    if isinstance(e, int):
        return {"every": e}
    if e[0] == "interval_rule":
        return {"every": e[1], "rule": "nearest interval"}
    if e[0] == "variant":
        return {"every": e[1], "settings": e[2]}
    return {"every": e[0], "margin": e[1]}


def summarise(rows: list[dict], keys=(1, 10)) -> list[dict]:
    """Per model and result key (a logging interval, ``(interval, margin)``, ``("interval_rule", interval)`` or ``("variant", interval, VARIANTS name)``): runs that did not diverge with
    any warning; diverged runs warned."""
    out = []
    for model in dict.fromkeys(x["model"] for x in rows):
        r = [x for x in rows if x["model"] == model]
        quiet = [x for x in r if x["outcome"] != "diverged"]
        div = [x for x in r if x["outcome"] == "diverged"]
        late = [x for x in div if x["diverge_step"] > 100]
        for e in keys:
            out.append({"model": model, **_key_columns(e), "not_diverged": len(quiet),
                        "not_diverged_warned": sum(x[e]["first_warning"] is not None for x in quiet),
                        "diverged": len(div), "diverged_after_100": len(late),
                        "warned_before": sum((x[e]["lead"] or -math.inf) > 0 for x in div),
                        "warned_50": sum((x[e]["lead"] or -math.inf) >= 50 for x in div),
                        "median_lead": float(np.median([x[e]["lead"] for x in div if (x[e]["lead"] or -1) > 0]))
                        if any((x[e]["lead"] or -1) > 0 for x in div) else None})
    return out


def main() -> int:
    from stabilitylab.report import markdown_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, *MORE_MODELS, *HELDOUT_MODELS])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "warnings_external.json"))
    ap.add_argument("--steps", type=int, default=STEPS, help=f"steps per run (default {STEPS})")
    ap.add_argument("--peaks", type=float, nargs="+", default=list(PEAKS), help="peak LRs")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    ap.add_argument("--pool", default=None, help="folder to keep each run's history in (parquet); runs already "
                    "there are replayed instead of trained again, e.g. to measure changed detector settings")
    args = ap.parse_args()
    jobs = [(m, sch, p, s, args.pool, args.steps) for m in args.models for sch in args.schedules for s in SEEDS
            for p in args.peaks]
    with ProcessPoolExecutor(args.workers) as ex:
        rows = list(tqdm(ex.map(_one, jobs), total=len(jobs), desc="external runs", unit="run"))
    summary = summarise(rows)
    tradeoff = summarise(rows, [(e, m) for e in (1, 10) for m in MARGINS])
    variants = summarise(rows, [("variant", e, name) for e in (1, 10) for name in VARIANTS])
    intervals = summarise(rows, INTERVALS)
    interval_rule = summarise(rows, [("interval_rule", e) for e in INTERVALS])
    table = [{"model": x["model"], "schedule": x["schedule"], "peak": x["peak"], "seed": x["seed"],
              "outcome": x["outcome"], "diverge_step": x["diverge_step"], "every": e,
              **{k: x[e][k] for k in ("first_warning", "lead", "metric", "module")}}
             for e in (1, 10) for x in rows]
    print(markdown_table(pd.DataFrame(table)))
    print()
    print(markdown_table(pd.DataFrame(summary)))
    print()
    print(markdown_table(pd.DataFrame(tradeoff)))
    print()
    print(markdown_table(pd.DataFrame(variants)))
    print()
    print(markdown_table(pd.DataFrame(intervals)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "schedules": {k: SCHEDULES[k] for k in args.schedules},
                                          "peaks": args.peaks, "seeds": SEEDS,
                                          "margins": MARGINS, "models": args.models,
                                          "summary": summary, "tradeoff": tradeoff, "variants": variants, "intervals": intervals,
                                          "intervals_nearest_interval_rule": interval_rule,
                                          "runs": table}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
