"""The example sweep specs in examples/sweeps/ parse and run end to end (shrunk to two grid points)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stabilitylab.cli import main
from stabilitylab.sweeps import load_sweep
from stabilitylab.sweeps.cli import EXAMPLE_SPECS
from stabilitylab.sweeps.spec import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "examples" / "sweeps").glob("*.toml"))


def _shrink(spec: SweepSpec) -> SweepSpec:
    """The same spec on two points (first size; first and last variant, or the first two LRs), 4 steps."""
    d = spec.to_dict()
    variants = [d["variants"][0], d["variants"][-1]] if len(d["variants"]) > 1 else d["variants"]
    lrs = d["lrs"][-1:] if len(variants) > 1 else d["lrs"][:2]
    train = {**d["train"], "eval_batches": 1}
    return SweepSpec.from_dict({**d, "sizes": d["sizes"][:1], "variants": variants, "lrs": lrs, "seeds": [0],
                                "steps": 4, "batch_size": 2, "every": 2, "warmup_steps": 1, "train": train})


def test_help_points_to_every_example_spec(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert sorted(EXAMPLE_SPECS) == sorted(str(p.relative_to(ROOT)) for p in SPECS)
    for rel in EXAMPLE_SPECS:
        assert rel in out


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_example_spec_runs_through_the_cli_on_a_tiny_grid(path, tmp_path, monkeypatch):
    spec = SweepSpec.from_toml(path)
    assert len(spec) >= 4  # the full study is a real grid
    tiny = _shrink(spec)
    assert len(tiny) == 2
    tiny.to_toml(tmp_path / "tiny.toml")
    args = ["sweep", str(tmp_path / "tiny.toml"), "--store", str(tmp_path / "store"), "--no-progress"]
    if path.stem == "hf_model":
        monkeypatch.syspath_prepend(str(ROOT / "examples"))  # what PYTHONPATH=examples does
        args += ["--train-fn", "sweep_hf_model:train_gpt2"]
    assert main(args) == 0
    runs, history = load_sweep(tmp_path / "store")
    assert sorted(runs["run_id"]) == sorted(p.run_id for p in tiny.points())
    assert set(runs["status"]) <= {"ok", "diverged"}
    assert set(runs["size"]) == {tiny.points()[0].size} and set(runs["variant"]) == {p.variant for p in tiny.points()}
    assert sorted(history["step"].unique()) == [0, 2]
    assert (history["metric"] == "attn.max_logit").any()
