"""The GPU measurements of docs/performance.md in one command (bench/gpu_check.sh runs this).

On a CUDA machine with the project installed (no network needed: every model is random-initialised):

1. `sdar bench bench/gpu_7b.yaml` (Qwen2.5-7B shape, NF4 base, LoRA r=64): peak reserved memory against the
   memory.py estimate, and the sdar/grpo time and memory ratios. Without bitsandbytes: bench/gpu_3b_bf16.yaml.
2. A 3-step `sdar train` of a random-init Qwen2.5-3B-shaped model on the built-in household tasks, with
   `rollout.engine: hf` and, where vLLM is installed, `vllm`: rollout tokens per second per engine and as a
   fraction of the memory-bandwidth bound (each decode step reads the weights once, so at batch B the bound is
   B x bandwidth / weight bytes; the KV cache read is left out, which makes the bound generous).

It prints what it needs and skips what is missing. The bandwidth comes from a table of known GPUs, or from
GPU_BANDWIDTH_GBPS (GB/s) when set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: peak memory bandwidth in GB/s by device-name fragment (vendor data sheets)
BANDWIDTH_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864, "A10G": 600, "L4": 300, "4090": 1008}
TRAIN_STEPS = 3


def sdar(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdar_cli", *args], check=check)


def bandwidth_gbps(name: str) -> float | None:
    if os.environ.get("GPU_BANDWIDTH_GBPS"):
        return float(os.environ["GPU_BANDWIDTH_GBPS"])
    return next((value for fragment, value in BANDWIDTH_GBPS.items() if fragment in name), None)


def bench_part(out: Path) -> None:
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    config = "bench/gpu_7b.yaml" if has_bnb else "bench/gpu_3b_bf16.yaml"
    if not has_bnb:
        print("bitsandbytes is not installed (pip install 'sdar-cli[gpu]'): the 7B NF4 bench is skipped, the 3B bf16 one runs.")
    sdar("bench", str(REPO / config), "--output", str(out / "bench.json"))
    report = json.loads((out / "bench.json").read_text())
    for name, algorithm in report["algorithms"].items():
        memory, estimate = algorithm["memory"], algorithm["estimate"]["peak_bytes"]
        print(
            f"{config} {name}: peak reserved {memory['peak_bytes'] / 2**30:.2f} GiB (allocated "
            f"{(memory.get('allocated_peak_bytes') or 0) / 2**30:.2f}, CUDA context {(memory.get('cuda_context_bytes') or 0) / 2**30:.2f}) "
            f"vs estimate {estimate / 2**30:.2f} GiB"
        )
    print(f"sdar/grpo: time {report['time_ratio']:.3f}x, memory {report['memory_ratio']:.3f}x")


def model_3b() -> tuple[Path, int]:
    """A random Qwen2.5-3B-shaped model with the embedded SmolLM2 tokenizer (real text, ids < its vocabulary)."""
    import torch
    from transformers import AutoTokenizer

    from sdar_cli.perf.bench import SHAPES, random_model_dir
    from sdar_cli.models import embedded_model_dir

    folder = random_model_dir("qwen2.5-3b", SHAPES["qwen2.5-3b"], seed=0)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(folder)
    weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    torch.cuda.empty_cache()
    return folder, weight_bytes


def train_part(out: Path) -> None:
    import torch

    engines = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    if len(engines) == 1:
        print("vLLM is not installed: only rollout.engine=hf is measured (see the README's vLLM section).")
    folder, weight_bytes = model_3b()
    name = torch.cuda.get_device_name(0)
    bandwidth = bandwidth_gbps(name)
    batch = 4 * 8  # tasks_per_step x group_size below: every active episode decodes in one batch
    bound = batch * bandwidth * 1e9 / weight_bytes if bandwidth else None
    for engine in engines:
        run = out / f"train-{engine}"
        sdar(
            "train", str(REPO / "examples" / "quickstart.yaml"), "-o", str(run),
            "--set", f"model.name={folder}", "--set", "model.lora.r=16", "--set", "model.lora.alpha=32",
            "--set", "rollout.tasks_per_step=4", "--set", "rollout.group_size=8", "--set", "rollout.max_new_tokens=64",
            "--set", "train.micro_batches=8", "--set", "train.gradient_checkpointing=true",
            "--set", f"train.max_steps={TRAIN_STEPS}", "--set", f"train.save_steps={TRAIN_STEPS}",
            "--set", f"rollout.engine={engine}",
        )  # fmt: skip
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for record in records[1:]:  # step 1 holds the engine's start and warm-up
            rate = record["response_tokens"] / record["generation_seconds"]
            fraction = f", {rate / bound:.1%} of the {bound:,.0f} tok/s bandwidth bound" if bound else ""
            print(f"{engine} step {record['step']}: {record['step_seconds']:.1f} s, rollout {rate:,.0f} tok/s{fraction}")
    if bound is None:
        print(f"No bandwidth known for {name}: set GPU_BANDWIDTH_GBPS to get the fraction of the bound.")


def main() -> int:
    try:
        import torch
    except ImportError:
        print("Needs torch with CUDA, and the project: pip install -e '.[gpu]' (plus vllm for the vLLM engine).")
        return 2
    if not torch.cuda.is_available():
        print("No CUDA GPU is visible: these are the GPU measurements. On a CPU run bench/engines.py and sdar bench bench/cpu_small.yaml.")
        return 2
    missing = [m for m in ("trl", "datasets", "peft", "sdar_cli") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"Missing packages: {', '.join(missing)}. Install the project: pip install -e '.[gpu]'.")
        return 2
    out = Path(os.environ.get("SDAR_GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="sdar-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"GPU: {torch.cuda.get_device_name(0)}; outputs in {out}")
    bench_part(out)
    train_part(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
