"""Watch a Hugging Face Trainer run with stabilitylab: one callback, no change to the training code.

A GPT-2 built from a config (no download) learns byte-level text (the Python standard library's
sources). The callback records attention logits, output log Z, activation / gradient / update norms and
Adam eps dominance every ``--every`` optimizer steps, under the Trainer's own step numbers.

    python examples/hf_trainer.py --quick           # tiny model, 20 steps, CPU, seconds
    python examples/hf_trainer.py --wandb           # also into the Trainer's W&B run (report_to="wandb";
                                                    # WANDB_MODE=offline works without an account)

Records: ``<out>/stabilitylab/history/*.parquet`` (``stabilitylab.sinks.read_history(path)``).
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from stabilitylab.integrations.hf import StabilityCallback
from stabilitylab.proxy.data import ByteData

HEADLINE = ["loss", "grad.global_norm", "attn.max_logit", "logits.lse_mean", "update.ratio"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and 20 steps (CPU, seconds)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300; 20 with --quick)")
    p.add_argument("--every", type=int, default=5, help="log every N optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--out", default="runs/hf_trainer", help="Trainer output_dir (records go to <out>/stabilitylab)")
    p.add_argument("--wandb", action="store_true", help="report_to='wandb': signals land in the Trainer's run")
    args = p.parse_args(argv)

    layers, width, seq, steps = (2, 64, 64, 20) if args.quick else (4, 128, 128, args.steps)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=4, n_embd=width, vocab_size=256,
                                       n_positions=seq, bos_token_id=0, eos_token_id=0))
    data = ByteData(seq_len=seq, max_bytes=400_000 if args.quick else 4_000_000)
    g = torch.Generator().manual_seed(0)
    x, _ = data.batch("train", 8 * steps, g)
    train = [{"input_ids": ids, "labels": ids} for ids in x]  # GPT-2 shifts the labels itself

    callback = StabilityCallback(every=args.every)
    targs = TrainingArguments(output_dir=args.out, max_steps=steps, per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, learning_rate=args.lr, warmup_steps=steps // 10,
                              max_grad_norm=1.0, logging_steps=args.every, save_strategy="no", use_cpu=args.quick,
                              report_to="wandb" if args.wandb else "none", disable_tqdm=True, seed=0)
    Trainer(model=model, args=targs, train_dataset=train, callbacks=[callback]).train()

    history = callback.monitor.history()
    table = history.pivot_table(index="step", columns="metric", values="value", aggfunc="max")
    print(table[[c for c in HEADLINE if c in table.columns]].to_string(float_format="{:.4g}".format))
    print(f"\n{len(history)} records ({history['metric'].nunique()} metrics, "
          f"{history['module'].nunique()} modules) in {args.out}/stabilitylab")


if __name__ == "__main__":
    main()
