"""Houlsby-style bottleneck adapters after each sub-layer's output projection.

    y = out + up(act(down(out)))     out: B×T×d, down: d→d/reduction, up: zero-initialised

The adapters are attached with forward hooks on the family's output projections (`adapter_sites`),
so no model file is copied; with `up` at zero the wrapped model equals the backbone at init.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..base import ConfigError
from ..baselines.model import BackboneFeatures


def out_width(layer) -> int:
    """Output width of a projection: nn.Linear, or transformers' Conv1D (GPT-2; weight in×out, width `nf`)."""
    return layer.nf if isinstance(layer, Conv1D) else layer.out_features

class Bottleneck(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(d, hidden)
        self.up = nn.Linear(hidden, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(torch.nn.functional.gelu(self.down(x)))


class AdapterModel(BackboneFeatures):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        hidden = max(1, backbone.hidden_size // config.reduction)
        sites = [(n, m) for n, m in backbone.model.named_modules()
                 if isinstance(m, (nn.Linear, Conv1D)) and any(n.endswith("." + s) for s in backbone.adapter_sites)]
        if not sites:
            raise ConfigError(f"adapter: no output projections named {backbone.adapter_sites} in this model")
        # Keys use '__' for '.', since ModuleDict keys cannot contain dots.
        self.adapters = nn.ModuleDict({n.replace(".", "__"): Bottleneck(out_width(m), hidden) for n, m in sites})
        for n, m in sites:
            # The hook holds only its adapter, not this model: no reference cycle keeps a dropped model alive.
            m.register_forward_hook(_AdapterHook(self.adapters[n.replace(".", "__")]))


class _AdapterHook:
    def __init__(self, adapter: Bottleneck):
        self.adapter = adapter

    def __call__(self, module, inputs, output):
        return self.adapter(output)
