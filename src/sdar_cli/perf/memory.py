"""Estimate the peak memory of a training run from the model's config alone (no weights loaded).

A step goes through three phases on one set of weights, and its peak is the largest of them:

    generation   resident + KV cache + one prefill layer's transients
                 (rollout.engine: vllm on a GPU: resident + vLLM's gpu_memory_utilization share instead)
    passes       resident + one no-grad forward chunk (reference, then teacher: the longer prompt)
    update       resident + LoRA gradients + a micro-batch's saved activations
                 + the larger of the log-prob head's backward and one layer's backward
    resident   = base weights + LoRA parameters + AdamW's two moment buffers

Every quantity is in bytes. The sizes per token come from the code that runs (transformers'
Qwen2/Llama layers, PEFT's LoRA layer, TRL's fused log-prob head), checked by walking the autograd
graph of a layer; they are estimates: `docs/performance.md` compares them with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: PEFT's names of the seven projections of a Llama/Qwen2 decoder layer
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: NF4 with double quantisation: 4 bits a weight + an 8-bit absmax per 64 weights + an fp32 scale per 256 absmax
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: TRL's fused log-prob head projects tiles of at most this many positions x this many vocabulary entries
HEAD_TILE_TOKENS = 4096
HEAD_TILE_VOCAB = 32768
#: tile-sized buffers alive at once in the head: one on CUDA (Triton folds a tile in place); on other
#: devices the torch fallback makes fp32 temporaries of the tile (forward: the scaled logits, exp and
#: their product; backward: logits, log-probs, probabilities and the gradient terms)
HEAD_TILES_FORWARD_CPU = 4
HEAD_TILES_BACKWARD_CPU = 10


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer (Llama, Qwen2, Mistral, SmolLM families)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Read a transformers config (`AutoConfig.from_pretrained(path)`)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias = config.model_type.startswith("qwen2") or bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class Workload:
    """What one training step processes (the rows are turn-samples, padded to the longest)."""

    rows: int
    micro_batches: int
    prompt_tokens: int
    response_tokens: int
    privileged_tokens: int
    generation_rows: int
    logprob_batch_size: int
    with_reference: bool
    with_teacher: bool
    padded: bool = True  # rows of different lengths: attention gets a padding mask


@dataclass(frozen=True)
class Setup:
    """Where and how the weights live."""

    device: str  # "cuda" or "cpu"
    dtype_bytes: int  # 2 for bf16/fp16, 4 for fp32
    load_in_4bit: bool
    lora_r: int
    lora_modules: tuple[str, ...]
    gradient_checkpointing: bool
    # rollout.engine: vllm on a GPU: what vLLM takes while it generates (gpu_memory_utilization x the GPU:
    # its own copy of the weights and its KV cache; asleep during the other phases). None: the training
    # model generates, with its own KV cache
    engine_bytes: int | None = None

    @property
    def lora_bytes(self) -> int:
        # adapters, their gradients and AdamW's moments are fp32 over any base: PEFT keeps them so over
        # bf16, and SDARTrainer undoes TRL's bf16 cast over a 4-bit base (models.adapter_weights_to_fp32)
        return 4

    @property
    def lora_inputs_cast(self) -> bool:
        """Whether each LoRA layer casts its input to its own dtype (a copy autocast saves for backward)."""
        return self.lora_bytes != self.dtype_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    components: dict[str, int]  # named parts, each counted once
    phases: dict[str, int]  # generation / passes / update: total bytes at that phase's peak

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)


def parameter_count(shape: ModelShape) -> dict[str, int]:
    """Parameters by kind: `embeddings` (+ an untied `lm_head`), `linear` (the projections), `other` (norms, biases).

        linear per layer = h*q + 2*h*kv + q*h + 3*h*I
    """
    linear = shape.num_layers * sum(fan_in * fan_out for fan_in, fan_out in shape.module_dims().values())
    biases = shape.q_dim + 2 * shape.kv_dim if shape.qkv_bias else 0
    other = shape.num_layers * (2 * shape.hidden_size + biases) + shape.hidden_size
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_embeddings else 2)
    return {"embeddings": embeddings, "linear": linear, "other": other}


def weight_bytes(shape: ModelShape, dtype_bytes: int, load_in_4bit: bool) -> int:
    """Base weights. 4-bit (bitsandbytes NF4) quantises the projections only; embeddings, the LM head,
    norms and biases stay in the compute dtype."""
    counts = parameter_count(shape)
    linear_bytes = counts["linear"] * (NF4_BYTES_PER_PARAM if load_in_4bit else dtype_bytes)
    return round(linear_bytes + (counts["embeddings"] + counts["other"]) * dtype_bytes)


def lora_parameter_count(shape: ModelShape, r: int, modules: tuple[str, ...]) -> int:
    """LoRA adds A (r x in) and B (out x r) to every targeted projection: r * (in + out) each."""
    dims = shape.module_dims()
    return shape.num_layers * sum(r * (dims[name][0] + dims[name][1]) for name in modules if name in dims)


def layer_activation_bytes_per_token(shape: ModelShape, setup: Setup, padded: bool) -> int:
    """What one decoder layer saves for backward, per token (found by walking the autograd graph).

    The frozen base projections save nothing; LoRA's A matmuls save the projections' inputs: the two
    normed inputs and the MLP product (2h + I, shared by the modules reading them) or, when LoRA
    casts its input to its own dtype, one copy per module (5h + q + I). Attention keeps q, k, v and its
    output (2q + 2kv; k and v repeated to all q heads when a padding mask is passed). The MLP keeps
    gate, act(gate) and up (3I). Each RMSNorm keeps its input in fp32 (2 x h x 4 bytes). LoRA's A
    outputs: r per module.
    """
    h, i, q, b = shape.hidden_size, shape.intermediate_size, shape.q_dim, setup.dtype_bytes
    dims = shape.module_dims()
    modules = [m for m in setup.lora_modules if m in dims]
    kv = q if padded else shape.kv_dim
    if setup.lora_inputs_cast:
        projection_inputs = sum(dims[m][0] for m in modules) + q  # the attention output is a separate tensor
    else:
        projection_inputs = 2 * h + i
    saved = b * (projection_inputs + 2 * q + 2 * kv + 3 * i + setup.lora_r * len(modules))
    return saved + 4 * 2 * h


def forward_transient_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Peak of a no-grad forward, per token: the residual stream and the normed input (2h), the MLP's
    act(gate), up and their product alive together (3I), and the norm's fp32 upcast (2h x 4 bytes)."""
    return dtype_bytes * (2 * shape.hidden_size + 3 * shape.intermediate_size) + 4 * 2 * shape.hidden_size


