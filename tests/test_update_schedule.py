"""The update schedule: several optimizer updates per rollout batch, the PPO ratio, clipping and dual-clip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_trainer, student_logps, task_inputs, tiny_config

from sdar_cli.config import ConfigError, load_config
from sdar_cli.trainer import grpo_args

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def test_grpo_args_split_a_rollout_into_updates_of_micro_batches(tmp_path):
    config = load_config(
        None,
        ["rollout.tasks_per_step=4", "rollout.group_size=4", "train.micro_batches=2", "train.updates_per_rollout=4",
         "train.epochs_per_rollout=2"],
    )
    args = grpo_args(config, tmp_path, use_cpu=True, bf16=False)
    assert args.gradient_accumulation_steps == 2
    assert args.steps_per_generation == 8
    assert args.num_iterations == 2
    assert args.per_device_train_batch_size * args.steps_per_generation == 16  # one rollout batch of episodes
    assert args.delta == 3.0


def test_updates_times_micro_batches_must_divide_the_episodes():
    with pytest.raises(ConfigError, match=r"updates_per_rollout x train.micro_batches \(8\) must divide .* \(4\)"):
        load_config(None, ["rollout.tasks_per_step=2", "rollout.group_size=2", "train.updates_per_rollout=4",
                           "train.micro_batches=2"])


def test_dual_clip_must_exceed_the_clip_range():
    with pytest.raises(ConfigError, match=r"dual_clip \(1.1\) must exceed 1 \+ algorithm.clip_eps"):
        load_config(None, ["algorithm.dual_clip=1.1"])
    assert load_config(None, ["algorithm.dual_clip=null"]).algorithm.dual_clip is None


def test_a_rollout_split_into_two_updates_steps_twice_and_the_ratio_moves(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(
        tiny_model_dir, run_dir, "train.updates_per_rollout=2", "train.max_steps=2", "train.learning_rate=0.05",
        "algorithm.name=sdar", "output.save_gates=false",
    )
    trainer, _ = build_trainer(config, run_dir)
    rollouts, ratios, optimizer_steps = [], [], []
    generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def counting_rollout(inputs):
        batch = generate(inputs)
        rollouts.append(batch)
        return batch

    gates_current, gates_old = [], []

    def recording_loss(model, inputs):
        loss = compute_loss(model, inputs)
        real = inputs["completion_mask"].bool()
        student = student_logps(trainer, inputs)
        ratios.append(torch.exp(student - inputs["old_per_token_logps"])[real])
        recorded = torch.tensor([g for i in inputs["sample_index"].tolist() if i >= 0 for g in trainer._gate_records[i]["gate"]])
        teacher = inputs["teacher_per_token_logps"]
        gates_current.append((recorded - torch.sigmoid(5.0 * (teacher - student))[real]).abs().max())
        gates_old.append((recorded - torch.sigmoid(5.0 * (teacher - inputs["old_per_token_logps"]))[real]).abs().max())
        return loss

    trainer._generate_and_score_completions = counting_rollout
    trainer._compute_loss = recording_loss
    trainer.add_callback(type("Steps", (__import__("transformers").TrainerCallback,), {
        "on_optimizer_step": lambda self, args, state, control, **kw: optimizer_steps.append(state.global_step)
    })())
    trainer.train()

    assert len(rollouts) == 1, "one rollout batch feeds both updates"
    assert len(optimizer_steps) == 2 and trainer.state.global_step == 2
    assert "old_per_token_logps" in rollouts[0]
    first, second = ratios
    assert (first - 1).abs().max() < 1e-4  # the first update starts at the rollout policy
    assert (second - 1).abs().max() > 1e-3  # the second sees the weights the first moved
    # the gate is computed from the CURRENT (detached) student log-probs, not the rollout-time ones
    assert max(gates_current) < 1e-5 and gates_old[1] > 1e-4
    # every real sample trained exactly once over the two updates (padding rows carry no tokens)
    assert sum(r.numel() for r in ratios) == int(rollouts[0]["completion_mask"].sum())


def _clip_batch(tiny_model_dir, tmp_path, *overrides):
    config = tiny_config(
        tiny_model_dir, tmp_path / "run", "algorithm.name=grpo", "algorithm.kl_coef=0", "algorithm.entropy_coef=0",
        *overrides,
    )
    trainer, _ = build_trainer(config, tmp_path / "run")
    batch = trainer._generate_and_score_completions(task_inputs(config))
    rows = batch["advantages"].numel()
    batch["advantages"] = torch.tensor([1.0 if i % 2 else -2.0 for i in range(rows)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    student = student_logps(trainer, batch)
    batch["old_per_token_logps"] = student - 1.5  # ratio e^1.5 = 4.48 on every token
    return trainer, batch


@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_clipping_acts_and_dual_clip_bounds_the_loss_of_negative_advantages(tiny_model_dir, tmp_path, dual_clip):
    trainer, batch = _clip_batch(tiny_model_dir, tmp_path, f"algorithm.dual_clip={'null' if dual_clip is None else dual_clip}")
    loss = trainer._compute_loss(trainer.model, batch)

    # hand computation, per token: A > 0 -> -min(r A, 1.2 A) = -1.2 A;
    # A < 0 -> max(-r A, -clip(r) A) = 4.48 |A|, capped by dual-clip at c |A| = 3 |A|
    ratio = torch.exp(torch.tensor(1.5))
    cap = ratio if dual_clip is None else torch.tensor(dual_clip)
    mask = batch["completion_mask"].float()
    advantages = batch["advantages"].unsqueeze(1)
    per_token = torch.where(advantages > 0, -1.2 * advantages, torch.minimum(ratio, cap) * advantages.abs())
    expected = (per_token * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    metrics = trainer._metrics["train"]
    positive_share = (mask * (advantages > 0)).sum() / mask.sum()
    assert metrics["clip_ratio/high_mean"][-1] == pytest.approx(positive_share.item(), rel=1e-5)
    assert metrics["clip_ratio/high_mean"][-1] > 0


def _lora_gradient(trainer, loss):
    trainer.model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for n, p in trainer.model.named_parameters() if p.grad is not None])


def test_official_kl_is_clamped_k3_with_the_plain_gradient_and_trl_bias_correction_is_an_option(tiny_model_dir, tmp_path):
    results = {}
    for estimator in ("k3", "k3_bias_corrected"):
        config = tiny_config(
            tiny_model_dir, tmp_path / estimator, "algorithm.name=grpo", "algorithm.kl_coef=1.0",
            "algorithm.entropy_coef=0", f"algorithm.kl_estimator={estimator}",
        )
        trainer, _ = build_trainer(config, tmp_path / estimator)
        torch.manual_seed(0)
        batch = trainer._generate_and_score_completions(task_inputs(config))
        batch["advantages"] = torch.zeros_like(batch["advantages"])  # the KL term alone
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        student = student_logps(trainer, batch)
        offsets = torch.ones_like(student)
        offsets[:, ::2] = 5.0  # R - S = 5 on every other token: k3 = 142.4, clamped to 10 by the official form
        batch["ref_per_token_logps"] = student + offsets
        loss = trainer._compute_loss(trainer.model, batch)
        results[estimator] = (loss.item(), _lora_gradient(trainer, loss), trainer, batch, offsets)

    _, _, trainer, batch, offsets = results["k3"]
    mask = batch["completion_mask"].float()
    k3 = torch.exp(offsets) - offsets - 1
    assert results["k3"][0] == pytest.approx(((k3.clamp(max=10) * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert results["k3_bias_corrected"][0] == pytest.approx(((k3 * mask).sum() / mask.sum()).item(), rel=1e-5)
    # plain gradient: the surrogate mean((1 - e^(R-S)) * S) over unclamped tokens has the same gradient
    prompt_completion = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    live, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, prompt_completion, attention, batch["completion_ids"].size(1)
    )
    weight = torch.where(k3 > 10, torch.zeros_like(k3), 1 - torch.exp(offsets))
    surrogate = (weight * live * mask).sum() / mask.sum()
    assert torch.allclose(_lora_gradient(trainer, surrogate), results["k3"][1], atol=1e-6, rtol=1e-4)
    assert not torch.allclose(results["k3"][1], results["k3_bias_corrected"][1], atol=1e-6, rtol=1e-3)


def test_aggregation_scope_update_token_mean_or_official_micro_batch_token_mean(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run", "train.micro_batches=2")
    trainer, _ = build_trainer(config, tmp_path / "run")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # this micro-batch: 4 of the update's 10 tokens
    inputs = {"num_items_in_batch": torch.tensor(10.0)}
    total = 1.0 + 3.0 + 4.0 + 5.0
    assert trainer._aggregate(values, mask, inputs, "dapo").item() == pytest.approx(total / 10)
    assert trainer._aggregate(values, mask, inputs, "bnpo").item() == pytest.approx(total / 4 / 2)
    assert trainer._aggregate(values, mask, inputs, "grpo").item() == pytest.approx((1.0 + 12.0 / 3) / 2 / 2)


def test_truncated_prompts_are_counted_per_rollout(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run", "algorithm.name=grpo", "rollout.max_prompt_tokens=16")
    trainer, _ = build_trainer(config, tmp_path / "run")
    for _ in range(2):  # every prompt is longer than 16 tokens: each rollout counts each of its turns once
        trainer._generate_and_score_completions(task_inputs(config))
        metrics = trainer._rollout_metrics
        assert metrics["truncated_prompts"] == metrics["turn_samples"] > 0


def test_each_process_share_must_split_into_updates_times_micro_batches(monkeypatch):
    from sdar_cli import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.check_world_fits(4, 2, micro_batches=2, updates_per_rollout=2)  # 4 episodes a process, 4 chunks
    with pytest.raises(distributed.DistributedConfigError, match=r"updates_per_rollout x train.micro_batches \(8\)"):
        distributed.check_world_fits(4, 2, micro_batches=2, updates_per_rollout=4)


def test_checkpoints_and_stops_fall_between_rollout_batches():
    """A checkpoint inside a rollout batch could not resume it: a save asked mid-batch moves to the batch's end,
    and an interrupt asked mid-batch stops (and saves) at the batch's end."""
    from types import SimpleNamespace

    from sdar_cli.run import InterruptWatcher

    from sdar_cli.trainer import _SaveBetweenRolloutBatches

    config = load_config(None, ["rollout.tasks_per_step=2", "rollout.group_size=2", "train.updates_per_rollout=2"])
    assert config.updates_per_rollout_batch == 2

    # save_steps=3 with 2 updates a batch: the save asked at update 3 happens at update 4, none inside a batch
    mover, saved = _SaveBetweenRolloutBatches(2), []
    for step in range(1, 10):
        control = SimpleNamespace(should_save=step % 3 == 0 or step == 9, should_training_stop=False)
        mover.on_step_end(None, SimpleNamespace(global_step=step, max_steps=9), control)
        saved += [step] if control.should_save else []
    assert saved == [4, 6, 9]  # 9: the run's last update (max_steps) saves wherever it falls

    watcher = InterruptWatcher(console=None, every=2)
    watcher.requested = True
    decisions = []
    for step in (1, 2):
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        watcher.on_step_end(None, SimpleNamespace(global_step=step), control)
        decisions.append((control.should_save, control.should_training_stop))
    assert decisions == [(False, False), (True, True)]


def test_tokens_per_second_counts_the_whole_rollout_batch_once(tmp_path):
    """With several updates per rollout batch, every update logs the batch's tokens: the rate divides them by
    the batch's time so far (its rollout and updates), not by one later update's time."""
    from types import SimpleNamespace

    from sdar_cli.run import MetricsWriter

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    lines = [  # (step seconds, generation seconds or None, prompt + response tokens)
        (10.0, 6.0, 1000.0),  # update 1 of batch 1: it played the rollout
        (5.0, None, 1000.0),  # update 2 of batch 1: the same batch's tokens again
        (20.0, 8.0, 1200.0),  # update 1 of batch 2
    ]
    for step, (seconds, generation, tokens) in enumerate(lines, start=1):
        writer._step_seconds = seconds
        logs = {"reward_mean": 0.0, "prompt_tokens": tokens - 100.0, "response_tokens": 100.0}
        if generation is not None:
            logs["generation_seconds"] = generation
        writer.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens_per_second"] for r in written] == [pytest.approx(100.0), pytest.approx(1000 / 15), pytest.approx(60.0)]
    assert [r["step_seconds"] for r in written] == [10.0, 5.0, 20.0]
