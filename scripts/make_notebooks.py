"""Write the notebooks under ``notebooks/`` (without outputs) from the cell sources below.

    python scripts/make_notebooks.py            # rewrites notebooks/*.ipynb

Every notebook reads ``STABILITYLAB_QUICK=1`` to shrink its grid (the CI test sets it: about a minute
on 2 cores); unset, it runs a study worth reading. Runs go to ``runs/notebooks/<name>`` under the
directory the notebook runs in; the sweeps resume, so a second run of a notebook reuses finished points.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

SETUP = '''\
import os
import warnings

import matplotlib.pyplot as plt
import pandas as pd

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import stabilitylab as sl  # noqa: E402
from stabilitylab import plots  # noqa: E402

QUICK = os.environ.get("STABILITYLAB_QUICK") == "1"  # CI: a small grid that runs in about a minute
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 20)
warnings.filterwarnings("ignore", category=RuntimeWarning)  # overflow in the exploding runs is data here
%matplotlib inline'''

LR_SENSITIVITY = [
    ("md", """\
# LR sensitivity: how much does a mitigation widen the range of learning rates that train?

Wortsman et al. (2023) summarise a learning-rate-vs-final-loss curve by its **LR sensitivity**: the mean,
over a log-spaced grid of peak LRs, of `min(L(lr), L0) - L*`, where `L0` is the loss at initialisation
(a diverged run counts as `L0`) and `L*` the best loss on the grid. Lower is better: the loss stays close
to its best over more of the grid.

This notebook trains the built-in proxy Transformer (pre-LN decoder, byte-level text) over a grid of
**LR x model size x {baseline, qk-layernorm, z-loss}**, then shows the LR-vs-loss curves, the
sensitivity table and the attention-logit growth that qk-layernorm is meant to stop.
Set `STABILITYLAB_QUICK=1` for a small grid (CI); the default grid takes tens of minutes on a laptop CPU."""),
    ("code", SETUP),
    ("code", '''\
if QUICK:
    grid = dict(sizes=["xxs", "xs"], lrs=[1e-2, 1e-1, 1.0], steps=60)
else:
    grid = dict(sizes=["xxs", "xs", "s"], lrs={"log_range": [1e-3, 1.0, 7]}, steps=400)
spec = sl.SweepSpec(name="lr_sensitivity", variants=["baseline", "qk_layernorm", "z_loss"],
                    batch_size=8, seq_len=32, every=5, train={"eval_batches": 4}, **grid)
print(f"{len(spec)} runs of {spec.steps} steps")'''),
    ("md", """\
`sweep` trains every grid point once into a resumable store (run it again and finished points are
skipped). The `vectorized` executor trains all LRs of one (size, variant) as a single batched model, each
member reproducing `train_one` on its own config; it records the headline signals (loss, gradient norm,
output log Z, per-layer max attention logit and entropy) every `every` steps."""),
    ("code", '''\
store = "runs/notebooks/lr_sensitivity"
runs = sl.sweep(spec, executor="vectorized", store=store, progress=False)
runs, history = sl.load_sweep(store)
table = runs.pivot_table(index=["size", "variant"], columns="lr", values="final_loss")
table.columns = [f"{c:.3g}" for c in table.columns]
table.round(3)'''),
    ("md", """\
## Final loss vs learning rate

One panel per variant, one line per size; a diverged run (non-finite, or worse than at initialisation)
is drawn at its initial loss with a red x, as the sensitivity formula counts it."""),
    ("code", "plots.lr_vs_loss(runs);"),
    ("md", """\
## LR sensitivity per size and variant

