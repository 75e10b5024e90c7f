"""Turn-samples -> the padded tensor batch TRL's GRPO loss reads.

TRL splits a generation batch into `updates_per_rollout x micro_batches` equal chunks (its
steps_per_generation) and silently drops the remainder rows, while a rollout yields a variable number
of turn-samples. So the batch is padded to a multiple of that chunk count with copies of a real row whose loss mask is zero and whose
`sample_index` is -1: they cost compute and no real sample is lost. They never change token-mean losses
(dapo, cispo, the default); loss types that average over rows (grpo, sapo, dr_grpo) count them, as TRL does.
(Copies rather than empty rows because a row with no attended token gives NaN attention.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rollout import TurnSample


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
    return ids, mask


def collate_turn_samples(
    samples: Sequence[TurnSample],
    advantages: torch.Tensor,
    pad_id: int,
    multiple_of: int,
    with_teacher: bool,
    min_rows: int = 0,
) -> dict[str, torch.Tensor]:
    """Pad the samples into one batch of at least `min_rows` rows, their count a multiple of `multiple_of`
    (several processes pad to the same count, so their micro-batches and TRL's gathers match; with
    `min_rows`, zero samples give padding rows only).

    Keys: prompt_ids/mask (left-padded), completion_ids/mask (right-padded; the ids are exactly the
    sampled `response_ids`), advantages [B], sample_index [B] (-1 on padding rows), and the scalars
    num_items_in_batch (real response tokens) and num_samples_in_batch. With `with_teacher`, also
    teacher_prompt_ids/mask: the privileged prompt the teacher scores the same response under. When the
    sampler kept its log-probs (vLLM), also sampling_per_token_logps.
    """
    if not samples and min_rows <= 0:
        raise ValueError("cannot build a batch from zero turn-samples")
    target = max(len(samples), min_rows)
    padding_rows = target - len(samples) + (-target) % multiple_of
    # a process whose episodes all failed in the environment still joins the step with padding rows only
    filler = samples[0] if samples else _placeholder_row(pad_id)
    rows = list(samples) + [filler] * padding_rows
    prompt_ids, prompt_mask = left_pad([s.prompt_ids for s in rows], pad_id)
    completion_ids, completion_mask = right_pad([s.response_ids for s in rows], pad_id)
    real = torch.zeros(len(rows), dtype=torch.bool)
    real[: len(samples)] = True
    completion_mask = completion_mask * real.unsqueeze(1).long()
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.cat([advantages.float(), torch.zeros(padding_rows)]),
        "sample_index": torch.cat([torch.arange(len(samples)), torch.full((padding_rows,), -1)]),
        "num_items_in_batch": completion_mask.sum(),
        "num_samples_in_batch": torch.tensor(len(samples)),
    }
    if with_teacher:
        batch["teacher_prompt_ids"], batch["teacher_prompt_mask"] = left_pad([s.teacher_prompt_ids for s in rows], pad_id)
    if samples and all(s.sampler_logps is not None for s in samples):
        # the sampler's log-prob of each completion id (vLLM), aligned with completion_ids, 0 on padding
        logps = torch.zeros(completion_ids.shape)
        for i, row in enumerate(rows[: len(samples)]):
            logps[i, : len(row.sampler_logps)] = torch.tensor(row.sampler_logps)
        batch["sampling_per_token_logps"] = logps
    return batch


def _placeholder_row(pad_id: int) -> TurnSample:
    """A one-token prompt and response (attended, so attention stays finite) for padding with no real row."""
    return TurnSample("", "", -1, -1, 0, [pad_id], [pad_id], [pad_id], None, False, False, "")
