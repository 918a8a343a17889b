"""stabilitylab: diagnose, predict and mitigate Transformer training instabilities.

    import stabilitylab as sl
    mon = sl.Monitor(model, optimizer=opt, every=10, sinks=[sl.sinks.Parquet("runs/exp1")])
    ...
    mon.step(loss)
"""

from stabilitylab import metrics, mitigations, probes, sinks
from stabilitylab.adapters import record_qk, register_adapter
from stabilitylab.analysis import (
    EarlyWarning,
    evaluate_warnings,
    fit_scaling,
    lr_curves,
    lr_sensitivity,
    predict,
    predict_instability,
)
from stabilitylab.distributed import UnsupportedParallelismError
from stabilitylab.monitor import Monitor
from stabilitylab.probes.logits import loss_mask
from stabilitylab.proxy import ProxyConfig, ProxyTransformer, TrainConfig, train_one
from stabilitylab.proxy.vectorized import train_many
from stabilitylab.sweeps import SweepSpec, load_sweep, sweep

__version__ = "0.1.0"

__all__ = ["Monitor", "ProxyConfig", "ProxyTransformer", "TrainConfig", "__version__", "lr_sensitivity",
           "metrics", "mitigations", "probes", "record_qk", "register_adapter", "sinks", "train_one",
           "SweepSpec", "load_sweep", "sweep", "train_many", "UnsupportedParallelismError",
           "EarlyWarning", "evaluate_warnings", "fit_scaling", "lr_curves", "predict", "predict_instability",
           "loss_mask"]
