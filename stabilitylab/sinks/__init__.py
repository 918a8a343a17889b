"""Where records go: memory, parquet (local default), console, W&B, TensorBoard. All take the same tidy records."""

from stabilitylab.sinks.base import Null, Records, Sink, records_to_frame
from stabilitylab.sinks.console import Console
from stabilitylab.sinks.memory import Memory
from stabilitylab.sinks.parquet import Parquet, read_history


def __getattr__(name: str):
    if name == "WandB":
        from stabilitylab.sinks.wandb import WandB

        return WandB
    if name == "TensorBoard":
        from stabilitylab.sinks.tensorboard import TensorBoard

        return TensorBoard
    raise AttributeError(name)


__all__ = ["Console", "Memory", "Null", "Parquet", "Records", "Sink", "TensorBoard", "WandB", "read_history", "records_to_frame"]