`lr_sensitivity` implements the paper's definition; `best_lr` is the grid LR with the lowest loss and
`n_diverged` counts the grid points that diverged."""),
    ("code", '''\
sens = sl.lr_sensitivity(runs, by=["size", "n_params", "variant"])
peak = (history[history["metric"] == "attn.max_logit"].merge(runs[["run_id", "size", "variant"]], on="run_id")
        .groupby(["size", "variant"])["value"].max().rename("peak_attn_logit").reset_index())
sens = sens.merge(peak, on=["size", "variant"]).sort_values(["n_params", "variant"])
sens[["size", "n_params", "variant", "lr_sensitivity", "best_lr", "best_loss", "n_diverged", "peak_attn_logit"]]'''),
    ("code", '''\
wide = sens.pivot_table(index="size", columns="variant", values="lr_sensitivity")
for variant in ("qk_layernorm", "z_loss"):
    lower = (wide[variant] < wide["baseline"]).sum()
    print(f"{variant}: LR sensitivity below baseline at {lower} of {len(wide)} sizes "
          f"(mean change {(wide[variant] - wide['baseline']).mean():+.3f} nats)")
plots.lr_sensitivity_vs_size(runs);'''),
    ("md", """\
## Attention-logit growth

The largest pre-softmax attention score (`max q.k / sqrt(d_head)` over heads and positions, max over
layers) during training of the largest size, one line per LR. Without qk-layernorm it grows by orders of
magnitude with the learning rate (attention collapses onto one key); with qk-layernorm queries and keys
are normalised before the dot product and the logits stay bounded. z-loss targets the *output* logits
(their log-partition function `log Z`), not the attention logits, so it should look like the baseline here
and differ in the output-logit drift plotted below."""),
    ("code", "plots.max_attention_logit(history, runs);"),
    ("code", '''\
ratio = sens.pivot_table(index="size", columns="variant", values="peak_attn_logit")
(ratio["baseline"] / ratio["qk_layernorm"]).rename("peak attention logit: baseline / qk_layernorm").round(1)'''),
    ("md", """\
## Output-logit drift

`logits.lse_mean` is the mean over tokens of `log Z = logsumexp(logits)`; its drift from the first
logged step is the output-logit divergence that z-loss (`1e-4 * mean(log Z^2)`) penalises."""),
    ("code", '''\
largest = runs.sort_values("n_params")["size"].iloc[-1]
plots.lse_drift(history, runs[runs["size"] == largest]);'''),
    ("md", """\
**What to read from it.** Each mitigation's effect shows up where it acts: qk-layernorm removes the
attention-logit growth at high LR, z-loss keeps `log Z` near 0. Whether that lowers LR sensitivity depends
on whether the instability it removes is what limits the high-LR runs at this scale and training length;
the printed comparison above says what this grid measured. The paper's effects grow with model size and
training length, so compare the trend across sizes, not one number."""),
]

PREDICT = [
    ("md", """\
# Predicting instability of a larger model from smaller ones

Wortsman et al. (2023) observe that signals measured early in training (for example the maximum attention
logit) follow smooth trends in model size at a fixed learning rate, so fitting them on small models
predicts where a larger model becomes unstable before training it. This notebook:

1. trains the proxy at several widths over a LR grid (baseline recipe, no clipping, long warm-up, so the
   high LRs diverge part-way through training);
2. reduces each run to early-training signals (`analysis.run_signals`);
3. fits power laws in the parameter count on the small sizes (`analysis.fit_scaling`, bootstrap
   intervals) and predicts the held-out largest size: its signals, whether it diverges at each LR and its
   critical LR (`analysis.predict_instability`), next to what its real run did;
4. replays the logged histories through the online detector `analysis.EarlyWarning` and measures how many
   steps before each divergence it warned (`analysis.evaluate_warnings`).

