"""stabilitylab in a plain PyTorch loop: three added lines (build the Monitor, ``mon.step(loss)``, close).

The built-in proxy Transformer learns byte-level text (the Python standard library's sources) at a
high peak LR; every ``--every`` steps the Monitor records attention logits, output log Z, activation /
gradient / update norms and Adam eps dominance, to ``<out>/history/*.parquet`` and to memory.

    python examples/plain_loop.py --quick          # 40 steps, seconds on a CPU
    python examples/plain_loop.py --lr 0.3         # watch the attention logits grow
"""

from __future__ import annotations

import argparse

import torch

import stabilitylab as sl
from stabilitylab.mitigations import warmup_cosine
from stabilitylab.proxy import ByteData, ProxyTransformer, preset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 40 steps")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--every", type=int, default=10, help="log every N steps")
    p.add_argument("--out", default="runs/plain_loop", help="parquet records go to <out>/history")
    args = p.parse_args(argv)
    steps = 40 if args.quick else args.steps

    torch.manual_seed(0)
    model = ProxyTransformer(preset("xxs" if args.quick else "s", seq_len=64))
    data = ByteData(seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    sched = warmup_cosine(opt, warmup=steps // 10, total=steps)
    gen = torch.Generator().manual_seed(0)

    mon = sl.Monitor(model, optimizer=opt, every=args.every, sinks=[sl.sinks.Parquet(args.out)])
    for _ in range(steps):
        x, y = data.batch("train", 16, gen)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # grad metrics are the pre-clipping values
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mon.step(loss)                                            # no host sync on non-logged steps
    mon.close()

    h = mon.history()
    wide = h.pivot_table(index="step", columns="metric", values="value", aggfunc="max")
    cols = ["loss", "attn.max_logit", "logits.lse_mean", "grad.global_norm", "update.ratio", "adam.eps_dominance"]
    print(wide[[c for c in cols if c in wide.columns]].to_string(float_format="{:.4g}".format))
    print(f"\n{len(h)} records, {h['metric'].nunique()} metrics, {h['module'].nunique()} modules; "
          f"parquet: {args.out}/history (stabilitylab.sinks.read_history)")


if __name__ == "__main__":
    main()
