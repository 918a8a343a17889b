"""Adapters: where attention q/k and output logits live in each model family."""

from stabilitylab.adapters.base import ADAPTERS, AttentionAdapter, SelfReportingAdapter, register_adapter
from stabilitylab.adapters.generic import record_qk

__all__ = ["ADAPTERS", "AttentionAdapter", "SelfReportingAdapter", "record_qk", "register_adapter"]
