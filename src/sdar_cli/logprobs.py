"""Response log-probs through the head training scores with: TRL's fused LM head at the rollout temperature.

SDARTrainer's loss and its no-grad passes (reference, teacher, rollout-time) get their log-probs from
TRL's `_get_per_token_logps_and_entropies`, i.e. `model(..., labels, fused_lm_head=True)` on a model
whose head TRL patched with `add_fused_lm_head(temperature=rollout.temperature)`. `sdar inspect-gates`
scores fresh rollouts outside a trainer; it patches the same head with the same temperature and makes
the same call here, so its gates are the training gates (tests/test_gates.py checks they are equal).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from trl.trainer.utils import add_fused_lm_head

_TEMPERATURE_ATTRIBUTE = "_sdar_scoring_temperature"


def install_scoring_head(model: PreTrainedModel, temperature: float) -> None:
    """Patch the model's head as TRL's GRPOTrainer does (once; the base model under a PEFT wrapper)."""
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
