"""Adapters: where attention q/k and output logits live in each model family.

The registry ``ADAPTERS`` is tried in order: modules that call ``record_qk`` themselves (the proxy),
Hugging Face attention modules (``hf``), ``torch.nn.MultiheadAttention`` (``mha``), and any other
module whose forward calls ``scaled_dot_product_attention`` (``sdpa``).
"""

from stabilitylab.adapters.base import ADAPTERS, AttentionAdapter, SelfReportingAdapter, register_adapter
from stabilitylab.adapters.generic import record_qk
from stabilitylab.adapters.hf import HFAdapter
from stabilitylab.adapters.mha import MHAAdapter, mha_qk
from stabilitylab.adapters.sdpa import SDPAAdapter, SDPACapture

ADAPTERS.extend([HFAdapter(), MHAAdapter(), SDPAAdapter()])

__all__ = ["ADAPTERS", "AttentionAdapter", "HFAdapter", "MHAAdapter", "SDPAAdapter", "SDPACapture",
           "SelfReportingAdapter", "mha_qk", "record_qk", "register_adapter"]