`STABILITYLAB_QUICK=1` runs four widths (three to fit, one held out) and a coarser LR grid for CI."""),
    ("code", SETUP),
    ("code", '''\
from stabilitylab.analysis import (evaluate_warnings, fit_scaling, lr_curves, predict_instability,
                                   run_signals)

widths = [32, 48, 64, 80] if QUICK else [32, 48, 64, 96, 128]
steps = 100 if QUICK else 300
sizes = [{"d_model": w, "n_layers": 2, "head_dim": 16, "name": f"w{w}"} for w in widths]
spec = sl.SweepSpec(name="predict", sizes=sizes, variants=["baseline"],
                    lrs={"log_range": [3e-2, 3.0, 5 if QUICK else 9]}, seeds=[0] if QUICK else [0, 1],
                    steps=steps, warmup_steps=3 * steps // 4, batch_size=8, seq_len=32, every=2,
                    train={"clip": None, "eval_batches": 4})
store = "runs/notebooks/predict_instability"
runs = sl.sweep(spec, executor="vectorized", store=store, progress=False)
runs, history = sl.load_sweep(store)
print(f"{len(runs)} runs, {runs['diverged'].sum()} diverged; sizes (parameters):",
      runs.groupby("size")["n_params"].first().sort_values().to_dict())'''),
    ("md", """\
## Per-run signals

`attn_logit` is the max attention logit over layers and over the first quarter of training;
`lse_drift` the early drift rate of the mean output `log Z` (nats per step). Both are measured long
before the high-LR runs diverge."""),
    ("code", '''\
sig = run_signals(runs, history).merge(runs[["run_id", "size", "n_params", "lr", "seed", "diverged"]])
sig.pivot_table(index="lr", columns="size", values="attn_logit").map("{:.3g}".format)'''),
    ("md", """\
## A scaling fit, extrapolated to the held-out size

At one learning rate, fit `log10(attn_logit) = a + b log10(N)` on the smaller sizes; the band is the
95% residual-bootstrap interval, the red star the held-out size's measured value."""),
    ("code", '''\
order = runs.groupby("size")["n_params"].first().sort_values()
held, n_held = order.index[-1], float(order.iloc[-1])
lr = sorted(runs["lr"].unique())[len(runs["lr"].unique()) // 2]
train = sig[(sig["lr"] == lr) & (sig["size"] != held)].groupby("n_params", as_index=False)["attn_logit"].median()
fit = fit_scaling(train, "n_params", "attn_logit", n_boot=1000)
obs = sig[(sig["lr"] == lr) & (sig["size"] == held)]["attn_logit"].median()
print(f"lr={lr:.3g}: attn_logit ~ N^{fit.exponent:.2f} (95% CI {fit.exponent_interval[0]:.2f}..{fit.exponent_interval[1]:.2f}),"
      f" R^2={fit.r2:.3f}")
print(fit.extrapolate(n_held).round(3).to_string(index=False), f"\\nobserved at {held}: {obs:.4g}")
plots.scaling_fit(fit, holdout=(n_held, obs), title=f"early max attention logit at lr={lr:.3g}");'''),
    ("md", """\
## Predictions for the held-out size vs its real runs

For each signal and LR: the extrapolated value and interval vs the observed one; `size unstable`: the
parameter count at which the trend crosses the instability level (the smallest value among the small
runs that diverged) vs whether the held-out size diverged (`observed` 1/0); `critical lr at target`: the
smallest LR whose extrapolated signal reaches that level, vs the held-out size's measured critical-LR
interval (`observed_lo`..`observed_hi`). `consistent` says whether prediction and observation agree."""),
    ("code", '''\
pred = predict_instability(runs, history, n_boot=1000)
pred.round(4)'''),
    ("code", '''\
crit = pred[pred["prediction"] == "critical lr at target"]
for r in crit.itertuples():
    print(f"{r.signal:10s}: predicted critical LR {r.predicted:.3g} [{r.lo:.3g}, {r.hi:.3g}]   "
          f"observed between {r.observed_lo:.3g} and {r.observed_hi:.3g}   consistent={r.consistent}")
judged = pred["consistent"].dropna()
print(f"\\n{int(judged.sum())} of {len(judged)} checkable predictions agree with the held-out runs")
lr_curves(runs)[["size", "n_params", "opt_lr", "opt_loss", "critical_lr_lo", "critical_lr_hi", "n_diverged"]]'''),
    ("md", """\
## Early warning: lead time before divergence

`evaluate_warnings` replays each run's logged signals (up to its divergence step: the first non-finite
loss or a loss above 10x its running minimum) through `EarlyWarning`, the same detector that runs live as a
Monitor probe. Lead time = divergence step - first warning step; on runs that did not diverge a warning
is a false alarm."""),
    ("code", '''\
per_run, summary = evaluate_warnings(runs, history, min_lead=10)
print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
per_run.merge(runs[["run_id", "size", "lr"]]).query("diverge_step == diverge_step or outcome == 'false_alarm'")[
    ["size", "lr", "diverge_step", "first_warning", "lead_steps", "outcome"]].sort_values(["size", "lr"])'''),
    ("code", '''\
diverged = per_run.dropna(subset=["diverge_step"]).merge(runs[["run_id", "n_params"]])
if len(diverged):
    rid = diverged.sort_values(["lead_steps", "n_params"], ascending=False)["run_id"].iloc[0]
    plots.warning_timeline(history, rid)
else:
    print("no run diverged on this grid: widen the LR range to see warnings")'''),
    ("md", """\
**Reading the results.** A prediction is only as good as its trend: with few sizes the bootstrap band is
wide and the notebook reports it rather than a point. The divergence boundary itself is fractal in the
hyperparameters (Sohl-Dickstein, 2024), so the observed critical LR is an interval between grid points;
a finer LR grid or more seeds narrow both sides. Early-warning lead times are in optimizer steps and
depend on the logging interval (`every`)."""),
]