def head_tile_bytes(shape: ModelShape, scored_positions: int, dtype_bytes: int, device: str) -> int:
    """One tile of TRL's fused log-prob head: min(positions, 4096) x min(vocab, 32768) logits.

    On CUDA the tile is in the compute dtype; elsewhere the torch fallback folds it in fp32.
    """
    tile = min(scored_positions, HEAD_TILE_TOKENS) * min(shape.vocab_size, HEAD_TILE_VOCAB)
    return tile * (dtype_bytes if device == "cuda" else 4)


def scored_positions(rows: int, sequence: int, response: int, device: str) -> int:
    """Positions the fused head projects: only labelled ones on CUDA (Triton), all of them elsewhere."""
    return rows * (response if device == "cuda" else sequence - 1)


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every layer: 2 * layers * kv_heads * head_dim * rows * tokens."""
    return 2 * shape.num_layers * shape.kv_dim * rows * tokens * dtype_bytes


def estimate_peak_memory(shape: ModelShape, workload: Workload, setup: Setup) -> MemoryEstimate:
    """The components of a step's memory and the total at each phase's peak (see the module docstring)."""
    b = setup.dtype_bytes
    h = shape.hidden_size
    lora_params = lora_parameter_count(shape, setup.lora_r, setup.lora_modules)
    weights = weight_bytes(shape, b, setup.load_in_4bit)
    lora_state = lora_params * setup.lora_bytes * 3  # parameters + AdamW exp_avg + exp_avg_sq
    lora_grads = lora_params * setup.lora_bytes
    resident = weights + lora_state

    # generation: all active episodes at once, prompt + response cached
    sequence = workload.prompt_tokens + workload.response_tokens
    kv_cache = kv_cache_bytes(shape, workload.generation_rows, sequence, b)
    prefill = workload.generation_rows * workload.prompt_tokens * forward_transient_bytes_per_token(shape, b)
    if setup.engine_bytes is None:
        generation = {"kv_cache": kv_cache, "generation_prefill": prefill}
    else:  # vLLM generates, within its own reservation
        generation = {"vllm_engine": setup.engine_bytes}

    # no-grad log-prob passes, logprob_batch_size rows at a time; the teacher's prompt is the longer one
    pass_sequence = sequence + (workload.privileged_tokens if workload.with_teacher else 0)
    pass_rows = min(workload.logprob_batch_size, workload.rows)
    pass_positions = scored_positions(pass_rows, pass_sequence, workload.response_tokens, setup.device)
    head_tiles_forward = 1 if setup.device == "cuda" else HEAD_TILES_FORWARD_CPU
    passes = pass_rows * pass_sequence * forward_transient_bytes_per_token(shape, b) + (
        pass_positions * h * b + head_tiles_forward * head_tile_bytes(shape, pass_positions, b, setup.device)
    )
    if not (workload.with_reference or workload.with_teacher):
        passes = 0

    # update: one micro-batch forward with saved activations, then its backward, which starts in the head
    micro_rows = -(-workload.rows // workload.micro_batches)
    micro_tokens = micro_rows * sequence
    per_layer = micro_tokens * layer_activation_bytes_per_token(shape, setup, workload.padded)
    if setup.gradient_checkpointing:
        # each layer keeps its input; backward re-runs one layer at a time and holds its gradients
        activations = micro_tokens * shape.num_layers * h * b
        backward_workspace = 2 * per_layer
    else:
        activations = shape.num_layers * per_layer
        backward_workspace = per_layer  # the gradients of the layer being back-propagated
    train_positions = scored_positions(micro_rows, sequence, workload.response_tokens, setup.device)
    head_tiles_backward = 1 if setup.device == "cuda" else HEAD_TILES_BACKWARD_CPU
    # the head keeps its input hidden states and accumulates their gradient in fp32
    head = train_positions * h * (b + 4) + head_tiles_backward * head_tile_bytes(
        shape, train_positions, b, setup.device
    )
    update = lora_grads + activations + max(head, backward_workspace)

    components = {
        "weights": weights,
        "lora_and_adamw": lora_state,
        "lora_gradients": lora_grads,
        **generation,
        "logprob_pass": passes,
        "activations": activations,
        "backward_workspace": backward_workspace,
        "logprob_head": head,
    }
    phases = {
        "generation": resident + sum(generation.values()),
        "passes": resident + passes,
        "update": resident + update,
    }
    return MemoryEstimate(components=components, phases=phases)


@dataclass(frozen=True)
class FitAdvice:
    """Settings that bring the estimated peak under a budget, and the peak they give."""

    settings: dict[str, int]
    peak: int


def advice_to_fit(shape: ModelShape, workload: Workload, setup: Setup, budget: float, episodes: int) -> list[FitAdvice]:
    """The smallest change of each memory knob that brings the estimated peak under `budget` bytes.

    `train.micro_batches`: the fewest micro-batches (a divisor of the step's `episodes`, as the config
    requires) above the current count; `train.logprob_batch_size`: the largest size below the current
    one (fewer, larger passes are faster). When neither fits alone, the first pair that does. Empty
    when nothing these two knobs reach fits.
    """

    def peak(micro_batches: int, logprob_batch_size: int) -> int:
        changed = replace(workload, micro_batches=micro_batches, logprob_batch_size=logprob_batch_size)
        return estimate_peak_memory(shape, changed, setup).peak

    micro_options = [d for d in range(workload.micro_batches + 1, episodes + 1) if episodes % d == 0]
    logprob_options = [n for n in range(workload.logprob_batch_size - 1, 0, -1)]
    advice = []
    for micro in micro_options:
        if (value := peak(micro, workload.logprob_batch_size)) <= budget:
            advice.append(FitAdvice({"train.micro_batches": micro}, value))
            break
    for size in logprob_options:
        if (value := peak(workload.micro_batches, size)) <= budget:
            advice.append(FitAdvice({"train.logprob_batch_size": size}, value))
            break
    if advice:
        return advice
    for micro in micro_options:
        for size in logprob_options:
            if (value := peak(micro, size)) <= budget:
                return [FitAdvice({"train.micro_batches": micro, "train.logprob_batch_size": size}, value)]
    return []


def lora_modules(target_modules: list[str] | str) -> tuple[str, ...]:
    """The config's `model.lora.target_modules` as projection names ('all-linear' = all seven)."""
    if target_modules == "all-linear":
        return LINEAR_MODULES
    return tuple(target_modules)


