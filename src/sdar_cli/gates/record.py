"""The gate record: one turn-sample's per-token gates, the one schema of gates/step-N.jsonl.

`SDARTrainer._gate_rows` builds one per trained turn-sample (`GateRecord.of_turn`), `sdar inspect-gates`
reads them back (gates/__init__.py) and the gate probe builds them from fresh rollouts (gates/probe.py). Per
response token:
    S_t   student_logp   the student log-prob the loss used
    T_t   teacher_logp   the same weights shown the privileged context
    g_t   gate           sigmoid(beta * (T_t - S_t)): near 1 endorsed, near 0 rejected
Fields written since later versions (token_ids, mask, teacher_placement, teacher_context) have defaults,
so gates files of earlier runs still load; unknown fields are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class GateRecord(BaseModel):
    """One line of gates/step-N.jsonl; the field order is the order on disk."""

    model_config = ConfigDict(extra="ignore")

    step: int
    task_id: str
    task_type: str
    episode: int
    turn: int
    token_ids: list[int] = []
    tokens: list[str]
    student_logp: list[float]
    teacher_logp: list[float]
    gate: list[float]
    #: 1 per response token (the trainer writes it; fresh probe records have none)
    mask: list[int] | None = None
    advantage: float
    reward: float
    beta: float
    action: str | None
    valid: bool
    #: teacher.placement and teacher.context the teacher prompt was built with (training records only)
    teacher_placement: str | None = None
    teacher_context: str | None = None

    @model_validator(mode="after")
    def _one_value_per_token(self) -> GateRecord:
        if len({len(self.tokens), len(self.student_logp), len(self.teacher_logp), len(self.gate)}) != 1:
            raise ValueError("tokens, student_logp, teacher_logp and gate differ in length.")
        return self

    @classmethod
    def of_turn(cls, sample: Any, step: int, decode: Callable[[list[int]], str], **scores: Any) -> GateRecord:
        """The record of one turn-sample (a rollout.TurnSample): its ids, tokens, action and reward, plus
        `scores` (student_logp, teacher_logp, gate, advantage, beta and any optional field)."""
        return cls(
            step=step,
            task_id=sample.task_id,
            task_type=sample.task_type,
            episode=sample.episode,
            turn=sample.turn,
            token_ids=list(sample.response_ids),
            tokens=[decode([token]) for token in sample.response_ids],
            reward=sample.reward,
            action=sample.action,
            valid=sample.valid,
            **scores,
        )

    @property
    def gaps(self) -> list[float]:
        """D_t = T_t - S_t per token."""
        return [t - s for t, s in zip(self.teacher_logp, self.student_logp)]

    def to_json_line(self) -> str:
        """The record as one line of a gates file (json.dumps: non-finite values stay NaN / Infinity)."""
        return json.dumps(self.model_dump()) + "\n"


#: the fields every gates file has had from the first version on
REQUIRED_FIELDS = [name for name, field in GateRecord.model_fields.items() if field.is_required()]
