"""Issue 17's complaint, checked on the shipped defaults: a small GPT that is not in the package
(``benchmarks/warnings_external.py``: not the proxy, not Hugging Face), byte-level text from the standard
library, a linear LR ramp of 300 steps to a peak that trains stably. The old detector warned 3 of 4 such runs;
the defaults must warn none, at every=1 and every=10."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location(
    "warnings_external", Path(__file__).parents[2] / "benchmarks" / "warnings_external.py")
ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ext)


@pytest.mark.parametrize("peak,every", [(1e-3, 1), (3e-3, 10)])
def test_defaults_do_not_warn_a_stable_lr_ramp_of_a_gpt_not_written_in_the_package(peak, every):
    r = ext.train(peak, every, steps=400)
    losses = r["losses"]
    assert r["outcome"] == "stable" and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 2.0  # it learned (5.5 nats at init -> ~2.4)
    w = r[every]
    assert w["n_warnings"] == 0, (w["first_warning"], w["metric"], w["module"])
