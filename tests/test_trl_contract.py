"""The contract between sdar and the TRL / transformers internals it leans on (docs/upgrading-trl.md).

SDARTrainer overrides private GRPOTrainer methods and reads private attributes. A pinned upgrade that
removes or reshapes one of them should fail HERE, naming the hook, not deep inside a training step (or,
worse, silently: `Trainer._rotate_checkpoints` vanished in transformers 5.23 and nothing noticed).
When a test here fails: read what the upgrade changed in that hook, adapt the override, update the table.
"""

from __future__ import annotations

import inspect

import pytest

from conftest import build_trainer, one_torch_thread, tiny_config

#: every GRPOTrainer/Trainer method SDARTrainer overrides -> the parameters our override is called with
OVERRIDDEN = {
    "_generate_and_score_completions": ["self", "inputs"],
    "_get_per_token_logps_and_entropies": ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy"],
    "_compute_loss": ["self", "model", "inputs"],
    "training_step": ["self", "model", "inputs", "num_items_in_batch"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
}

#: batch keys our `_generate_and_score_completions` hands TRL and that TRL's `_compute_loss` must still read
LOSS_READS = [
    "completion_mask", "advantages", "old_per_token_logps", "ref_per_token_logps", "num_items_in_batch",
    "importance_sampling_ratio",  # rollout.engine: vllm (read under use_vllm and vllm_importance_sampling_correction)
]  # fmt: skip

#: TRL / transformers functions sdar calls or patches: (module, name, parameters that must exist)
FUNCTIONS = [
    ("trl.trainer.utils", "_use_triton", ["device"]),  # patched by cpu_scoring.py
    ("trl.trainer.utils", "add_fused_lm_head", []),  # logprobs.py: training's head outside the trainer
    ("transformers.trainer_utils", "rotate_checkpoints", []),  # save_total_limit on the run directory
]

#: GRPOTrainer attributes SDARTrainer reads after construction, and their types
ATTRIBUTES = {
    "_metrics": dict,  # {"train": {name: [values]}}: rollout metrics join TRL's log
    "_step": int,  # micro-step counter: an update ends when it is a multiple of the accumulation steps
    "current_gradient_accumulation_steps": int,  # set by transformers' training loop
    "beta": float,  # the KL coefficient (0: no reference pass)
    "num_generations": int,
    "num_iterations": int,
    "loss_type": str,
    "use_vllm": bool,  # with vllm_importance_sampling_correction: set by SDARTrainer for rollout.engine: vllm
    "vllm_importance_sampling_correction": bool,
}


@pytest.mark.parametrize("hook", sorted(OVERRIDDEN))
def test_every_overridden_hook_still_exists_with_our_parameters(hook):
    from trl import GRPOTrainer

    base = getattr(GRPOTrainer, hook, None)
    assert base is not None, f"TRL no longer has GRPOTrainer.{hook}, which SDARTrainer overrides"
    parameters = list(inspect.signature(base).parameters)
    missing = [name for name in OVERRIDDEN[hook] if name not in parameters]
    assert not missing, f"GRPOTrainer.{hook} lost parameters {missing} (has {parameters})"
    assert parameters[: len(OVERRIDDEN[hook])] == OVERRIDDEN[hook], f"GRPOTrainer.{hook} reordered its parameters: {parameters}"


def test_the_table_lists_every_override():
    """A new override of a TRL/transformers method must be added to the contract (and docs/upgrading-trl.md)."""
    from trl import GRPOTrainer

    from sdar_cli.trainer import SDARTrainer

    overrides = {
        name
        for name, value in vars(SDARTrainer).items()
        if callable(value) and name != "__init__" and hasattr(GRPOTrainer, name)
    }
    assert overrides == set(OVERRIDDEN), f"overrides not in the contract: {sorted(overrides - set(OVERRIDDEN))}; " \
        f"listed but no longer overridden: {sorted(set(OVERRIDDEN) - overrides)}"


def test_trls_loss_still_reads_the_batch_keys_we_hand_it():
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._compute_loss)
    missing = [key for key in LOSS_READS if f'"{key}"' not in source and f"'{key}'" not in source]
    assert not missing, f"GRPOTrainer._compute_loss no longer reads {missing}: the batch contract changed"


@pytest.mark.parametrize("module_name, name, parameters", FUNCTIONS, ids=[f"{m}.{n}" for m, n, _ in FUNCTIONS])
def test_library_functions_we_call_still_exist(module_name, name, parameters):
    import importlib

    function = getattr(importlib.import_module(module_name), name, None)
    assert callable(function), f"{module_name}.{name} is gone"
    present = list(inspect.signature(function).parameters)
    assert all(p in present for p in parameters), f"{module_name}.{name} lost parameters: has {present}"


def test_attributes_sdar_reads_exist_on_a_trainer_that_trained_a_step(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run", "train.max_steps=1", "output.save_gates=false")
    trainer, _ = build_trainer(config, tmp_path / "run")
    with one_torch_thread():
        trainer.train()  # some attributes (the accumulation steps) are set by the training loop
    for name, kind in ATTRIBUTES.items():
        assert hasattr(trainer, name), f"GRPOTrainer no longer sets {name}, which SDARTrainer reads"
        assert isinstance(getattr(trainer, name), kind), f"GRPOTrainer.{name} is a {type(getattr(trainer, name))}, not {kind}"
    assert "train" in trainer._metrics, "GRPOTrainer._metrics lost its 'train' mode"