#: HFPolicy generates at most this many episodes at once
GENERATION_BATCH_LIMIT = 64
#: the privileged context's length is not known before the run; the estimate assumes this many tokens
ASSUMED_PRIVILEGED_TOKENS = 256


def workload_for_run(config, max_turns: int, privileged_tokens: int = ASSUMED_PRIVILEGED_TOKENS) -> Workload:
    """The worst case of a `RunConfig`: every episode lasts `max_turns` turns (one row per turn) and every
    prompt is `rollout.max_prompt_tokens` long."""
    rollout, train = config.rollout, config.train
    episodes = rollout.tasks_per_step * rollout.group_size
    return Workload(
        rows=episodes * max_turns,
        micro_batches=train.micro_batches * train.updates_per_rollout,  # each micro-step holds 1/(k m) of the rows
        prompt_tokens=rollout.max_prompt_tokens,
        response_tokens=rollout.max_new_tokens,
        privileged_tokens=privileged_tokens,
        generation_rows=min(episodes, GENERATION_BATCH_LIMIT),
        logprob_batch_size=train.logprob_batch_size,
        with_reference=config.algorithm.kl_coef != 0,
        with_teacher=config.uses_teacher,
    )


def setup_for_run(config, device: str, dtype_bytes: int, gpu_bytes: int | None = None) -> Setup:
    """The run's Setup; with rollout.engine: vllm on a GPU of `gpu_bytes`, vLLM's share of it while generating."""
    vllm_on_gpu = config.rollout.engine == "vllm" and device == "cuda" and gpu_bytes is not None
    return Setup(
        device=device,
        dtype_bytes=dtype_bytes,
        load_in_4bit=config.model.load_in_4bit,
        lora_r=config.model.lora.r,
        lora_modules=lora_modules(config.model.lora.target_modules),
        gradient_checkpointing=config.train.gradient_checkpointing,
        engine_bytes=round(config.rollout.vllm.gpu_memory_utilization * gpu_bytes) if vllm_on_gpu else None,
    )
