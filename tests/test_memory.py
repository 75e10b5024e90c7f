"""The memory estimator against hand-computed numbers, and `sdar train --dry-run`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sdar_cli.perf.memory import (
    LINEAR_MODULES,
    ModelShape,
    Setup,
    Workload,
    estimate_peak_memory,
    forward_transient_bytes_per_token,
    kv_cache_bytes,
    layer_activation_bytes_per_token,
    lora_parameter_count,
    parameter_count,
    weight_bytes,
)

# h=8, I=16, 2 layers, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4), vocab 100, tied, qkv bias
SMALL = ModelShape(
    vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
    tie_embeddings=True, qkv_bias=True,
)  # fmt: skip


def cpu_fp32(gradient_checkpointing: bool = False) -> Setup:
    return Setup("cpu", 4, False, lora_r=2, lora_modules=LINEAR_MODULES, gradient_checkpointing=gradient_checkpointing)


def test_parameter_counts_by_hand_and_against_the_public_qwen25_sizes():
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate/up/down 3 * 8*16 = 576; norms 2*8 + biases 8+4+4 = 32
    assert parameter_count(SMALL) == {"embeddings": 800, "linear": 1152, "other": 2 * 32 + 8}
    from transformers import AutoConfig

    from sdar_cli.perf.bench import SHAPES

    def total(name: str) -> int:
        shape = ModelShape.from_config(AutoConfig.for_model("qwen2", **SHAPES[name]))
        return sum(parameter_count(shape).values())

    assert total("qwen2.5-7b") == 7_615_616_512  # Qwen2.5-7B's model card: 7.61B
    assert total("qwen2.5-3b") == 3_085_938_688  # Qwen2.5-3B: 3.09B


def test_parameter_count_matches_a_real_transformers_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    from sdar_cli.perf.bench import SHAPES

    config = AutoConfig.for_model("qwen2", **SHAPES["tiny"])
    model = AutoModelForCausalLM.from_config(config)
    assert sum(parameter_count(ModelShape.from_config(config)).values()) == sum(p.numel() for p in model.parameters())


def test_weight_bytes_in_each_precision():
    assert weight_bytes(SMALL, 4, load_in_4bit=False) == 2024 * 4
    assert weight_bytes(SMALL, 2, load_in_4bit=False) == 2024 * 2
    # 4-bit: the 1152 projection weights at 0.5 + 1/64 + 4/16384 bytes; the other 872 stay bf16
    assert weight_bytes(SMALL, 2, load_in_4bit=True) == round(1152 * 0.515869140625 + 872 * 2)


def test_lora_parameters_are_r_times_fan_in_plus_fan_out():
    # per layer 2 * ((8+8) + (8+4) + (8+4) + (8+8) + (8+16) + (8+16) + (16+8)) = 256
    assert lora_parameter_count(SMALL, 2, LINEAR_MODULES) == 512
    assert lora_parameter_count(SMALL, 2, ("q_proj", "v_proj")) == 2 * 2 * (16 + 12)


def test_per_token_sizes():
    # fp32, padded: projection inputs 2h + I = 32, attention 2q + 2q = 32, MLP 3I = 48, LoRA A outputs
    # 7r = 14, all 4 bytes; plus the two norms' fp32 inputs 2h x 4
    assert layer_activation_bytes_per_token(SMALL, cpu_fp32(), padded=True) == 126 * 4 + 64
    # without a padding mask SDPA takes k and v unrepeated: 2q + 2kv = 24
    assert layer_activation_bytes_per_token(SMALL, cpu_fp32(), padded=False) == 118 * 4 + 64
    # bf16 base, fp32 LoRA: each module saves its own (autocast bf16) copy of its input: 7 inputs (64) + q
    bf16 = Setup("cuda", 2, False, 2, LINEAR_MODULES, False)
    assert layer_activation_bytes_per_token(SMALL, bf16, padded=True) == (72 + 32 + 48 + 14) * 2 + 64
    # 4-bit base: the adapters stay fp32 there too (TRL's bf16 cast is undone), so the same cast copies
    qlora = Setup("cuda", 2, True, 2, LINEAR_MODULES, False)
    assert qlora.lora_bytes == 4
    assert layer_activation_bytes_per_token(SMALL, qlora, padded=True) == (72 + 32 + 48 + 14) * 2 + 64
    assert forward_transient_bytes_per_token(SMALL, 4) == 4 * (16 + 48) + 64
    # 2 (k and v) * 2 layers * kv_dim 4 * 3 rows * 10 tokens * 2 bytes
    assert kv_cache_bytes(SMALL, rows=3, tokens=10, dtype_bytes=2) == 960


WORKLOAD = Workload(
    rows=4, micro_batches=2, prompt_tokens=6, response_tokens=3, privileged_tokens=2, generation_rows=4,
    logprob_batch_size=2, with_reference=True, with_teacher=True,
)  # fmt: skip


def test_estimate_on_cpu_by_hand():
    estimate = estimate_peak_memory(SMALL, WORKLOAD, cpu_fp32())
    parts = estimate.components
    assert parts["weights"] == 8096
    assert parts["lora_and_adamw"] == 512 * 4 * 3 and parts["lora_gradients"] == 512 * 4
    assert parts["kv_cache"] == 2 * 2 * 4 * 4 * 9 * 4  # 4 rows x (6 + 3) tokens
    assert parts["generation_prefill"] == 4 * 6 * 320
    # passes: 2 rows x (2 + 6 + 3) tokens; the CPU head scores all 2 x 10 positions, 4 tiles of 20 x 100 fp32
    assert parts["logprob_pass"] == 2 * 11 * 320 + 20 * 8 * 4 + 4 * 20 * 100 * 4
    # update: micro-batch of 2 rows x 9 tokens, 2 layers of 568 bytes a token; backward starts in the head:
    # its input and fp32 gradient (16 positions x h) and 10 fp32 tiles of 16 x 100, more than one layer's backward
    assert parts["activations"] == 2 * 18 * 568 and parts["backward_workspace"] == 18 * 568
    assert parts["logprob_head"] == 16 * 8 * (4 + 4) + 10 * 16 * 100 * 4
    resident = 8096 + 6144
    assert estimate.phases == {
        "generation": resident + 2304 + 7680,
        "passes": resident + 39680,
        "update": resident + 2048 + 20448 + 65024,
    }
    assert estimate.peak == 101760 and estimate.peak_phase == "update"


def test_checkpointing_keeps_only_layer_inputs_and_cuda_scores_only_responses():
    setup = Setup("cuda", 2, True, 2, LINEAR_MODULES, gradient_checkpointing=True)
    estimate = estimate_peak_memory(SMALL, WORKLOAD, setup)
    parts = estimate.components
    # 18 tokens x 2 layers x h 8 x 2 bytes; backward re-runs one layer (396 bytes a token) and holds its gradients
    assert parts["activations"] == 18 * 2 * 8 * 2 and parts["backward_workspace"] == 2 * 18 * 396
    # fp32 adapters over the 4-bit base: 512 parameters x 4 bytes x (weights + two AdamW moments), fp32 gradients
    assert parts["lora_and_adamw"] == 512 * 4 * 3 and parts["lora_gradients"] == 512 * 4
    # Triton scores the 2 x 3 response positions, one bf16 tile of 6 x 100
    assert parts["logprob_head"] == 6 * 8 * (2 + 4) + 6 * 100 * 2
    assert estimate.phases["update"] == parts["weights"] + parts["lora_and_adamw"] + 2048 + 576 + 2 * 18 * 396


def test_grpo_without_kl_has_no_logprob_pass():
    grpo = Workload(**{**WORKLOAD.__dict__, "with_reference": False, "with_teacher": False})
    assert estimate_peak_memory(SMALL, grpo, cpu_fp32()).components["logprob_pass"] == 0


def test_dry_run_prints_the_estimate_and_writes_nothing(tiny_model_dir, tmp_path):
    from sdar_cli.cli import app

    run_dir = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\noutput: {{dir: {run_dir}}}\n")
    result = CliRunner().invoke(app, ["train", str(config), "--dry-run", "--set", "train.device=cpu"])
    assert result.exit_code == 0, result.output
    assert "Estimated peak:" in result.output and "peak during update" in result.output
    assert "480 turn-samples per step (32 episodes x 15 turns)" in result.output
    assert not run_dir.exists()


def test_dry_run_measures_the_teachers_privileged_prefix(tiny_model_dir):
    from sdar_cli.config import load_config
    from sdar_cli.envs.builtin import HouseholdEnv
    from sdar_cli.models import load_tokenizer
    from sdar_cli.rollout import TurnRenderer
    from sdar_cli.run import measured_privileged_tokens

    base = [f"model.name={tiny_model_dir}", "train.device=cpu"]
    plan_only = load_config(None, [*base, "teacher.context=plan"])
    renderer = TurnRenderer(load_tokenizer(plan_only.model), plan_only.rollout, plan_only.teacher)
    env, lengths = HouseholdEnv(), []
    for task_id in env.task_ids("train")[::125]:  # 8 tasks spread over the 1000
        task, observation = env.reset(task_id)
        lengths.append(len(renderer.teacher_prefix_ids(renderer.privileged_context(task, observation.privileged))))
    assert measured_privileged_tokens(plan_only) == max(lengths) > 20
    # skills and plan: longer; no teacher: none; a model whose tokenizer cannot load: unknown
    assert measured_privileged_tokens(load_config(None, [*base, "teacher.context=both"])) > max(lengths) + 50
    assert measured_privileged_tokens(load_config(None, [*base, "algorithm.name=grpo"])) == 0
    assert measured_privileged_tokens(load_config(None, ["model.name=/nonexistent/model"])) is None
    # an environment that does not declare cheap resets (servers, games, corpora) is not built: assumed
    webshop = load_config(None, [*base, "env.name=webshop", "env.kwargs={server_url: 'http://127.0.0.1:9'}"])
    assert measured_privileged_tokens(webshop) is None


def test_dry_run_warns_when_the_run_cannot_fit(tiny_model_dir, tmp_path, monkeypatch):
    import sdar_cli.run as run_module
    from sdar_cli.config import load_config

    monkeypatch.setattr(run_module, "FIT_FRACTION", 1e-9)
    config = load_config(None, [f"model.name={tiny_model_dir}", "train.device=cpu"])
    warnings = run_module.dry_run(config)
    assert len(warnings) == 1 and "will not fit this machine's memory" in warnings[0]


def test_dry_run_for_a_gpu_on_a_machine_without_one(tiny_model_dir):
    import torch

    from sdar_cli.config import load_config
    from sdar_cli.run import dry_run

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    config = load_config(None, [f"model.name={tiny_model_dir}", "train.device=cuda", "model.load_in_4bit=true"])
    assert dry_run(config) == ["train.device is cuda but no CUDA GPU is visible here: the fit could not be checked."]
