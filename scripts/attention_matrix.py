"""Measure the attention probe on every Hugging Face family x implementation; write the README table's numbers.

Runs the same cases as ``tests/adapters/test_hf_families.py`` (tiny float64 models, one logged step,
compared with the scores each model's explicit attention path normalises) and writes
``benchmarks/results/attention_matrix.json``: per case the modules found, the modules expected, the
largest relative error over ``attn.max_logit`` / ``attn.entropy`` (and ``attn.max_logit_capped`` under a
soft-cap), and the stabilitylab warnings raised. Usage::

    python scripts/attention_matrix.py [--flex]   # --flex adds HF flex_attention (compiles, ~1 min, float32)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "adapters"))

from _hf_families import FAMILIES, run_case  # noqa: E402


def main() -> None:
    """Run every case and write the JSON next to the other benchmark results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flex", action="store_true", help="also run llama with flex_attention (float32)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attention_matrix.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    rows = []
    for family, fam in FAMILIES.items():
        for impl in fam.impls:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = run_case(family, impl)
            row = {"family": family, "impl": impl, "found": r["covered"] == r["expected"],
                   "n_found": len(r["covered"]), "n_expected": len(r["expected"]),
                   "max_rel_error": r["max_rel_error"], "dtype": "float64",
                   "warnings": [str(w.message) for w in caught if "stabilitylab" in str(w.message)]}
            rows.append(row)
            print(f"{family:13s} {impl:6s} found {row['n_found']}/{row['n_expected']}  "
                  f"max rel. error {row['max_rel_error']:.1e}")
    if args.flex:
        from _hf_families import build, inputs, reference

        import stabilitylab as sl

        model = build("llama", "flex_attention")
        x = inputs("llama")
        ref = reference("llama", "eager", model.state_dict(), x)
        with sl.Monitor(model, every=1, probes=["attention"]) as mon:
            with torch.no_grad():
                model(**x)
            vals = mon.step()
        err = max(abs(vals[(f"attn.{m}", n)] - v) / abs(v) for n, r in ref.items() for m, v in r.items())
        rows.append({"family": "llama", "impl": "flex_attention", "found": True, "n_found": len(ref),
                     "n_expected": len(ref), "max_rel_error": err, "dtype": "float32", "warnings": []})
        print(f"llama         flex   found {len(ref)}/{len(ref)}  max rel. error {err:.1e} (float32)")
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "cases": rows}
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
