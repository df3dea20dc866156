"""Tensors derived from a module's weights (a channels_last copy, a oneDNN-packed copy, a folded weight),
computed once and cached on the module while the weights they came from are unchanged.

A forward on the CPU otherwise rebuilds them on every call (a layout copy of a conv weight, a reorder of a
linear weight into oneDNN's GEMM layout). The cache lives in the module's ``__dict__`` (not a buffer: never
saved), is refreshed when a source weight changes, and is dropped by ``.to()`` and friends on the networks
(``CachedWeightsModule``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class _DerivedWeights(dict):
    """Per-module cache ``key -> (source weights, their versions, derived value)``.

    Derived tensors are rebuilt on demand, so a copy or a pickle of the module starts with an empty cache
    (oneDNN's packed tensors could not be deep-copied or saved anyway).
    """

    def __deepcopy__(self, memo: dict) -> _DerivedWeights:
        return _DerivedWeights()

    def __reduce__(self) -> tuple:
        return (_DerivedWeights, ())


def cached_derived(
    module: nn.Module, key: str, weight: Tensor | tuple[Tensor, ...], make: Callable
) -> Any:
    """``make(weight)`` cached on ``module`` under ``key`` while ``weight`` is unchanged.

    ``weight`` may be a tuple of tensors (a value derived from several weights): ``make`` then gets the
    tuple, and the cache is refreshed when any of them changes. A change is: ``load_state_dict`` and
    in-place edits (version counter), ``.to()`` (new memory). The cache holds the source tensors, so their
    memory cannot be freed and reused by a new weight: an equal data pointer then really means the same
    memory. Callers must skip inference tensors (no version counter, so an in-place change could not be
    detected).
    """
    sources = weight if isinstance(weight, tuple) else (weight,)
    cache = module.__dict__.get("_derived_weights")
    if cache is None:
        cache = module.__dict__["_derived_weights"] = _DerivedWeights()  # plain attribute, not saved
    entry = cache.get(key)
    if entry is not None:
        srcs, versions, out = entry
        if len(srcs) == len(sources) and all(
            _same_tensor(src, w, version) for src, w, version in zip(srcs, sources, versions)
        ):
            return out
    srcs = tuple(w.detach() for w in sources)
    out = make(srcs if isinstance(weight, tuple) else srcs[0])
    cache[key] = (srcs, tuple(w._version for w in sources), out)
    return out


def _same_tensor(src: Tensor, weight: Tensor, version: int) -> bool:
    """Whether ``weight`` is still the tensor ``src`` was taken from, unmodified since ``version``."""
    return (
        src.data_ptr() == weight.data_ptr()
        and src.dtype == weight.dtype
        and src.shape == weight.shape
        and src.stride() == weight.stride()
        and src.device == weight.device
        and weight._version == version
    )


def clear_derived_weights(model: nn.Module) -> None:
    """Drop every derived-weight cache in ``model`` (their sources would otherwise stay in memory)."""
    for m in model.modules():
        m.__dict__.pop("_derived_weights", None)


class CachedWeightsModule(nn.Module):
    """Base of the networks whose blocks cache derived weights (``cached_derived``): ``.to()``,
    ``.cuda()``, ``.bfloat16()``... drop the caches first, so that the tensors they were derived from
    (and the derived copies) are freed now, not at the next forward (which on another device would never
    touch them)."""

    def _apply(self, fn, recurse=True):
        clear_derived_weights(self)
        return super()._apply(fn, recurse)


def channels_last_weight(conv: nn.Conv2d | nn.ConvTranspose2d) -> Tensor:
    """``conv.weight`` in channels_last memory, cached on the module while the weight is unchanged.

    A convolution over channels_last input otherwise copies a contiguous weight into that layout on every
    call (measured: ~10 MB per call for Stage B's 1152-wide 2x2 convs). With autograd active, or for
    inference tensors (see ``cached_derived``), the parameter itself is used.
    """
    w = conv.weight
    if torch.is_grad_enabled() or w.is_inference() or w.is_contiguous(memory_format=torch.channels_last):
        return w
    return cached_derived(conv, "channels_last", w, lambda t: t.contiguous(memory_format=torch.channels_last))