MONITOR_HF = [
    ("md", """\
# Monitoring a Hugging Face model

A small `LlamaForCausalLM` built from a config (no download; grouped-query attention, SDPA), trained on
byte-level text, first in a plain PyTorch loop with `stabilitylab.Monitor`, then with the HF `Trainer`
and `stabilitylab.integrations.hf.StabilityCallback`. The Monitor finds the attention modules through
the HF adapter and records per-layer attention logits from q and k even though SDPA never materialises
the scores.

W&B is optional and off by default: set `STABILITYLAB_WANDB=1` to also log into an offline W&B run
(`wandb sync` uploads it later)."""),
    ("code", SETUP),
    ("code", '''\
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from stabilitylab.integrations.hf import StabilityCallback
from stabilitylab.proxy import ByteData

USE_WANDB = os.environ.get("STABILITYLAB_WANDB") == "1"
steps, every, seq = (40, 5, 32) if QUICK else (400, 10, 128)


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64 if QUICK else 128, intermediate_size=172 if QUICK else 344,
        num_hidden_layers=2 if QUICK else 4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=seq, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))


data = ByteData(seq_len=seq)
model = llama()
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")'''),
    ("md", """\
## 1. A plain loop

Three lines added to an ordinary loop: build the Monitor, `mon.step(loss)` after the optimizer step,
close it. Gradient metrics are the values before `clip_grad_norm_`."""),
    ("code", '''\
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
sched = sl.mitigations.warmup_cosine(opt, warmup=steps // 10, total=steps)
sinks = [sl.sinks.Parquet("runs/notebooks/hf_plain")]
if USE_WANDB:
    sinks.append(sl.sinks.WandB(project="stabilitylab-notebooks", mode="offline"))
mon = sl.Monitor(model, optimizer=opt, every=every, sinks=sinks, run_id="llama-plain")
print("attention modules:", mon.probe("attention").covered)
gen = torch.Generator().manual_seed(0)
for step in range(steps):
    x, _ = data.batch("train", 8, gen)
    loss = model(input_ids=x, labels=x).loss  # HF shifts the labels inside
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    mon.step(loss)
mon.close()
plain = mon.history()
print(f"{len(plain)} records, metrics: {sorted(plain['metric'].unique())}")'''),
    ("md", """\
The tidy history has one row per (step, metric, module). A wide view of the headline signals (max over
modules):"""),
    ("code", '''\
HEADLINE = ["loss", "attn.max_logit", "attn.entropy", "logits.lse_mean", "grad.global_norm", "update.ratio",
            "adam.eps_dominance"]
wide = plain.pivot_table(index="step", columns="metric", values="value", aggfunc="max")
wide[[c for c in HEADLINE if c in wide.columns]]'''),
    ("code", '''\
def show(history, title):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, metric in zip(axes, ["attn.max_logit", "logits.lse_mean", "grad.rms"]):
        h = history[history["metric"] == metric]
        for module, g in h.groupby("module"):
            if metric != "grad.rms" or module.endswith(("q_proj.weight", "k_proj.weight")):
                ax.plot(g["step"], g["value"], lw=1, label=module or "model")
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


show(plain, "plain loop: per-layer attention logits, output log Z, grad RMS of q/k projections");'''),
    ("md", """\
## 2. The Trainer callback

The same signals from a `Trainer` run: one callback, no change to the training code. Steps are the
Trainer's optimizer steps (with gradient accumulation, `grad.global_norm` is the norm of the accumulated
gradient, before clipping, as the Trainer's own `grad_norm`). With `report_to="wandb"` the callback logs
into the Trainer's W&B run."""),
    ("code", '''\
x, _ = data.batch("train", 8 * steps, torch.Generator().manual_seed(1))
train_set = [{"input_ids": ids, "labels": ids} for ids in x]
callback = StabilityCallback(every=every, run_id="llama-trainer")
args = TrainingArguments(output_dir="runs/notebooks/hf_trainer", max_steps=steps, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=steps // 10,
                         max_grad_norm=1.0, logging_steps=every, save_strategy="no", use_cpu=True,
                         report_to="wandb" if USE_WANDB else "none", disable_tqdm=True, seed=0)
if USE_WANDB:
    os.environ.setdefault("WANDB_MODE", "offline")
trainer = Trainer(model=llama(), args=args, train_dataset=train_set, callbacks=[callback])
trainer.train()
trainer_hist = callback.monitor.history()
tw = trainer_hist.pivot_table(index="step", columns="metric", values="value", aggfunc="max")
tw[[c for c in HEADLINE if c in tw.columns]]'''),
    ("code", 'show(trainer_hist, "Trainer + StabilityCallback");'),
    ("md", """\
The callback's `grad.global_norm` is the same quantity as the `grad_norm` the Trainer logs itself (the
norm of the accumulated gradient before clipping), at the same step numbers:"""),
    ("code", '''\
theirs = pd.Series({r["step"]: r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r}, name="Trainer grad_norm")
ours = trainer_hist[trainer_hist["metric"] == "grad.global_norm"].set_index("step")["value"].rename("grad.global_norm")
both = pd.concat([theirs, ours], axis=1, join="inner")
print("largest relative difference:", float(((both.iloc[:, 0] - both.iloc[:, 1]).abs() / both.iloc[:, 0]).max()))
both'''),
    ("md", """\
The records are also on disk as parquet (`<output_dir>/stabilitylab/history/`), readable with pandas
alone:"""),
    ("code", '''\
disk = sl.sinks.read_history("runs/notebooks/hf_trainer/stabilitylab")
print(len(disk), "records on disk;", "same as in memory:", len(disk) == len(trainer_hist))'''),
]

NOTEBOOKS = {"lr_sensitivity.ipynb": LR_SENSITIVITY, "predict_instability.ipynb": PREDICT,
             "monitor_hf_model.ipynb": MONITOR_HF}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook (no outputs) with a python3 kernelspec."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [(nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell)(textwrap.dedent(src))
                for kind, src in cells]
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i}"
    return nb


def main() -> None:
    out = ROOT / "notebooks"
    out.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), out / name)
        print(out / name)


if __name__ == "__main__":
    main()
