"""`sdar bench`: the report's fields and arithmetic, on the tiny shape (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdar_cli.perf.bench import BenchConfig, build_report, load_bench_config
from sdar_cli.config import ConfigError

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
PHASES = {"generation", "reference_pass", "teacher_pass", "update", "step"}


def test_tiny_benchmark_writes_a_complete_report(tmp_path, monkeypatch):
    from sdar_cli.cli import app

    monkeypatch.setenv("SDAR_CACHE", str(tmp_path / "cache"))
    # one thread: on a busy 2-core machine, two threads of tiny ops mostly wait on each other
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = tmp_path / "report.json"
    args = ["bench", str(BENCH_DIR / "tiny.yaml"), "-o", str(output)]
    for override in ("steps.warmup=0", "steps.measured=1", "batch.group_size=2"):
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sdar / grpo" in result.output and "time ratio sdar/grpo" in result.output
    report = json.loads(output.read_text())
    assert set(report["algorithms"]) == {"grpo", "sdar"}
    for name, measured in report["algorithms"].items():
        assert set(measured["seconds"]) == PHASES and len(measured["steps"]) == 1
        for phase in ("generation", "update", "step"):
            assert measured["seconds"][phase] > 0, (name, phase)
        assert measured["tokens_per_second"]["step"] > 0 and measured["tokens_per_second"]["generation"] > 0
        assert measured["memory"]["peak_bytes"] > measured["memory"]["baseline_bytes"] > 0
        assert measured["estimate"]["peak_bytes"] > 0
    assert report["algorithms"]["sdar"]["seconds"]["teacher_pass"] > 0
    assert report["algorithms"]["grpo"]["seconds"]["teacher_pass"] == 0.0  # grpo has no teacher pass
    for key in ("time_ratio", "time_ratio_without_generation", "time_ratio_fastest_steps", "memory_ratio"):
        assert report[key] > 0
    assert set(report["targets"]) == {"time_ratio_max", "memory_ratio_max", "time_met", "memory_met"}
    assert report["hardware"]["device"] == "cpu" and report["shape"]["num_layers"] == 2


def _worker_result(step_seconds: list[float], generation: float, peak: int) -> dict:
    steps = [
        {"generation": generation, "reference_pass": 1.0, "teacher_pass": 0.0, "update": s - generation - 1.0, "step": s}
        for s in step_seconds
    ]
    return {
        "steps": steps,
        "memory": {"peak_bytes": peak, "baseline_bytes": 100, "after_load_bytes": 150, "peak_over_baseline_bytes": peak - 100},
        "estimate": {"peak_bytes": 1},
        "hardware": {"device": "cpu"},
        "shape": {},
    }


def test_report_takes_medians_over_rounds_the_largest_peak_and_the_ratios():
    bench = BenchConfig(batch={"tasks": 1, "group_size": 2, "response_tokens": 5})
    report = build_report(
        bench,
        {
            "grpo": [_worker_result([10.0, 12.0], 4.0, 1000), _worker_result([11.0], 4.0, 1100)],
            "sdar": [_worker_result([13.0], 4.0, 1150), _worker_result([14.0, 12.0], 4.0, 1120)],
        },
    )
    assert report["algorithms"]["grpo"]["seconds"]["step"] == 11.0  # median of 10, 12, 11
    assert report["algorithms"]["sdar"]["memory"]["peak_bytes"] == 1150  # the largest over its processes
    assert report["algorithms"]["grpo"]["tokens_per_second"]["step"] == pytest.approx(2 * (256 + 5) / 11.0)
    assert report["algorithms"]["grpo"]["tokens_per_second"]["generation"] == pytest.approx(2 * 5 / 4.0)
    assert report["time_ratio"] == pytest.approx(13.0 / 11.0)
    assert report["time_ratio_without_generation"] == pytest.approx((13.0 - 4.0) / (11.0 - 4.0))
    assert report["time_ratio_fastest_steps"] == pytest.approx(12.0 / 10.0)
    assert report["memory_ratio"] == pytest.approx(1150 / 1100)
    assert report["targets"] == {"time_ratio_max": 1.15, "memory_ratio_max": 1.05, "time_met": False, "memory_met": True}


@pytest.mark.parametrize("path", sorted(BENCH_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_bench_configs_are_valid(path):
    bench = load_bench_config(path)
    assert bench.algorithms == ["grpo", "sdar"] and bench.batch.group_size >= 2


def test_bench_config_mistakes_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("shape: tiny\nbatch: {prompt_tokns: 5}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'batch.prompt_tokns'.*Did you mean 'batch.prompt_tokens'"):
        load_bench_config(path)
    path.write_text("shape: huge\n")
    with pytest.raises(ConfigError, match="shape 'huge' is not one of tiny"):
        load_bench_config(path)
    path.write_text("run: {train: {micro_batchs: 2}}\n")
    with pytest.raises(ConfigError, match="train.micro_batches"):
        load_bench_config(path)


def test_a_measured_step_is_one_rollout_and_all_its_updates(tmp_path):
    from sdar_cli.perf.bench import load_bench_config, run_config

    bench = load_bench_config(BENCH_DIR / "tiny.yaml", ["run.train.updates_per_rollout=2", "batch.group_size=4"])
    config = run_config(bench, "sdar", tmp_path / "model", tmp_path / "run")
    rollouts = bench.steps.warmup + bench.steps.measured
    assert config.train.max_steps == rollouts * 2 and config.train.save_steps > config.train.max_steps
