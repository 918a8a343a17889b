"""Watch a Lightning run with stabilitylab: one callback, gradients measured before Lightning clips them.

The built-in proxy Transformer learns byte-level text inside a LightningModule whose ``training_step``
calls ``self.model`` (Lightning never calls ``forward``). With automatic optimization Lightning runs
forward and backward inside the closure it passes to ``optimizer.step``; ``grad.global_norm`` is still
the pre-clipping norm, accumulated over ``accumulate_grad_batches``.

    python examples/lightning_module.py --quick     # tiny model, 20 steps, CPU, seconds
    python examples/lightning_module.py --wandb     # WandbLogger; the signals land in its run
                                                    # (WANDB_MODE=offline works without an account)

Records: ``<out>/stabilitylab/history/*.parquet`` (``stabilitylab.sinks.read_history(path)``).
"""

from __future__ import annotations

import argparse

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger
except ImportError:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

from stabilitylab.integrations.lightning import StabilityCallback
from stabilitylab.proxy import ProxyTransformer, preset
from stabilitylab.proxy.data import ByteData

HEADLINE = ["loss", "grad.global_norm", "attn.max_logit", "logits.lse_mean", "update.ratio"]


class ByteLM(pl.LightningModule):
    def __init__(self, size: str, lr: float, steps: int):
        super().__init__()
        self.model = ProxyTransformer(preset(size))
        self.lr, self.steps = lr, steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.steps, pct_start=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and 20 steps (CPU, seconds)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300; 20 with --quick)")
    p.add_argument("--every", type=int, default=5, help="log every N optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--out", default="runs/lightning", help="default_root_dir (records go to <out>/stabilitylab)")
    p.add_argument("--wandb", action="store_true", help="log with a WandbLogger; the signals land in its run")
    args = p.parse_args(argv)

    size, steps = ("xxs", 20) if args.quick else ("xs", args.steps)
    torch.manual_seed(0)
    module = ByteLM(size, args.lr, steps)
    seq = module.model.cfg.seq_len
    data = ByteData(seq_len=seq, max_bytes=400_000 if args.quick else 4_000_000)
    x, y = data.batch("train", 8 * steps, torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4, shuffle=False)

    callback = StabilityCallback(every=args.every)
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=1.0,
                         accelerator="cpu" if args.quick else "auto", devices=1, callbacks=[callback],
                         logger=WandbLogger(project="stabilitylab-examples") if args.wandb else False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=args.out)
    trainer.fit(module, loader)

    history = callback.monitor.history()
    table = history.pivot_table(index="step", columns="metric", values="value", aggfunc="max")
    print(table[[c for c in HEADLINE if c in table.columns]].to_string(float_format="{:.4g}".format))
    print(f"\n{len(history)} records ({history['metric'].nunique()} metrics, "
          f"{history['module'].nunique()} modules) in {args.out}/stabilitylab")


if __name__ == "__main__":
    main()
