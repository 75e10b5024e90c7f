"""The parts of the GPU path a CPU can check: fp32 adapters under a quantized base, gradient-checkpointing
hooks that do not pile up, and one host copy of the gates per micro-batch."""

from __future__ import annotations

from dataclasses import replace

import torch
from conftest import build_trainer, one_torch_thread, tiny_config
from transformers import TrainerCallback

from sdar_cli.models import adapter_weights_to_fp32, load_base_model


def test_adamw_at_a_small_learning_rate_needs_fp32_adapter_weights():
    """Why the cast matters: the same AdamW steps change every fp32 entry but few bf16 ones."""
    torch.manual_seed(0)
    start = torch.randn(64, 256) * 0.02  # the scale of a freshly initialised lora_A
    grads = [torch.randn(64, 256) for _ in range(10)]
    changed = {}
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.nn.Parameter(start.to(dtype).clone())
        optimizer = torch.optim.AdamW([weight], lr=1e-5, weight_decay=0.0)
        for grad in grads:
            weight.grad = grad.to(dtype)
            optimizer.step()
        changed[dtype] = (weight.detach() != start.to(dtype)).float().mean().item()
    assert changed[torch.float32] > 0.99
    assert changed[torch.bfloat16] < 0.3

    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    layer.bias.requires_grad_(False)
    assert adapter_weights_to_fp32(layer) == 1
    assert layer.weight.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16


