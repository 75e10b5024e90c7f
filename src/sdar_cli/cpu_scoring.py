"""Score only the labelled (response) positions on CPU, as TRL already does on CUDA.

TRL's fused log-prob head (trl.trainer.utils.add_fused_lm_head) projects hidden states through the
LM head and normalises over the vocabulary. On Triton devices it does this only at positions whose
label is not -100 (the response tokens); elsewhere it scores every position, because on devices
with compiled kernels (Neuron) a varying number of positions would recompile the tiles each batch.
A CPU runs the same torch tiles eagerly and recompiles nothing, so scoring every position there is
pure waste: with 40-token responses after 400-token prompts, nine tenths of the head's work. This
module makes the CPU take the compact path. The log-probs are the same up to float rounding
(tests/test_cpu_scoring.py) and the gradient path is TRL's own.
"""

from __future__ import annotations

import torch
import trl.trainer.utils as trl_utils

_original_use_triton = trl_utils._use_triton


def _compact_on_cpu(device: torch.device) -> bool:
    return device.type == "cpu" or _original_use_triton(device)


def score_only_labelled_positions_on_cpu(enabled: bool = True) -> None:
    """Switch the compact path on (or back off) for CPU tensors, process-wide; idempotent."""
    trl_utils._use_triton = _compact_on_cpu if enabled else _original_use_triton
