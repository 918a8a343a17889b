"""Studies built on sweeps and analysis: the warnings benchmark (``warnings_bench``)."""
