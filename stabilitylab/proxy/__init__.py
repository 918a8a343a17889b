"""The built-in proxy Transformer, its byte-level data and ``train_one``."""

from stabilitylab.proxy import surgery  # noqa: F401 - registers the proxy's qk-layernorm / QK-clip surgery
from stabilitylab.proxy.data import ByteData, load_corpus
from stabilitylab.proxy.model import ProxyConfig, ProxyTransformer
from stabilitylab.proxy.presets import PRESETS, preset
from stabilitylab.proxy.train import RunResult, TrainConfig, build_optimizer, evaluate, train_one

__all__ = ["PRESETS", "ByteData", "ProxyConfig", "ProxyTransformer", "RunResult", "TrainConfig",
           "build_optimizer", "evaluate", "load_corpus", "preset", "train_one"]