def test_adapter_and_optimizer_state_stay_fp32_over_a_quantized_base(tiny_model_dir, tmp_path):
    """A bf16 base flagged as 4-bit takes TRL's QLoRA path, which casts the adapter to bf16; SDARTrainer
    casts it back, and AdamW's moments follow the parameters."""
    config = tiny_config(tiny_model_dir, tmp_path / "run", "model.dtype=bfloat16", "train.max_steps=1", "train.save_steps=100")
    model = load_base_model(config.model, torch.device("cpu"))
    model.is_loaded_in_4bit = True  # what bitsandbytes sets; TRL reads only this flag
    with one_torch_thread():
        trainer, _ = build_trainer(config, tmp_path / "run", model=model)
        adapter = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
        frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
        assert adapter and all(".lora_" in name for name in adapter)
        assert {p.dtype for p in adapter.values()} == {torch.float32}
        assert {p.dtype for p in frozen} == {torch.bfloat16}
        before = {name: p.detach().clone() for name, p in adapter.items()}
        trainer.train()
    moments = [v for state in trainer.optimizer.state.values() for k, v in state.items() if k.startswith("exp_avg")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert any(not torch.equal(before[name], p.detach()) for name, p in adapter.items())


class _EmbeddingHookCounter(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.counts: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(len(self.trainer.model.get_input_embeddings()._forward_hooks))


def test_gradient_checkpointing_hooks_stay_constant_over_steps(tiny_model_dir, tmp_path):
    """Each step pauses checkpointing twice (rollout, log-prob passes); re-enabling must not add hooks
    (TRL's context manager left 4, 6, 8, 10 after steps 1-4)."""
    config = tiny_config(
        tiny_model_dir, tmp_path / "run", "train.gradient_checkpointing=true", "train.max_steps=4", "train.save_steps=100"
    )
    counter = _EmbeddingHookCounter()
    with one_torch_thread():
        trainer, _ = build_trainer(config, tmp_path / "run", callbacks=[counter])
        counter.trainer = trainer
        trainer.train()
    assert trainer.model.is_gradient_checkpointing
    assert len(counter.counts) == 4 and counter.counts[0] >= 1
    assert counter.counts == [counter.counts[0]] * 4


def test_a_4bit_weight_counts_its_logical_parameters_not_its_packed_bytes():
    from types import SimpleNamespace

    from sdar_cli.perf.bench import logical_parameter_count

    model = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.LayerNorm(6))
    assert logical_parameter_count(model) == 48 + 12
    # what bitsandbytes leaves: a uint8 tensor of 24 bytes holding the 48 NF4 values, the shape in quant_state
    packed = torch.nn.Parameter(torch.zeros(24, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([6, 8]))
    model[0].weight = packed
    assert sum(p.numel() for p in model.parameters()) == 24 + 12
    assert logical_parameter_count(model) == 48 + 12


def test_a_cuda_bench_table_shows_reserved_allocated_and_the_context():
    from rich.console import Console

    from sdar_cli.perf.bench import BenchConfig, build_report, render_table

    gib = 1 << 30
    run = {
        "steps": [{"generation": 1.0, "reference_pass": 1.0, "teacher_pass": 0.0, "update": 2.0, "step": 4.0}],
        "memory": {
            "peak_bytes": 9 * gib, "baseline_bytes": None, "after_load_bytes": None, "peak_over_baseline_bytes": 9 * gib,
            "allocated_peak_bytes": 7 * gib, "cuda_context_bytes": gib // 2,
        },
        "estimate": {"peak_bytes": 8 * gib},
        "hardware": {"device": "cuda", "memory_kind": "max reserved", "device_name": "GPU"},
        "shape": {"parameters": 7.6e9, "lora_parameters": 1.6e8},
    }  # fmt: skip
    report = build_report(BenchConfig(), {"grpo": [run], "sdar": [run]})
    console = Console(width=200, record=True)
    console.print(render_table(report))
    text = console.export_text()
    assert "peak memory (max reserved)" in text and "9.00" in text
    assert "peak allocated (tensors alone)" in text and "7.00" in text
    assert "CUDA context (not in reserved)" in text and "0.50" in text


def _seven_b_dry_run_config(folder):
    from transformers import Qwen2Config

    from sdar_cli.perf.bench import SHAPES
    from sdar_cli.config import load_config

    Qwen2Config(**SHAPES["qwen2.5-7b"]).save_pretrained(folder)  # the config alone: no weights
    return load_config(None, [
        f"model.name={folder}", "model.load_in_4bit=true", "model.lora.r=64", "model.lora.alpha=128",
        "rollout.tasks_per_step=4", "rollout.group_size=8", "rollout.max_turns=15", "rollout.max_prompt_tokens=2048",
        "rollout.max_new_tokens=512", "train.micro_batches=8", "train.gradient_checkpointing=true", "train.device=cuda",
    ])  # fmt: skip


def test_advice_names_the_smallest_knob_change_that_fits(tmp_path):
    from sdar_cli.perf.memory import (
        ModelShape,
        advice_to_fit,
        estimate_peak_memory,
        setup_for_run,
        workload_for_run,
    )
    from sdar_cli.models import load_model_config

    config = _seven_b_dry_run_config(tmp_path)
    shape = ModelShape.from_config(load_model_config(config.model))
    workload = workload_for_run(config, 15)
    setup = setup_for_run(config, "cuda", 2)

    def peak(**changes):
        return estimate_peak_memory(shape, replace(workload, **changes), setup).peak

    budget = 72 * 2**30
    assert peak() > budget
    advice = advice_to_fit(shape, workload, setup, budget, episodes=32)
    assert [a.settings for a in advice] == [{"train.micro_batches": 16}]  # 32 episodes: 16 is the next divisor
    assert advice[0].peak == peak(micro_batches=16) <= budget
    # the log-prob passes are not what overflows here: no logprob_batch_size reaches the budget alone
    assert peak(logprob_batch_size=1) > budget
    # 256-row log-prob passes: at 32 micro-batches only the passes overflow, and the advice is the largest
    # logprob_batch_size that fits
    wide = replace(workload, micro_batches=32, logprob_batch_size=256)
    budget = 40 * 2**30
    [advice] = advice_to_fit(shape, wide, setup, budget, episodes=32)
    size = advice.settings["train.logprob_batch_size"]
    assert list(advice.settings) == ["train.logprob_batch_size"] and 1 < size < 256
    assert peak(micro_batches=32, logprob_batch_size=size) == advice.peak <= budget
    assert peak(micro_batches=32, logprob_batch_size=size + 1) > budget
    # at 8 micro-batches neither knob is enough alone: the first pair that fits
    [advice] = advice_to_fit(shape, replace(wide, micro_batches=8), setup, budget, episodes=32)
    assert advice.settings == {"train.micro_batches": 32, "train.logprob_batch_size": size}
    # nothing these two knobs reach fits a budget below the weights
    assert advice_to_fit(shape, workload, setup, 2**30, episodes=32) == []


def test_dry_run_says_which_knob_brings_a_7b_run_under_the_visible_gpu(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import sdar_cli.run as run_module

    config = _seven_b_dry_run_config(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "an 80 GiB GPU")
    [warning] = run_module.dry_run(config)
    assert warning.startswith("the estimated peak 110.66 GiB will not fit the visible GPU (an 80 GiB GPU, 80.00 GiB).")
    assert "To fit, set train.micro_batches=16 (estimated peak 59.12 GiB, 51.54 GiB less)." in warning
    # gradient checkpointing and the 4-bit base are already on: not suggested again
    assert warning.endswith("Otherwise shorten rollout.max_prompt_tokens.")


def test_dry_run_counts_vllms_share_of_the_gpu_while_generating(tmp_path, monkeypatch):
    """The same 7B run with rollout.engine hf and vllm on an 80 GiB GPU: with vLLM the generation phase holds
    gpu_memory_utilization of the GPU instead of the training model's KV cache, the other phases are the
    same, and a share that leaves no room beside the training model is refused with the share that fits."""
    from types import SimpleNamespace

    from rich.console import Console

    import sdar_cli.run as run_module
    from sdar_cli.models import load_model_config
    from sdar_cli.perf.memory import (
        ModelShape,
        estimate_peak_memory,
        kv_cache_bytes,
        setup_for_run,
        weight_bytes,
        workload_for_run,
    )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "an 80 GiB GPU")
    hf = _seven_b_dry_run_config(tmp_path)
    hf.train.micro_batches = 16  # fits with hf (the test above)
    vllm = hf.model_copy(deep=True)
    vllm.rollout.engine = "vllm"
    shape = ModelShape.from_config(load_model_config(hf.model))
    workload = workload_for_run(hf, 15)
    estimates = {name: estimate_peak_memory(shape, workload, setup_for_run(config, "cuda", 2, gpu_bytes=80 * 2**30))
                 for name, config in (("hf", hf), ("vllm", vllm))}
    resident = estimates["hf"].components["weights"] + estimates["hf"].components["lora_and_adamw"]
    assert estimates["vllm"].components["vllm_engine"] == round(0.3 * 80 * 2**30)
    assert "kv_cache" not in estimates["vllm"].components and estimates["hf"].components["kv_cache"] > 0
    assert estimates["vllm"].phases["generation"] == resident + round(0.3 * 80 * 2**30)
    assert estimates["vllm"].phases["generation"] != estimates["hf"].phases["generation"]
    for phase in ("passes", "update"):
        assert estimates["vllm"].phases[phase] == estimates["hf"].phases[phase]

    def dry_run(config):
        console = Console(record=True, width=200)
        return run_module.dry_run(config, console), console.export_text()

    warnings, text = dry_run(vllm)
    assert warnings == [] and "vLLM takes rollout.vllm.gpu_memory_utilization=0.3 of the GPU" in text
    assert "Fits the visible GPU" in text
    gpu = 80 * 2**30
    highest = int((0.9 * gpu - resident) / gpu * 100) / 100
    vllm_needs = weight_bytes(shape, 2, True) + kv_cache_bytes(shape, 1, 2048 + 512, 2)
    lowest = -(-vllm_needs * 100 // gpu) / 100
    assert 0 < lowest < 0.3 < highest < 0.9
    vllm.rollout.vllm.gpu_memory_utilization = 0.9
    [warning], text = dry_run(vllm)
    assert warning == (f"while generating, vLLM's share (0.9 of the GPU: 72.00 GiB) beside the training model's "
                       f"{resident / 2**30:.2f} GiB will not fit the visible GPU (an 80 GiB GPU, 80.00 GiB). To fit, set "
                       f"rollout.vllm.gpu_memory_utilization between {lowest:.2f} and {highest:.2f}.")
    assert "Fits the visible GPU" not in text
    for share in (lowest, highest):
        vllm.rollout.vllm.gpu_memory_utilization = share
        assert dry_run(vllm)[0] == []
    # a share below vLLM's own weights and one longest sequence's KV cache: it would not start, though it "fits"
    vllm.rollout.vllm.gpu_memory_utilization = 0.05
    [warning], text = dry_run(vllm)
    assert warning.startswith("vLLM's share (0.05 of the GPU: 4.00 GiB) is smaller than its weights and one "
                              f"2560-token sequence's KV cache ({vllm_needs / 2**30:.2f} GiB): the engine would not start.")
    assert "Fits the visible GPU" not in text
    # the training phases overflowing too (2 micro-batches): each warning names its own fix
    vllm.rollout.vllm.gpu_memory_utilization = 0.9
    vllm.train.micro_batches = 2
    share_warning, phases_warning = dry_run(vllm)[0]
    assert share_warning.startswith("while generating, vLLM's share (0.9")
    assert phases_warning.startswith("the training phases' peak (update)") and "train.micro_batches=" in phases_warning
    # on a 6 GiB GPU no share fits beside the training model
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=6 * 2**30))
    vllm.train.micro_batches = 16
    warnings, _ = dry_run(vllm)
    assert warnings[0].endswith(f"No share fits beside the training model's {resident / 2**30:.2f} GiB on this GPU: "
                                "use rollout.engine: hf.")  # the model is 4-bit already: not suggested again
    # without a visible GPU the share is named, not guessed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warnings, text = dry_run(vllm)
    assert "Not in this estimate: vLLM's own memory" in text
    _, hf_text = dry_run(hf)
    assert "vLLM" not in hf_text
