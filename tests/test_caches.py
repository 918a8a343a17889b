"""KV caches never reach an extra forward pass: detection by type and by duck typing, use_cache off."""

from __future__ import annotations

import torch

from stabilitylab._caches import is_cache, without_caches


class _DuckCache:
    """Has the cache methods but no transformers base class."""

    def update(self, key, value, layer_idx=0):
        return key, value

    def get_seq_length(self, layer_idx=0):
        return 0


def _attention(hidden, cache=None, mask=None, use_cache=False, **kwargs):
    return hidden


def test_caches_are_found_by_type_and_by_duck_typing():
    from transformers.cache_utils import DynamicCache

    assert is_cache(DynamicCache()) and is_cache(_DuckCache())
    for not_cache in (None, True, 3, "cache", torch.zeros(2), (torch.zeros(1), torch.zeros(1)), {"update": 1}):
        assert not is_cache(not_cache)


def test_without_caches_replaces_caches_under_any_keyword_and_turns_use_cache_off():
    h, mask, cache = torch.ones(2), torch.zeros(2), _DuckCache()
    args, kwargs = (h, cache), {"mask": mask, "renamed_cache": _DuckCache(), "layer_past": (h, h), "extra": 1}
    new_args, new_kwargs = without_caches(_attention, args, kwargs)
    assert new_args[0] is h and new_args[1] is None
    assert new_kwargs == {"mask": mask, "renamed_cache": None, "layer_past": None, "extra": 1, "use_cache": False}
    assert args[1] is cache and isinstance(kwargs["renamed_cache"], _DuckCache)  # originals untouched
    # use_cache given positionally is replaced in place, never passed twice
    new_args, new_kwargs = without_caches(_attention, (h, None, mask, True), {})
    assert new_args == (h, None, mask, False) and "use_cache" not in new_kwargs
    _attention(*new_args, **new_kwargs)


def test_without_caches_adds_use_cache_only_where_the_callee_takes_it():
    def plain(x):
        return x

    def open_kwargs(x, **kwargs):
        return x

    assert without_caches(plain, (1,), {}) == ((1,), {})
    assert without_caches(open_kwargs, (1,), {}) == ((1,), {})
    assert without_caches(open_kwargs, (1,), {"use_cache": True}) == ((1,), {"use_cache": False})
