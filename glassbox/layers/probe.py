"""What research tools put into and take out of one forward pass, apart from the step's description.

`AttentionMetadata` says what a step computes (which tokens, where their keys live); a `StepProbe` says
what a researcher asked to change or see in it: a sparsity mask per sequence, the layers whose attention
probabilities are handed out (and, filled by those layers, the probabilities). A serving step without
masks carries none (`meta.probe is None`), and the runner's plan then may take any fast executor; a
probed step runs the readable PyTorch attention for the probed rows or layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glassbox.layers.sparsity import SparsityState


@dataclass
class StepProbe:
    # Batch row -> that sequence's mask, for the rows whose mask drops keys at this step's length.
    masks: dict[int, SparsityState] = field(default_factory=dict)
    # Layers whose attention probabilities to hand out, filled by the layer into `captured[layer_idx]`:
    # one [H, q_len, context_len] float32 tensor per sequence.
    capture_layers: frozenset[int] = frozenset()
    captured: dict[int, list[torch.Tensor]] = field(default_factory=dict)
