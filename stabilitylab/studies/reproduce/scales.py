"""Scales of a reproduction (sizes, learning rates, run length) and the names of its studies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STUDIES = ("attention", "output_logits", "interventions", "adam_eps", "prediction")
#: Studies that train runs (the others analyse study 1's store).
TRAINING_STUDIES = ("attention", "output_logits", "interventions", "adam_eps")


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Sizes, learning rates and run length of a reproduction."""

    name: str
    """Label (the default output folder is ``runs/reproduce_<name>``)."""
    sizes: tuple
    """``SweepSpec`` sizes (preset names or dicts), smallest first; at least 3 (4 give prediction intervals)."""
    lrs: tuple[float, ...]
    """Peak learning-rate grid."""
    steps: int
    """Optimizer steps per run."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    every: int = 10
    """Monitor logging interval in steps."""
    long_warmup: float = 0.4
    """Warm-up of the ``long_warmup`` variant as a fraction of ``steps`` (the baseline warms up for 10%)."""
    high_lr: float = 1e-2
    """LRs at or above this count as "high" in the findings."""
    seeds: tuple[int, ...] = (0,)
    """Seeds of the attention study (the prediction's bootstrap resamples them); other studies use the first."""
    heldout_seeds: tuple[int, ...] | None = None
    """Seeds of the largest (held-out) size in the attention study (None: ``seeds``)."""
    small_studies: tuple[str, ...] = ()
    """Training studies that skip the largest size (the held-out one, by far the most expensive to train)."""

    def __post_init__(self) -> None:
        if len(self.sizes) < 3:
            raise ValueError(f"Scale(sizes={self.sizes!r}): need >= 3 sizes (2 to fit a trend, 1 to predict)")
        for name in ("seeds", "heldout_seeds"):
            v = getattr(self, name)
            if v is not None and (not v or any(not isinstance(s, int) or s < 0 for s in v)):
                raise ValueError(f"Scale({name}={v!r}): need a non-empty tuple of ints >= 0")
        bad = [s for s in self.small_studies if s not in TRAINING_STUDIES]
        if bad:
            raise ValueError(f"Scale(small_studies={self.small_studies!r}): {bad} are not training studies; "
                             f"choose from {', '.join(TRAINING_STUDIES)}")
        if len(self.lrs) < 2 or any(not (isinstance(v, float) and v > 0) for v in self.lrs):
            raise ValueError(f"Scale(lrs={self.lrs!r}): need >= 2 positive float learning rates")
        if not 0 < self.long_warmup < 1:
            raise ValueError(f"Scale(long_warmup={self.long_warmup!r}): must be a fraction in (0, 1)")


#: Peak LRs 10^-2.5 .. 10^0, one grid step = a factor sqrt(10).
_LRS = tuple(float(v) for v in np.logspace(-2.5, 0, 6))
SCALES: dict[str, Scale] = {
    # head dim 16 at every size; the held-out d128 L6 has 9.4x the parameters of the largest fitted size.
    "quick": Scale(name="quick", sizes=({"name": "d32L2", "d_model": 32, "n_layers": 2, "head_dim": 16},
                                        {"name": "d48L2", "d_model": 48, "n_layers": 2, "head_dim": 16},
                                        {"name": "d64L2", "d_model": 64, "n_layers": 2, "head_dim": 16},
                                        {"name": "d128L6", "d_model": 128, "n_layers": 6, "head_dim": 16}),
                   lrs=_LRS, steps=400, batch_size=8, seq_len=32, seeds=tuple(range(8)), heldout_seeds=(0,),
                   small_studies=("output_logits", "interventions", "adam_eps")),
    # head dim 64; the held-out d1024 L8 (~101M) has 9.4x the parameters of "l" (~10.8M).
    "full": Scale(name="full", sizes=("s", "m", "l", {"name": "d1024L8", "d_model": 1024, "n_layers": 8,
                                                      "head_dim": 64}),
                  lrs=tuple(float(v) for v in np.logspace(-3.5, 0, 8)), steps=2000, batch_size=32, seq_len=64,
                  seeds=(0, 1, 2), heldout_seeds=(0, 1)),
}

