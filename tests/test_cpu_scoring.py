"""The CPU compact scoring path gives TRL's full-path log-probs and gradients, scoring fewer positions."""

from __future__ import annotations

import torch
import trl.trainer.utils as trl_utils
from conftest import build_tiny_model, build_tiny_tokenizer
from trl.trainer.utils import add_fused_lm_head

from sdar_cli.cpu_scoring import score_only_labelled_positions_on_cpu


def scored(model, input_ids, labels):
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, fused_lm_head=True)
    (out.log_probs.sum()).backward()
    grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    return out.log_probs.detach(), grad


def test_compact_cpu_scoring_matches_full_scoring_and_scores_only_labelled_rows(monkeypatch):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    add_fused_lm_head(model, temperature=0.7)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (3, 40), generator=generator)
    labels = input_ids.clone()
    labels[:, :32] = -100  # 8 response tokens after a 32-token prompt
    labels[2, 36:] = -100  # a shorter response

    rows_scored = []
    original = trl_utils._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        rows_scored.append(hidden.shape[0])
        return original(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
    try:
        score_only_labelled_positions_on_cpu(False)
        full_logps, full_grad = scored(model, input_ids, labels)
        score_only_labelled_positions_on_cpu(True)
        compact_logps, compact_grad = scored(model, input_ids, labels)
    finally:
        score_only_labelled_positions_on_cpu(True)

    assert rows_scored == [3 * 39, 8 + 8 + 4]
    assert (full_logps[:, :31] == 0).all() and (compact_logps[:, :31] == 0).all()
    assert (compact_logps[:, 31:] < 0).any()
    torch.testing.assert_close(compact_logps, full_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact_grad, full_grad, atol=1e-5, rtol=1e-4)
