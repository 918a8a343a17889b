"""Studies built on sweeps and analysis (the layer below the CLI):

- ``demo``: ``stabilitylab demo``, a small LR-sensitivity study on the proxy (baseline vs qk-layernorm);
- ``reproduce``: ``stabilitylab reproduce``, the five studies of Wortsman et al. (2023) and their report;
- ``coord_check``: the muP coordinate check (activation scale vs width);
- ``sweep_summary``: ``log_sweep_summary``, a sweep's LR-sensitivity tables and figures to W&B;
- ``warnings_bench`` (with ``warnings_report``): the early-warning benchmark across instability mechanisms.
"""
