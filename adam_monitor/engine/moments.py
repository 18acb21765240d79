"""How an optimizer keeps Adam's moments: torch's ``exp_avg``/``exp_avg_sq`` tensors, or low-bit codes.

Two low-bit layouts are read, both as the float32 tensors they stand for:

* torchao's 8-bit, 4-bit and FP8 optimizers keep ``exp_avg``/``exp_avg_sq`` as tensor subclasses
  that dequantize themselves (codes and one scale per block);
* bitsandbytes keeps the moments as ``state1``/``state2``: float32 tensors, or for its 8-bit
  optimizers ``uint8`` codes into a 256-entry map (``qmap1``/``qmap2``) with one absolute maximum
  per block of elements (``absmax1``/``absmax2``).

HeavyBall keeps the state of each view of a parameter in a dict of its own (``state[p][0]``), each
moment named by the transform that keeps it (``update_by_adam_exp_avg_0``); a parameter of one view
is read with those tensors under torch's names.

The low-bit ones step in float from the dequantized moments and the gradient and then round the new moments
into their codes: the codes after a step hold the moments the step used to their resolution only
(:func:`state_dtype`), which the update check measures.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = ["MOMENT_KEYS", "quantized", "low_bit", "foreign_moments", "dequantized", "state_dtype"]

#: The moment tensors of Adam's state, by their torch names.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: bitsandbytes' names for them: (moment, its codes' map, its per-block maxima).
_BNB_KEYS = {"exp_avg": ("state1", "qmap1", "absmax1"), "exp_avg_sq": ("state2", "qmap2", "absmax2")}


def quantized(t) -> bool:
    """Whether ``t`` is a moment kept in a tensor subclass that dequantizes itself (torchao's
    low-bit optimizer state): a tensor type with a ``dequantize`` of its own (DTensor and plain
    tensors have torch's)."""
    return isinstance(t, Tensor) and type(t).dequantize is not Tensor.dequantize


def _bnb(state: dict) -> bool:
    return "exp_avg" not in state and "state1" in state and "state2" in state


#: HeavyBall's names for Adam's moments in a view's state: ``{transform}_{moment}_{transform index}``.
_HEAVYBALL_KEY = re.compile(r"(?:update|scale)_by_adam_(exp_avg|exp_avg_sq)_\d+")


def _views(state: dict) -> dict | None:
    """The moments of a HeavyBall state of one view (``{0: {...}}``) under torch's names, else ``None``."""
    if len(state) != 1 or not isinstance(state.get(0), dict):
        return None
    found = {}
    for key, value in state[0].items():
        match = _HEAVYBALL_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is not None and isinstance(value, Tensor):
            found[match.group(1)] = value
    return found if len(found) == 2 else None


def low_bit(state: dict) -> bool:
    """Whether ``state`` keeps a moment in low-bit codes."""
    if _bnb(state):
        return "qmap1" in state or "qmap2" in state
    return any(quantized(state.get(k)) for k in MOMENT_KEYS)


def foreign_moments(state: dict) -> bool:
    """Whether ``state`` keeps its moments other than as tensors under torch's names (low-bit
    codes, bitsandbytes' or HeavyBall's names): :func:`dequantized` makes a new dict of it at every call."""
    return _bnb(state) or any(quantized(state.get(k)) for k in MOMENT_KEYS) or _views(state) is not None


def _blockwise(codes: Tensor, qmap: Tensor, absmax: Tensor) -> Tensor:
    """bitsandbytes' blockwise dequantization: each code's map entry times its block's maximum.
    The block is the power of two that splits the tensor into ``absmax.numel()`` blocks."""
    n, blocks = codes.numel(), absmax.numel()
    size = 1 << max(int(-(-n // blocks)) - 1, 0).bit_length()
    values = qmap.float()[codes.reshape(-1).long()]
    return (values * absmax.float().repeat_interleave(size)[:n]).reshape(codes.shape)


def dequantized(state: dict) -> dict:
    """``state`` with its moments under torch's names as float32 tensors (a new dict), or
    ``state`` itself where they already are."""
    if _bnb(state):
        out = dict(state)
        for name, (key, qmap, absmax) in _BNB_KEYS.items():
            value = state[key]
            out[name] = _blockwise(value, state[qmap], state[absmax]) if qmap in state else value
        return out
    views = _views(state) if 0 in state else None
    if views is not None:
        return views
    if not foreign_moments(state):
        return state
    return {k: (v.dequantize(torch.float32) if quantized(v) else v) for k, v in state.items()}


def state_dtype(state: dict, default: torch.dtype) -> torch.dtype:
    """The float format whose rounding matches that of the moments in ``state`` (``default``
    where it holds none yet): their dtype, or for low-bit codes the format of their resolution
    (a 256-level code: bfloat16's 8 significant bits; a 16-level code or FP8: float8_e4m3fn's 4)."""
    if _bnb(state):
        return torch.bfloat16 if "qmap2" in state else state["state2"].dtype
    views = _views(state) if 0 in state else None
    t = views["exp_avg_sq"] if views is not None else state.get("exp_avg_sq", state.get("exp_avg"))
    if not isinstance(t, Tensor):
        return default
    if not quantized(t):
        return t.dtype
    codes = getattr(t, "codes", None)
    if isinstance(codes, Tensor) and codes.dtype.is_floating_point:
        return codes.dtype
    qmap = getattr(t, "qmap", None)
    levels = qmap.numel() if isinstance(qmap, Tensor) else 16
    return torch.bfloat16 if levels >= 256 else torch.float8_e4m3fn
