"""A cheap fingerprint of a module's weights, for caches of what is derived from them.

Inference keeps things computed from a module's weights (bfloat16 copies, fused projections,
constant embeddings) and must rebuild them when the weights change. :func:`weights_key` names the
weights' current values without reading them: each tensor's storage address and its in-place version
counter, which optimiser steps, EMA updates, ``load_state_dict`` and ``.data`` assignments all
change, and a new tensor in place of an old one changes as well. (An in-place change made through
``tensor.data`` escapes the version counter, as it escapes autograd's; the project makes none.)

It walks the module tree through its registries directly: ``Module.parameters()`` builds every
submodule's qualified name on the way, which cost ~0.3 ms per sampling call for the generator and
the decoder (a 6-NFE call lasts ~30 ms), as much as the walk's whole result is used for.
"""

from __future__ import annotations

from torch import nn


def weights_key(module: nn.Module, buffers: bool = True) -> tuple:
    """``(module.training, (data_ptr, version) of every parameter [and buffer], in a fixed order)``."""
    out: list[tuple[int, int]] = []
    stack = [module]
    while stack:
        m = stack.pop()
        tensors = list(m._parameters.values())
        if buffers:
            tensors += m._buffers.values()
        out += [(t.data_ptr(), t._version) for t in tensors if t is not None]
        stack += [c for c in reversed(m._modules.values()) if c is not None]
    return module.training, tuple(out)
