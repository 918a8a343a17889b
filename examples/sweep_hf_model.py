"""An LR-sensitivity sweep of *your* model: a tiny Hugging Face GPT-2 trained by your own loop.

``sweep(spec, train_fn=train_gpt2)`` calls ``train_gpt2(config, monitor)`` once per grid point, where
``config`` is the point's ``TrainConfig`` (lr, seed, steps, ... and ``config.model`` with d_model,
n_layers, head_dim, seq_len, qk_layernorm, ...) and ``monitor(model, optimizer)`` returns a
``stabilitylab.Monitor`` for that run. The GPT-2 is built from a config (no weights are downloaded).

    python examples/sweep_hf_model.py --steps 60 --store runs/hf_gpt2
    python examples/sweep_hf_model.py --quick          # 2 LRs, 15 steps (CI)
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import stabilitylab as sl
from stabilitylab.mitigations.schedules import warmup_cosine
from stabilitylab.proxy import ByteData


@torch.no_grad()
def _eval_loss(model: GPT2LMHeadModel, data: ByteData, config: sl.TrainConfig) -> float:
    g = torch.Generator().manual_seed(config.seed + 7919)
    losses = [model(x, labels=x).loss for x, _ in
              (data.batch("val", config.batch_size, g) for _ in range(config.eval_batches))]
    return float(torch.stack(losses).mean())


def train_gpt2(config: sl.TrainConfig, monitor) -> dict:
    """Train a byte-level GPT-2 of the point's shape; return final and initial held-out loss."""
    m = config.model
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=256, n_positions=m.seq_len, n_embd=m.d_model, n_layer=m.n_layers,
        n_head=m.d_model // m.head_dim, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))
    data = ByteData(m.seq_len, config.data_path)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                            eps=config.eps, weight_decay=config.weight_decay)
    sched = warmup_cosine(opt, config.warmup_steps, config.steps, floor=min(1.0, config.min_lr / config.lr))
    init_loss = _eval_loss(model, data, config)
    mon = monitor(model, opt)
    gen = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        x, _ = data.batch("train", config.batch_size, gen)
        loss = model(x, labels=x).loss  # HF shifts the labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mon.step(loss)
        if step % 10 == 0 and not math.isfinite(float(loss.detach())):
            return {"final_loss": float("nan"), "init_loss": init_loss, "steps_done": step + 1}
    return {"final_loss": _eval_loss(model, data, config), "init_loss": init_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--store", default="runs/hf_gpt2")
    ap.add_argument("--executor", default="local", choices=["local", "processes", "ray"])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="2 LRs, 15 steps")
    args = ap.parse_args()
    if args.quick:
        args.steps = 15
    spec = sl.SweepSpec(name="hf_gpt2", lrs=[1e-2, 1e-1] if args.quick else {"log_range": [1e-3, 3e-1, 4]},
                        sizes=[{"d_model": 32, "n_layers": 2, "head_dim": 16, "name": "gpt2-32"}],
                        variants=["baseline"], steps=args.steps, batch_size=8, seq_len=32,
                        train={"eval_batches": 4})
    runs = sl.sweep(spec, executor=args.executor, workers=args.workers, store=args.store, train_fn=train_gpt2)
    print(runs[["size", "lr", "n_params", "final_loss", "init_loss", "status"]].to_string(index=False))
    print(sl.lr_sensitivity(runs[runs["status"] != "failed"]).round(4).to_string(index=False))
    history = sl.load_sweep(args.store)[1]
    peak = history[history["metric"] == "attn.max_logit"].groupby("run_id")["value"].max()
    print("peak attention logit per run:", peak.round(2).to_dict())


if __name__ == "__main__":
    main()
