"""``stabilitylab reproduce``: the main findings of Wortsman et al. (2023) on the proxy, with one command.

    stabilitylab reproduce --scale quick            # CPU: 42k .. 134k parameters fitted, 1.25M held out, 400 steps
    stabilitylab reproduce --scale full             # one GPU: 0.66M .. 10.8M fitted, 101M held out, 2000 steps

Five studies (shared/reference/papers.md section 1), each a resumable sweep store under ``--out``:

1. ``attention``: LR sensitivity and peak max attention logit per size and LR, without / with qk-layernorm.
2. ``output_logits``: weight decay 0, without / with z-loss 1e-4: drift of ``logits.lse_mean`` (log Z)
   and divergence.
3. ``interventions``: long warm-up, independent weight decay, simple muP and all mitigations combined
   vs the baseline: LR sensitivity per size.
4. ``adam_eps``: global gradient RMS vs size (from study 1's baseline runs) and its extrapolation to
   Adam's eps; eps 1e-8 vs 1e-15 vs Adam-atan2 at the largest size.
5. ``prediction``: ``analysis.predict(holdout="largest")`` on study 1: fit on the smaller sizes, predict
   the largest one's critical / largest stable LR and its peak attention logit per LR, and compare with
   its real runs (``prediction.json``, figure ``prediction_heldout``).

The largest size is the held-out one: ``Scale.small_studies`` lists the studies that skip it (at quick
scale everything but study 1, since it costs more than all other sizes together), and study 1 trains the
fitted sizes with ``Scale.seeds`` and the held-out size with ``Scale.heldout_seeds``.

A point's run id depends only on its size, variant and config, so a run that two studies share (e.g.
the baseline grid of studies 1 and 3) is trained once and copied into the other store, and re-running
skips every finished run. Outputs: ``report.html`` (self-contained), ``report.md``, the figures
(``*.png``), ``findings.parquet`` / ``findings.md`` and one parquet file per table under ``tables/``.

The package, by concern: ``scales`` (``Scale``, ``SCALES``, ``STUDIES``), ``studies`` (the sweeps of each
study and running them), ``findings`` (per-run numbers, tables and findings), ``report`` (figures and the
HTML / markdown report), ``run`` (``reproduce()``) and ``cli`` (the subcommand).
"""

from stabilitylab.studies.reproduce.cli import add_parser
from stabilitylab.studies.reproduce.findings import (
    analyse_adam_eps,
    analyse_attention,
    analyse_interventions,
    analyse_output_logits,
    analyse_prediction,
    run_summary,
    sensitivity_parts,
)
from stabilitylab.studies.reproduce.run import Reproduction, reproduce
from stabilitylab.studies.reproduce.scales import SCALES, STUDIES, TRAINING_STUDIES, Scale
from stabilitylab.studies.reproduce.studies import default_executor, run_study, study_specs

__all__ = [
    "SCALES", "STUDIES", "TRAINING_STUDIES", "Reproduction", "Scale", "add_parser", "analyse_adam_eps",
    "analyse_attention", "analyse_interventions", "analyse_output_logits", "analyse_prediction",
    "default_executor", "reproduce", "run_study", "run_summary", "sensitivity_parts", "study_specs",
]
