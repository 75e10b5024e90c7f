"""Response log-probs through the head training scores with: TRL's fused LM head at the rollout temperature.

Two callers, one forward and one head:
- SDARTrainer's loss and its no-grad passes (reference, teacher, rollout-time) get their log-probs from
  TRL's `_get_per_token_logps_and_entropies`, i.e. `model(..., labels, fused_lm_head=True)` on a model
  whose head TRL patched with `add_fused_lm_head(temperature=rollout.temperature)` (the trainer's
  `_score_responses`).
- Outside a trainer, `sdar inspect-gates CHECKPOINT` (gates/probe.py) and `sdar probe-teacher`
  (teacher_probe.py) score with `score_responses` below: it patches the same head at the same temperature
  and makes the same call on rows laid out as training lays them out, so their gates are the training
  gates (tests/test_gates.py checks they are equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel
from trl.trainer.utils import add_fused_lm_head

from .batching import left_pad, right_pad
from .cpu_scoring import score_only_labelled_positions_on_cpu

_TEMPERATURE_ATTRIBUTE = "_sdar_scoring_temperature"


def install_scoring_head(model: PreTrainedModel, temperature: float) -> None:
    """Patch the model's head as TRL's GRPOTrainer does (once; the base model under a PEFT wrapper), and score
    only the response positions on a CPU too, as the trainer does."""
    score_only_labelled_positions_on_cpu()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    installed = getattr(base, _TEMPERATURE_ATTRIBUTE, None)
    if installed is None:
        add_fused_lm_head(base, temperature=temperature)
        setattr(base, _TEMPERATURE_ATTRIBUTE, temperature)
    elif installed != temperature:
        raise ValueError(f"the scoring head is already at temperature {installed}, not {temperature}")


def labelled_logps(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """log pi(token) / temperature-scaled, of the last `logits_to_keep` positions (padding scored as -100):
    the call TRL's `_get_per_token_logps_and_entropies` makes for a text-only batch."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    return outputs.log_probs[:, -logits_to_keep:]


@torch.no_grad()
def score_responses(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
    temperature: float,
) -> list[list[float]]:
    """log pi(response token | prompt, earlier response tokens) for each (prompt, response) pair, no gradient,
    through the head training uses at `temperature` (the rollout temperature), installed here if needed.

    Rows are laid out as in training: prompt left-padded, response right-padded; `batch_size` rows per forward.
    """
    install_scoring_head(model, temperature)
    device = next(model.parameters()).device
    logps: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask = left_pad(prompts[start : start + batch_size], pad_id)
        response_rows = responses[start : start + batch_size]
        response_ids, response_mask = right_pad(response_rows, pad_id)
        token_logps = labelled_logps(
            model,
            torch.cat([prompt_ids, response_ids], 1).to(device),
            torch.cat([prompt_mask, response_mask], 1).to(device),
            response_ids.size(1),
        ).float()
        logps += [row[: len(response)].cpu().tolist() for row, response in zip(token_logps, response_rows)]
    return logps
