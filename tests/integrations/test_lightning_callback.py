"""Lightning callback: pre-clipping gradients through the closure, accumulation, attention, WandbLogger."""

from __future__ import annotations

import os

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from stabilitylab.integrations.lightning import StabilityCallback  # noqa: E402
from stabilitylab.proxy import ProxyConfig, ProxyTransformer  # noqa: E402


class TinyLM(pl.LightningModule):
    """Calls ``self.model`` in ``training_step`` and never defines ``forward`` (the common layout)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = ProxyTransformer(ProxyConfig(d_model=32, n_layers=2, head_dim=16, seq_len=16))
        self.pre_clip_norm: dict[int, float] = {}
        self.micro_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.micro_losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # what the module sees before Lightning clips: float64 reference norm of step global_step + 1
        sq = sum(p.grad.double().pow(2).sum() for p in self.parameters() if p.grad is not None)
        self.pre_clip_norm[self.trainer.global_step + 1] = float(sq.sqrt())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit(tmp_path, callback, logger=False, max_steps=3, accumulate=2, clip=0.01):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (16,), generator=g), torch.randint(0, 256, (16,), generator=g))
            for _ in range(32)]
    module = TinyLM()
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[callback],
                         default_root_dir=str(tmp_path), log_every_n_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return module, trainer


def _values(history, metric, module=""):
    rows = history[(history["metric"] == metric) & (history["module"] == module)]
    return dict(zip(rows["step"].tolist(), rows["value"].tolist()))


def test_closure_gradients_are_pre_clipping_and_accumulated(tmp_path):
    cb = StabilityCallback(every=1, sinks=[])
    module, trainer = _fit(tmp_path, cb)
    hist = cb.monitor.history()

    assert sorted(hist["step"].unique()) == [1, 2, 3] and trainer.global_step == 3
    assert min(module.pre_clip_norm.values()) > 10 * 0.01  # clipping changed every step's gradient
    assert _values(hist, "grad.global_norm") == pytest.approx(module.pre_clip_norm, rel=1e-5)
    # loss = mean of the step's two micro-batch losses
    ml = module.micro_losses
    assert _values(hist, "loss") == pytest.approx({s: (ml[2 * s - 2] + ml[2 * s - 1]) / 2 for s in (1, 2, 3)})

    # training_step calls self.model, never forward: attention, blocks and logits are still recorded,
    # named relative to the model (the callback monitors the module's only child)
    assert set(hist.loc[hist["metric"] == "attn.max_logit", "module"]) == {"blocks.0.attn", "blocks.1.attn"}
    assert sorted(_values(hist, "logits.lse_mean")) == [1, 2, 3]
    assert set(hist.loc[hist["metric"] == "grad.rms", "module"]) == {
        n for n, _ in module.model.named_parameters()}


def test_module_argument_is_validated():
    with pytest.raises(ValueError, match="every"):
        StabilityCallback(every=0)
    from stabilitylab.integrations.lightning import monitored_module

    with pytest.raises(ValueError, match="module='nope'"):
        monitored_module(TinyLM(), "nope")


def test_wandb_logger_run_is_reused(wandb_offline, tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="t", offline=True, save_dir=os.environ["WANDB_DIR"])
    cb = StabilityCallback(every=1)  # default sinks: Parquet + WandB into the logger's run
    _fit(tmp_path, cb, logger=logger, max_steps=2, accumulate=1, clip=None)
    wandb.finish()
    hist = cb.monitor.history()

    (run,) = wandb_offline()
    assert run["config"]["stabilitylab"]["framework"] == "lightning"
    assert any("train_loss" in r for r in run["history"])  # the logger's own metric, same run
    ours = {r["stabilitylab/step"]: r for r in run["history"] if "grad.global_norm/model" in r}
    assert sorted(ours) == [1, 2]
    for metric, module in [("grad.global_norm", ""), ("loss", ""), ("attn.max_logit", "blocks.0.attn")]:
        for step, value in _values(hist, metric, module).items():
            assert ours[step][f"{metric}/{module or 'model'}"] == value
    assert (tmp_path / "stabilitylab" / "history").is_dir()
