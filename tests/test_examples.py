"""Every script in examples/ runs with ``--quick`` in a fresh process, as a user would start it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
CHECKED_BELOW = {"plain_loop.py", "custom_model.py"}  # run with --quick by their own tests, which check output


def run_script(path: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2",
           "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run([sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{path.name} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_the_documented_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert names >= {"plain_loop.py", "hf_trainer.py", "lightning_module.py", "sweep_ray.py", "custom_model.py"}


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.name not in CHECKED_BELOW], ids=lambda p: p.stem)
def test_example_runs_with_quick(path, tmp_path):
    run_script(path, tmp_path, "--quick")


@pytest.mark.slow
def test_plain_loop_writes_a_readable_parquet_history(tmp_path):
    from stabilitylab.sinks import read_history

    out = run_script(ROOT / "examples" / "plain_loop.py", tmp_path, "--quick", "--every", "5", "--out", "pl").stdout
    h = read_history(tmp_path / "pl")
    assert sorted(h["step"].unique()) == list(range(0, 40, 5))
    for metric in ("loss", "attn.max_logit", "logits.lse_mean", "grad.global_norm", "adam.eps_dominance"):
        assert metric in set(h["metric"]), metric
    assert f"{len(h)} records" in out


@pytest.mark.slow
def test_custom_model_record_qk_matches_materialised_scores(tmp_path):
    out = run_script(ROOT / "examples" / "custom_model.py", tmp_path, "--quick").stdout
    assert "'layers.0.attn': 'record_qk'" in out and "'layers.1.attn': 'record_qk'" in out
    rel = float(out.rsplit("largest relative difference:", 1)[1].split()[0])
    assert rel < 1e-4


@pytest.mark.slow
def test_make_gallery_quick_writes_every_standard_figure(tmp_path):
    import matplotlib.image as mpimg

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_gallery import GALLERY
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = run_script(ROOT / "scripts" / "make_gallery.py", tmp_path, "--quick", "--out", "g", "--store", "s").stdout
    for name in GALLERY:
        png = tmp_path / "g" / name
        assert str(Path("g") / name) in out
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
        assert img[..., :3].std() > 0.01, f"{name} is blank"


def test_committed_gallery_has_every_standard_figure():
    import matplotlib.image as mpimg

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_gallery import GALLERY
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for name in GALLERY:
        assert mpimg.imread(ROOT / "docs" / "gallery" / name).shape[0] > 100, name
