"""Rollout engines side by side: transformers' generate (`hf`) against vLLM (`vllm`) on one run config.

    python bench/engines.py [CONFIG] [--rounds 2] [--train-steps 2] [--json engines.json]

Needs vLLM (on a CPU: the second virtual environment of `.ci/vllm`, or see the README). Two parts:

1. Rollouts: one training step's episodes (rollout.tasks_per_step tasks x rollout.group_size) played with
   each engine on the same tasks, each engine in a fresh process: an untimed warm-up round (vLLM's first
   call compiles its kernels), then a timed one; `rounds` processes per engine, in alternating order. Reported: response tokens per second of
   generation (the policy calls alone, not the environment) and their ratio vllm / hf. The episodes
   are sampled, so the two engines play different turns; tokens per second is what is compared.
2. Training: `sdar train CONFIG --set train.max_steps=N` with each engine in a fresh process; the
   step times from metrics.jsonl (vLLM's engine start falls in step 1's generation).

This is a benchmark, not a test: it prints numbers and ratios and judges nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

REPO = Path(__file__).resolve().parent.parent


class _TimedPolicy:
    """Wraps a policy: seconds spent inside it and response tokens it returned."""

    def __init__(self, policy):
        self.policy = policy
        self.seconds = 0.0
        self.tokens = 0
        self.calls = 0

    @property
    def sampler_logps(self):
        return getattr(self.policy, "sampler_logps", None)

    def __call__(self, prompts):
        started = time.perf_counter()
        responses = self.policy(prompts)
        self.seconds += time.perf_counter() - started
        self.tokens += sum(len(r) for r in responses)
        self.calls += 1
        return responses


def rollout_rate(config_path: str, engine: str) -> dict:
    """One engine in this process: an untimed warm-up round, then one timed round of the step's episodes."""
    import torch
    from peft import get_peft_model

    from sdar_cli.config import load_config
    from sdar_cli.envs import environment_factory
    from sdar_cli.models import load_base_model, load_tokenizer, lora_config, pick_device
    from sdar_cli.rollout import HFPolicy, TurnRenderer, play_episodes

    config = load_config(config_path, [])
    device = pick_device(config.train.device)
    tokenizer = load_tokenizer(config.model)
    model = get_peft_model(load_base_model(config.model, device), lora_config(config.model)).eval()
    make_env = environment_factory(config.env.name, config.env.kwargs)
    probe = make_env()
    task_ids = probe.task_ids(config.env.train_split)[: config.rollout.tasks_per_step]
    max_turns = config.rollout.max_turns or probe.max_turns
    probe.close()
    episodes = [task for task in task_ids for _ in range(config.rollout.group_size)]
    groups = [i // config.rollout.group_size for i in range(len(episodes))]
    renderer = TurnRenderer(tokenizer, config.rollout, config.teacher)

    started = time.perf_counter()
    if engine == "vllm":
        from sdar_cli.vllm_policy import VLLMPolicy

        policy = VLLMPolicy(tokenizer, config, device)
        policy.load_adapter(model)  # the (fresh) LoRA adapter as a LoRARequest, as in training
    else:
        policy = HFPolicy(model, tokenizer, config.rollout)
    start_seconds = time.perf_counter() - started

    def play() -> _TimedPolicy:
        timed = _TimedPolicy(policy)
        with torch.no_grad():
            play_episodes(episodes, groups, make_env, timed, renderer, max_turns)
        return timed

    warmup, timed = play(), play()
    return {
        "engine": engine,
        "episodes": len(episodes),
        "start_seconds": start_seconds,
        "warmup_seconds": warmup.seconds,
        "tokens": timed.tokens,
        "seconds": timed.seconds,
        "policy_calls": timed.calls,
        "torch_threads": torch.get_num_threads(),
    }


def rollout_rates(config_path: str, rounds: int) -> dict:
    """Each engine in its own fresh process (an in-process vLLM engine keeps threads that slow a
    transformers generate sharing its process), `rounds` times, in alternating order."""
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for index in range(rounds):
        for engine in ("hf", "vllm") if index % 2 == 0 else ("vllm", "hf"):
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "rate.json"
                command = [sys.executable, __file__, config_path, "--rollout-worker", engine, "--json", str(out)]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                runs[engine].append(json.loads(out.read_text()))
    result: dict = {"episodes": runs["hf"][0]["episodes"]}
    for engine, engine_runs in runs.items():
        result[engine] = {
            "runs": engine_runs,
            "tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in engine_runs),
        }
    result["ratio_vllm_over_hf"] = result["vllm"]["tokens_per_second"] / result["hf"]["tokens_per_second"]
    return result


def train_step_times(config_path: str, steps: int) -> dict:
    times = {}
    for engine in ("hf", "vllm"):
        with tempfile.TemporaryDirectory(prefix=f"sdar-bench-{engine}-") as run_dir:
            command = [
                sys.executable, "-m", "sdar_cli", "train", config_path, "-o", f"{run_dir}/run",
                "--set", f"train.max_steps={steps}", "--set", f"rollout.engine={engine}", "--set", f"train.save_steps={steps}",
            ]  # fmt: skip
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            records = [json.loads(line) for line in Path(f"{run_dir}/run/metrics.jsonl").read_text().splitlines()]
        times[engine] = [
            {key: record.get(key) for key in ("step", "step_seconds", "generation_seconds", "response_tokens")}
            for record in records
            if "step_seconds" in record
        ]
    last = {engine: steps_[-1] for engine, steps_ in times.items()}
    times["ratio_last_step_hf_over_vllm"] = last["hf"]["step_seconds"] / last["vllm"]["step_seconds"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "examples" / "quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=2, help="timed rollout rounds per engine; 0 skips the rollout part")
    parser.add_argument("--train-steps", type=int, default=2, help="0 skips the training part")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rollout-worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rollout_worker:
        args.json.write_text(json.dumps(rollout_rate(args.config, args.rollout_worker)))
        return

    report: dict = {"config": args.config}
    if args.rounds:
        report["rollouts"] = rollouts = rollout_rates(args.config, args.rounds)
        print(f"Rollouts of one training step ({rollouts['episodes']} episodes), response tokens per second of generation:")
        for name in ("hf", "vllm"):
            runs = ", ".join(
                f"{r['tokens']} tok / {r['seconds']:.1f} s (start {r['start_seconds']:.0f} s, warm-up {r['warmup_seconds']:.0f} s)"
                for r in rollouts[name]["runs"]
            )
            print(f"  {name:5s} {rollouts[name]['tokens_per_second']:8.1f} tok/s   {runs}")
        print(f"  vllm / hf: {rollouts['ratio_vllm_over_hf']:.2f}x")
    if args.train_steps:
        report["training"] = train_step_times(args.config, args.train_steps)
        print(f"sdar train, {args.train_steps} step(s) each, fresh processes:")
        for name in ("hf", "vllm"):
            steps = "  ".join(
                f"step {s['step']}: {s['step_seconds']:.1f} s (generation {s['generation_seconds']:.1f} s)"
                for s in report["training"][name]
            )
            print(f"  {name:5s} {steps}")
        print(f"  last step hf / vllm: {report['training']['ratio_last_step_hf_over_vllm']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
