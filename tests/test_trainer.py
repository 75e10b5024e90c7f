"""SDARTrainer on the tiny model: shared weights, the teacher pass, the loss, faults."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, randomise_adapter, student_logps, task_inputs, tiny_config
from transformers import AutoModelForCausalLM

from sdar_cli.trainer import SDARTrainer


def test_actor_reference_and_teacher_share_one_set_of_base_weights(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run")
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded_pointers = {name: p.data_ptr() for name, p in loaded.named_parameters()}
    base_count = sum(p.numel() for p in loaded.parameters())
    trainer, _ = build_trainer(config, tmp_path / "run", model=loaded)
    peft_model = trainer.model
    # every base weight inside the PEFT model is the very tensor that was loaded: nothing was copied
    wrapped = {
        name.replace("base_model.model.", "").replace(".base_layer", ""): p.data_ptr()
        for name, p in peft_model.named_parameters()
        if "lora_" not in name
    }
    assert wrapped == loaded_pointers
    # and nothing else holds weights: the model is the base plus the adapter, no reference or teacher copy
    lora_count = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in peft_model.parameters()) == base_count + lora_count
    assert list(peft_model.peft_config) == ["default"]  # no "ref" adapter copy either


def test_reference_is_the_base_model_and_teacher_follows_the_switch(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run")
    trainer, _ = build_trainer(config, tmp_path / "run")
    randomise_adapter(trainer.model)
    batch = trainer._generate_and_score_completions(task_inputs(config))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    keep = batch["completion_ids"].size(1)
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        logits = fresh_base(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1]
    base_logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    real = batch["completion_mask"].bool()
    assert torch.allclose(batch["ref_per_token_logps"][real], base_logps[real], atol=1e-4)

    # teacher: live (adapter on) differs from base (adapter off) once the adapter is non-zero
    live = batch["teacher_per_token_logps"]
    trainer.config.teacher.weights = "base"
    torch.manual_seed(0)
    base_teacher = trainer._generate_and_score_completions(task_inputs(config))["teacher_per_token_logps"]
    assert not torch.allclose(live, base_teacher)


def _compute_loss(trainer, batch):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer._compute_loss(trainer.model, batch)


def test_loss_is_grpo_plus_lambda_times_the_gated_term(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run", "algorithm.sdar_coef=0.5")
    trainer, _ = build_trainer(config, tmp_path / "run")
    randomise_adapter(trainer.model)
    batch = trainer._generate_and_score_completions(task_inputs(config))
    total = _compute_loss(trainer, batch)
    grpo_only = super(SDARTrainer, trainer)._compute_loss(trainer.model, batch)
    student = student_logps(trainer, batch)
    teacher, mask = batch["teacher_per_token_logps"], batch["completion_mask"].float()
    gate = torch.sigmoid(5.0 * (teacher - student))
    expected_sdar = (gate * (teacher - student) * mask).sum() / mask.sum()
    assert total.item() == pytest.approx(grpo_only.item() + 0.5 * expected_sdar.item(), abs=1e-5)
    # the recorded gates are the ones the loss used, computed from the student log-probs it used
    for index, record in trainer._gate_records.items():
        row = batch["sample_index"].tolist().index(index)
        n = int(mask[row].sum())
        assert record["gate"] == pytest.approx(gate[row, :n].tolist(), abs=1e-5)
        assert record["student_logp"] == pytest.approx(student[row, :n].tolist(), abs=1e-5)


@pytest.mark.parametrize(
    ("algorithm", "teacher_pass", "gate_values"),
    [("grpo", False, None), ("grpo_opsd", True, 0.5), ("opsd", True, None), ("sdar", True, None)],
)
def test_algorithms_share_one_code_path(tiny_model_dir, tmp_path, algorithm, teacher_pass, gate_values):
    config = tiny_config(tiny_model_dir, tmp_path / "run", f"algorithm.name={algorithm}")
    trainer, _ = build_trainer(config, tmp_path / "run")
    batch = trainer._generate_and_score_completions(task_inputs(config))
    assert ("teacher_per_token_logps" in batch) == teacher_pass
    if algorithm == "opsd":
        assert batch["advantages"].abs().sum() == 0  # no RL term
    _compute_loss(trainer, batch)
    if gate_values is not None:
        gates = [g for record in trainer._gate_records.values() for g in record["gate"]]
        assert gates and all(g == gate_values for g in gates)
    if not teacher_pass:
        assert trainer._gate_records == {}


def test_non_finite_losses_skip_the_update_then_stop_with_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import sdar_cli.losses as losses_module

    monkeypatch.setattr(losses_module, "sdar_token_loss", lambda t, s, g: s * float("nan"))
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, run_dir, "train.max_steps=5", "train.max_nonfinite_updates=2")
    trainer, _ = build_trainer(config, run_dir)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.stop_reason and "not finite in 2 steps in a row" in trainer.stop_reason
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "a non-finite step must not change the weights"
    assert (run_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_most_episodes_failing_aborts_with_a_clear_message(tiny_model_dir, tmp_path):
    from sdar_cli.trainer import TrainingAborted

    config = tiny_config(tiny_model_dir, tmp_path / "run", "env.name=tests_envs:BrokenEnv")
    trainer, _ = build_trainer(config, tmp_path / "run")
    with pytest.raises(TrainingAborted, match=r"4 of 4 episodes failed inside the environment.*reset is broken"):
        trainer._generate_and_score_completions(task_inputs(config))


def test_the_batch_handed_to_trl_holds_exactly_the_documented_keys(tiny_model_dir, tmp_path):
    import sdar_cli.trainer as trainer_module

    # the module docstring's table (header row first); the vLLM keys need rollout.engine: vllm
    table = [line.split("|")[1] for line in trainer_module.__doc__.splitlines() if line.startswith("| ")]
    documented = {key.strip() for cell in table[1:] for key in cell.split(",")}
    config = tiny_config(tiny_model_dir, tmp_path / "run", "train.updates_per_rollout=2")
    trainer, _ = build_trainer(config, tmp_path / "run")
    batch = trainer._generate_and_score_completions(task_inputs(config))
    assert set(batch) == documented - {"sampling_per_token_logps", "importance_sampling_ratio"}
    # the rollout-policy pass is the live policy (adapter on), the reference the base: equal while the adapter is 0
    real = batch["completion_mask"].bool()
    assert torch.allclose(batch["old_per_token_logps"][real], batch["ref_per_token_logps"][real], atol=1e-5)
    randomise_adapter(trainer.model)
    batch = trainer._generate_and_score_completions(task_inputs(config))
    real = batch["completion_mask"].bool()
    assert not torch.allclose(batch["old_per_token_logps"][real], batch["ref_per_token_logps"][real], atol=1e-3)
