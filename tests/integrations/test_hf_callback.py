"""Hugging Face Trainer callback: steps, grad norm and loss equal what the Trainer itself logs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it (transformers[torch])

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import stabilitylab as sl  # noqa: E402
from stabilitylab.integrations.hf import StabilityCallback  # noqa: E402


def _trainer(tmp_path, callback, report_to="none", max_steps=4, accumulation=2, max_grad_norm=0.05):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(32):
        ids = torch.randint(0, 64, (16,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, max_steps=max_steps, logging_steps=1,
                             report_to=report_to, use_cpu=True, save_strategy="no", learning_rate=3e-3,
                             max_grad_norm=max_grad_norm, disable_tqdm=True, seed=0, run_name="hf-test")
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def _logged(trainer, key):
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def _values(history, metric, module=""):
    rows = history[(history["metric"] == metric) & (history["module"] == module)]
    return dict(zip(rows["step"].tolist(), rows["value"].tolist()))


def test_grad_norm_loss_and_steps_equal_trainer_logs_under_accumulation_and_clipping(tmp_path):
    cb = StabilityCallback(every=2)
    trainer = _trainer(tmp_path, cb)
    trainer.train()
    hist = cb.monitor.history()

    assert sorted(hist["step"].unique()) == [2, 4]
    grad_norm = _logged(trainer, "grad_norm")
    assert min(grad_norm.values()) > 10 * trainer.args.max_grad_norm  # clipping was active on every step
    got = _values(hist, "grad.global_norm")
    assert got == pytest.approx({s: grad_norm[s] for s in (2, 4)}, rel=1e-5)
    assert _values(hist, "loss") == pytest.approx({s: _logged(trainer, "loss")[s] for s in (2, 4)}, rel=1e-5)
    assert _values(hist, "lr") == pytest.approx({s: _logged(trainer, "learning_rate")[s] for s in (2, 4)})

    # the Trainer handed over accelerate's wrapper: the values above came from the optimizer inside it
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    attention = {n for n, m in trainer.model.named_modules() if type(m).__name__ == "GPT2Attention"}
    assert set(hist.loc[hist["metric"] == "attn.max_logit", "module"]) == attention
    assert set(hist.loc[hist["metric"] == "act.rms", "module"]) == {"transformer.h.0", "transformer.h.1"}

    # the default Parquet sink under output_dir holds the same records; the monitor is closed
    cols = ["step", "metric", "module", "value"]
    pq = sl.sinks.read_history(tmp_path / "out" / "stabilitylab")[cols]
    key = ["step", "metric", "module"]
    pd.testing.assert_frame_equal(pq.sort_values(key).reset_index(drop=True),
                                  hist[cols].sort_values(key).reset_index(drop=True))
    with pytest.raises(RuntimeError, match="closed"):
        cb.monitor.step()


def test_report_to_wandb_puts_signals_in_the_trainers_run(wandb_offline, tmp_path):
    import wandb

    cb = StabilityCallback(every=1)
    trainer = _trainer(tmp_path, cb, report_to="wandb", max_steps=2, accumulation=1, max_grad_norm=1.0)
    trainer.train()
    wandb.finish()
    hist = cb.monitor.history()

    (run,) = wandb_offline()
    assert run["config"]["stabilitylab"]["framework"] == "transformers"
    assert run["config"]["learning_rate"] == 3e-3  # the Trainer's own config, same run
    hf_rows = [r for r in run["history"] if "train/loss" in r]
    assert [r["train/global_step"] for r in hf_rows] == [1, 2]
    ours = {r["stabilitylab/step"]: r for r in run["history"] if "grad.global_norm/model" in r}
    assert sorted(ours) == [1, 2]
    for metric, module in [("grad.global_norm", ""), ("loss", ""), ("attn.max_logit", "transformer.h.1.attn")]:
        for step, value in _values(hist, metric, module).items():
            assert ours[step][f"{metric}/{module or 'model'}"] == value
    for step, r in ours.items():
        assert r["grad.global_norm/model"] == pytest.approx(_logged(trainer, "grad_norm")[step], rel=1e-5)
