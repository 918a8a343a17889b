"""Keep KV caches out of the extra forward passes that probes and mitigations run.

An extra pass (QK-clip's before-forward measurement, the sharpness probe's replay of the last forward)
must never receive a live KV cache: it would append this step's keys and values to it, so the real
forward then attends over stale, detached copies (Hugging Face transformers 5.x passes the cache as
``cache=``, 4.x as ``past_key_values=`` / ``layer_past=``). Caches are found by what they are, not by the
keyword's name: an instance of transformers' ``Cache`` base class when transformers is imported, or any
object with the cache methods ``update`` and ``get_seq_length``, anywhere in the positional or keyword
arguments; each is replaced by ``None``, and ``use_cache=False`` is passed where the callee accepts it.
The extra pass therefore sees only the current input's keys, never keys carried over from earlier calls.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

#: Keyword names that carried a legacy (tuple) KV cache in transformers 4.x.
_LEGACY_CACHE_KWARGS = frozenset({"past_key_values", "past_key_value", "layer_past"})


def is_cache(obj: Any) -> bool:
    """True for a KV-cache object: a transformers ``Cache`` or anything with ``update`` and ``get_seq_length``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return False
    cache_utils = sys.modules.get("transformers.cache_utils")
    base = getattr(cache_utils, "Cache", None)
    if isinstance(base, type) and isinstance(obj, base):
        return True
    return callable(getattr(obj, "update", None)) and callable(getattr(obj, "get_seq_length", None))


def without_caches(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Copies of ``(args, kwargs)`` for an extra call of ``fn`` that can touch no KV cache.

    Every cache object (see :func:`is_cache`) and every legacy cache keyword (``past_key_values``,
    ``past_key_value``, ``layer_past``) becomes ``None``; ``use_cache`` becomes ``False``, passed by
    keyword when ``fn``'s signature has the parameter (or takes ``**kwargs`` and the caller passed it)
    and it is not already given positionally.

    Args:
        fn: the callable the arguments are for (a module's ``forward``, or the module itself).
        args: positional arguments of the original call.
        kwargs: keyword arguments of the original call.

    Returns:
        New ``(args, kwargs)``; the originals are not modified.
    """
    new_args = tuple(None if is_cache(a) else a for a in args)
    new_kwargs = {k: (None if k in _LEGACY_CACHE_KWARGS or is_cache(v) else v) for k, v in kwargs.items()}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    names = list(params)
    if "use_cache" in params:
        at = names.index("use_cache")
        kind = params["use_cache"].kind
        positional = kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if positional and at < len(new_args):
            new_args = new_args[:at] + (False,) + new_args[at + 1:]
        elif kind is not inspect.Parameter.POSITIONAL_ONLY:
            new_kwargs["use_cache"] = False
    elif "use_cache" in new_kwargs:
        new_kwargs["use_cache"] = False
    return new_args, new_kwargs
