"""The paper's other baselines in the one trainer: rlsd, skill_sd, skill_grpo (formulas in test_losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_trainer, randomise_adapter, student_logps, task_inputs, tiny_config

from sdar_cli.config import ConfigError, load_config
from sdar_cli.trainer import SDARTrainer

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def test_rlsd_advantages_are_the_group_advantages_reweighted_by_the_rollout_gap(tiny_model_dir, tmp_path, monkeypatch):
    import sdar_cli.trainer as trainer_module

    # a random tiny model wins nothing: give the samples spread group advantages of both signs
    monkeypatch.setattr(trainer_module, "group_advantages", lambda rewards, groups: torch.linspace(-1.5, 1.0, len(rewards)))
    config = tiny_config(tiny_model_dir, tmp_path / "run", "algorithm.name=rlsd", "algorithm.rlsd_decay_steps=4")
    trainer, _ = build_trainer(config, tmp_path / "run")
    randomise_adapter(trainer.model)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(task_inputs(config))
    assert batch["advantages"].dim() == 2 and "old_per_token_logps" in batch
    group = trainer._step_advantages  # one GRPO advantage per sample
    lam = 0.5 * (1 - 1 / 4)  # first rollout step of a 4-step decay
    assert trainer._metrics["train"]["rlsd_lambda"] == [pytest.approx(lam)]
    gap = batch["teacher_per_token_logps"] - batch["old_per_token_logps"]
    checked = 0
    for row, index in enumerate(batch["sample_index"].tolist()):
        if index < 0:
            continue
        a = float(group[index])
        for t in range(int(batch["completion_mask"][row].sum())):
            w = min(max(math.exp(math.copysign(1.0, a) * float(gap[row, t])) if a else 1.0, 0.8), 1.2)
            assert float(batch["advantages"][row, t]) == pytest.approx(a * ((1 - lam) + lam * w), abs=1e-5)
            checked += 1
    assert checked and any(float(a) != 0 for a in group)
    # no SDAR term, no gates: the loss is TRL's policy loss on these token advantages
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(super(SDARTrainer, trainer)._compute_loss(trainer.model, batch).item(), abs=1e-6)
    assert trainer._gate_records == {}


def test_skill_sd_loss_is_grpo_plus_coef_times_the_importance_weighted_k3(tiny_model_dir, tmp_path):
    config = tiny_config(
        tiny_model_dir, tmp_path / "run", "algorithm.name=skill_sd", "algorithm.skill_sd_coef=0.5", "algorithm.kl_coef=0"
    )
    trainer, _ = build_trainer(config, tmp_path / "run")
    randomise_adapter(trainer.model)
    batch = trainer._generate_and_score_completions(task_inputs(config))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    student = student_logps(trainer, batch)
    batch["old_per_token_logps"] = student - 0.1  # as after an earlier update: rho = e^0.1
    total = trainer._compute_loss(trainer.model, batch)
    grpo_only = super(SDARTrainer, trainer)._compute_loss(trainer.model, batch)
    gap = batch["teacher_per_token_logps"] - student
    mask = batch["completion_mask"].float()
    per_token = math.exp(0.1) * (torch.exp(gap) - 1 - gap)
    expected = (per_token * mask).sum() / mask.sum()
    assert total.item() == pytest.approx(grpo_only.item() + 0.5 * expected.item(), rel=1e-4)
    assert trainer._gate_records == {}


def test_skill_grpo_shows_the_skills_to_the_student_and_plays_no_teacher(tiny_model_dir, tmp_path):
    runs = {}
    for algorithm in ("grpo", "skill_grpo"):
        config = tiny_config(tiny_model_dir, tmp_path / algorithm, f"algorithm.name={algorithm}")
        trainer, _ = build_trainer(config, tmp_path / algorithm)
        torch.manual_seed(0)
        batch = trainer._generate_and_score_completions(task_inputs(config))
        runs[algorithm] = (trainer, batch)
    trainer, batch = runs["skill_grpo"]
    assert "teacher_per_token_logps" not in batch
    decoded = trainer.processing_class.decode(batch["prompt_ids"][0][batch["prompt_mask"][0].bool()])
    skills = trainer.renderer.skills_text(_task(trainer))
    assert decoded.startswith("[Privileged Skill Information]\n") and skills and skills[:40] in decoded
    plain = runs["grpo"][0].processing_class.decode(runs["grpo"][1]["prompt_ids"][0])
    assert "[Privileged Skill Information]" not in plain


def _task(trainer):
    env = trainer.make_env()
    task, _ = env.reset(trainer._step_samples[0].task_id)
    return task


def test_skill_grpo_needs_skills():
    with pytest.raises(ConfigError, match="skill_grpo.*teacher.context is plan"):
        load_config(None, ["algorithm.name=skill_grpo", "teacher.context=plan"])
