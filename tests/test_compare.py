"""`sdar compare` on the tiny model: methods x seeds, the same held-out tasks, one results file."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import TINY_OVERRIDES, one_torch_thread
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sdar_cli.cli import app
from sdar_cli.compare import curve_bands, mean_and_std, read_metrics, results_markdown
from sdar_cli.stats import exact_mcnemar


def test_best_checkpoint_is_the_saved_step_with_the_highest_training_success(tmp_path):
    from sdar_cli.compare import best_checkpoint

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-5").mkdir()  # incomplete: no trainer_state.json
    # step N's batch was played by checkpoint-(N-1): steps 3, 5 and 7 measure checkpoints 2, 4 and 6
    metrics = [{"step": s, "success_rate": r}
               for s, r in [(1, 1.0), (2, 0.9), (3, 0.5), (4, 0.2), (5, 0.75), (6, 1.0), (7, 0.75)]]
    # steps 1, 2, 4 and 6 scored checkpoints that were not saved (or incomplete); 5 and 7 tie: the later one
    assert best_checkpoint(tmp_path, metrics) == tmp_path / "checkpoint-6"
    metrics[4]["success_rate"] = 0.8
    assert best_checkpoint(tmp_path, metrics) == tmp_path / "checkpoint-4"
    # the last checkpoint (6 here, with no step 7) was never measured by a training batch
    assert best_checkpoint(tmp_path, metrics[:6]) == tmp_path / "checkpoint-4"
    assert best_checkpoint(tmp_path, [{"step": 2, "success_rate": 0.5}]) is None
    # two updates per rollout batch: steps 3, 5 and 7 played their batches (with generation_seconds); the lines of
    # steps 2, 4 and 6 repeat the batch before, played by older weights, and measure no checkpoint
    two_updates = [{"step": s, "success_rate": r, **({"generation_seconds": 1.0} if s % 2 else {})}
                   for s, r in [(1, 0.0), (2, 0.0), (3, 0.9), (4, 0.9), (5, 0.25), (6, 0.25), (7, 0.75), (8, 0.75)]]
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    # step 4's 0.9 is step 3's batch again, not a measure of checkpoint-3
    assert best_checkpoint(tmp_path, two_updates) == tmp_path / "checkpoint-2"


def test_curve_bands_average_the_seeds_that_logged_a_step():
    results = {
        "methods": {"a": {}, "b": {}},
        "runs": [
            {"method": "a", "curve": [{"step": 1, "success_rate": 0.5}, {"step": 2, "success_rate": None}]},
            {"method": "a", "curve": [{"step": 1, "success_rate": 0.25}, {"step": 2, "success_rate": 1.0}]},
            {"method": "b", "curve": [{"step": 1, "success_rate": 0.0}]},
        ],
    }
    assert curve_bands(results) == {
        "a": {"step": [1, 2], "mean": [0.375, 1.0], "low": [0.25, 1.0], "high": [0.5, 1.0]},
        "b": {"step": [1], "mean": [0.0], "low": [0.0], "high": [0.0]},
    }


def test_mean_and_sample_std():
    mean, std = mean_and_std([0.25, 0.5, 0.75])
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.25)
    assert mean_and_std([0.4]) == (0.4, None)


@pytest.fixture(scope="module")
def comparison(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    overrides = dict(part.split("=", 1) for part in TINY_OVERRIDES)
    overrides.update({"model.name": str(tiny_model_dir), "train.max_steps": "1", "eval.episodes": "4", "eval.batch_size": "4"})
    (root / "train.yaml").write_text("algorithm:\n  name: sdar\n")
    # a reference row: another model on the same tasks (here a copy of the tiny model with a different lm_head)
    reference = root / "reference-model"
    shutil.copytree(tiny_model_dir, reference)
    other = AutoModelForCausalLM.from_pretrained(reference)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1.0)
    other.save_pretrained(reference)
    spec = {
        "config": "train.yaml",
        "methods": {"grpo": ["algorithm.name=grpo"], "sdar": ["algorithm.name=sdar"]},
        "seeds": [0, 1],
        "overrides": [f"{key}={value}" for key, value in overrides.items()],
        "best": True,
        # the second reference is the model the runs start from: played once, shown in both rows
        "references": {"flipped head": str(reference), "same as start": str(tiny_model_dir)},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    with one_torch_thread():
        first = CliRunner().invoke(app, ["compare", str(root / "spec.yaml"), "-o", str(root / "out")])
        assert first.exit_code == 0, first.output
        results_first = json.loads((root / "out" / "results.json").read_text())
        again = CliRunner().invoke(app, ["compare", str(root / "spec.yaml"), "-o", str(root / "out"), "--seeds", "1", "--methods", "sdar"])
        results_again = json.loads((root / "out" / "results.json").read_text())
        written = max(f.stat().st_mtime_ns for f in (root / "out" / "eval-cache").glob("*.json"))
        replayed = CliRunner().invoke(app, ["compare", str(root / "spec.yaml"), "-o", str(root / "out"), "--seeds", "1",
                                            "--methods", "sdar", "--reevaluate"])
        rerun = json.loads((root / "out" / "results.json").read_text())
        replayed_two_seeds = CliRunner().invoke(app, ["compare", str(root / "spec.yaml"), "-o", str(root / "out"),
                                                      "--methods", "sdar", "--reevaluate"])
    return root, first, results_first, again, (replayed, rerun, replayed_two_seeds), results_again, written


def test_every_method_and_seed_trains_and_is_evaluated_on_the_same_tasks(comparison, tiny_model_dir):
    root, first, results, *_ = comparison
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("grpo", 0), ("grpo", 1), ("sdar", 0), ("sdar", 1)]
    for run in results["runs"]:
        config = yaml.safe_load((root / "out" / f"{run['method']}-seed{run['seed']}" / "config.yaml").read_text())
        assert config["train"]["seed"] == run["seed"] and config["algorithm"]["name"] == run["method"]
        assert [point["step"] for point in run["curve"]] == [1]
        assert run["checkpoint"].endswith("checkpoint-1")
        assert run["final"]["episodes"] == 4
        episodes = run["final_episodes"]  # the held-out episodes one by one, on the shared tasks, in their order
        assert [e["task_id"] for e in episodes] == [t for t in results["evaluation"]["task_ids"]]
        assert sum(e["won"] for e in episodes) / 4 == run["final"]["success_rate"]
        assert sum(e["turns"] for e in episodes) / 4 == pytest.approx(run["final"]["turns_mean"])
        # one step: no checkpoint was measured by a later batch, so the best reported is the final one
        assert run["best"]["step"] == 1 and run["best"]["success_rate"] == run["final"]["success_rate"]
    assert len(results["evaluation"]["task_ids"]) == 4
    assert results["baseline"]["episodes"] == 4
    # teacher statistics: averaged over the sdar runs' steps, absent for grpo (no teacher pass)
    sdar_gates = [p["gate_mean"] for r in results["runs"] if r["method"] == "sdar" for p in r["curve"]]
    assert results["methods"]["sdar"]["teacher"]["gate_mean"] == pytest.approx(sum(sdar_gates) / len(sdar_gates))
    assert 0 < results["methods"]["sdar"]["teacher"]["gate_mean"] < 1
    assert results["methods"]["grpo"]["teacher"] == {"gate_mean": None, "gate_active_ratio": None, "teacher_gap_mean": None}
    for method in ("grpo", "sdar"):
        rates = [r["final"]["success_rate"] for r in results["runs"] if r["method"] == method]
        assert results["methods"][method]["per_seed"] == rates
        assert results["methods"][method]["success_mean"] == pytest.approx(sum(rates) / 2)
    for run in results["runs"]:  # the curve is metrics.jsonl's own values, gradient norm included
        logged = read_metrics(root / "out" / f"{run['method']}-seed{run['seed']}")
        assert [p["grad_norm"] for p in run["curve"]] == [r["grad_norm"] for r in logged]
        assert [p["success_rate"] for p in run["curve"]] == [r["success_rate"] for r in logged]
    bands = curve_bands(results)  # what the plot draws: per step, mean and min-max over seeds
    for method in ("grpo", "sdar"):
        values = [r["curve"][0]["success_rate"] for r in results["runs"] if r["method"] == method]
        assert bands[method]["step"] == [1]
        assert bands[method]["mean"] == [pytest.approx(sum(values) / 2)]
        assert (bands[method]["low"], bands[method]["high"]) == ([min(values)], [max(values)])
    assert (root / "out" / "success.png").stat().st_size > 10_000
    # results.md is the markdown of the last results.json (the fixture's last command rewrote both)
    final = json.loads((root / "out" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in final["runs"]] == [("sdar", 0), ("sdar", 1)]
    assert (root / "out" / "results.md").read_text() == results_markdown(final)
    table = results_markdown(results).splitlines()
    sdar = results["methods"]["sdar"]
    assert table[0].count("|") == table[1].count("|") == table[2].count("|") == table[6].count("|") == 10
    assert "best checkpoint" in table[0]  # the fixture's spec asks for best checkpoints
    # each seed's best checkpoint with its step, in seed order
    sdar_best = [r["best"] for r in results["runs"] if r["method"] == "sdar"]
    assert f"| {100 * sdar_best[0]['success_rate']:.0f}% (1), {100 * sdar_best[1]['success_rate']:.0f}% (1) |" in table[6]
    reference_result = results["references"]["flipped head"]
    reference = root / "reference-model"
    assert reference_result["model"] == str(reference) and reference_result["episodes"] == 4
    assert table[2] == f"| flipped head (`{reference}`) | - | {100 * reference_result['success_rate']:.1f}% | - | - | - | - | - | - |"
    assert results["baseline"]["model"] == str(tiny_model_dir)
    assert results["references"]["same as start"] == results["baseline"]
    assert table[4] == f"| before RL (`{tiny_model_dir}`) | - | {100 * results['baseline']['success_rate']:.1f}% | - | - | - | - | - | - |"
    assert table[6].startswith(f"| sdar | 2 | {100 * sdar['success_mean']:.1f}% ± {100 * sdar['success_std']:.1f} | ")
    assert f"| {100 * sdar['best_mean']:.1f}% ± {100 * sdar['best_std']:.1f} |" in table[6]
    assert table[6].endswith(f" | {sdar['teacher']['gate_mean']:.3f} | {sdar['teacher']['gate_active_ratio']:.2f} | "
                             f"{sdar['teacher']['teacher_gap_mean']:+.3f} |")
    assert table[5].endswith("| - | - | - |")  # grpo has no teacher
    assert "4 held-out episodes per agent (household, split test, sample at T=0.4" in table[8]
    assert (results["seeds"], results["seeds_done"], results["complete"]) == ([0, 1], [0, 1], True)
    assert "Partial" not in results_markdown(results)
    # each sdar run paired episode by episode with grpo's run of the same seed (the first method)
    grpo_runs = {r["seed"]: r for r in results["runs"] if r["method"] == "grpo"}
    for run in results["runs"]:
        won = [e["won"] for e in run["final_episodes"]]
        if run["method"] == "grpo":
            assert "paired" not in run
            continue
        theirs = [e["won"] for e in grpo_runs[run["seed"]]["final_episodes"]]
        expected = {"both": sum(a and b for a, b in zip(won, theirs)), "only_first": sum(a and not b for a, b in zip(won, theirs)),
                    "only_second": sum(b and not a for a, b in zip(won, theirs)), "neither": sum(not a and not b for a, b in zip(won, theirs))}
        assert run["paired"] == {"against": "grpo", **expected, "p_value": exact_mcnemar(expected["only_first"], expected["only_second"])}
    pooled = results["methods"]["sdar"]["paired"]
    assert pooled["seeds"] == 2 and pooled["against"] == "grpo"
    for key in ("both", "only_first", "only_second", "neither"):
        assert pooled[key] == sum(r["paired"][key] for r in results["runs"] if r["method"] == "sdar")
    assert "paired" not in results["methods"]["grpo"]
    markdown = results_markdown(results)
    assert "| method | seed | success | grpo | both won | only method | only grpo | neither | exact McNemar p |" in markdown
    sdar0 = next(r for r in results["runs"] if (r["method"], r["seed"]) == ("sdar", 0))
    low, high = sdar0["final"]["success_ci95"]
    assert (f"| sdar | 0 | {100 * sdar0['final']['success_rate']:.0f}% ({100 * low:.0f}-{100 * high:.0f}) | ") in markdown
    assert f"| sdar | all | - | - | {pooled['both']} | {pooled['only_first']} | {pooled['only_second']} |" in markdown
    assert "paired with grpo on the same held-out episodes" in first.output
    # the runs decide the shared settings: the untrained model was played once, though named twice
    assert first.output.count(f"{tiny_model_dir}: 4 episodes in") == 1
    # references are played after the runs (the first target's config would set every target's tasks)
    assert first.output.index(f"{reference}: 4 episodes in") > first.output.index(f"{root / 'out' / 'sdar-seed0'}: 4 episodes in")
    assert "held-out success" in first.output and "best ckpt" in first.output
    # trained seed by seed (a comparison stopped part-way is balanced), listed method by method
    order = [first.output.index(f"{name}: training") for name in ("grpo-seed0", "sdar-seed0", "grpo-seed1", "sdar-seed1")]
    assert order == sorted(order)
    # seed 0's runs are evaluated and the results so far written before seed 1 trains
    out = root / "out"
    evaluated = [first.output.index(f"{out / name}: 4 episodes in") for name in ("grpo-seed0", "sdar-seed0")]
    written_so_far = first.output.index("Results so far (seeds 0) written to")
    assert max(evaluated) < written_so_far < first.output.index("grpo-seed1: training")
    # the table printed then says it is partial
    assert max(evaluated) < first.output.index("Partial: seeds 0 done of 0, 1.") < written_so_far
    # named twice (a reference and the model before RL), the untrained model was played once in seed 0's pass
    assert first.output[:written_so_far].count(f"{tiny_model_dir}: ") == 1
    assert first.output.count("Results so far") == 1  # not after the last seed: the final results follow
    for name in ("grpo-seed1", "sdar-seed1"):  # played once, after seed 1; seed 0's entries read back then
        assert first.output.count(f"{out / name}: 4 episodes in") == 1
    assert first.output.count(f"{out / 'grpo-seed0'}: evaluated before, reused") == 1
    assert not list(out.glob(".*.partial*"))


def test_a_rerun_keeps_finished_runs_and_their_evaluations_and_replaying_reproduces_them(comparison):
    root, _, results, again, (replayed, rerun, replayed_two_seeds), results_again, written = comparison
    before = next(r for r in results["runs"] if (r["method"], r["seed"]) == ("sdar", 1))
    assert again.exit_code == 0, again.output
    assert "sdar-seed1: already trained (1 steps), kept." in again.output
    assert again.output.count("evaluated before, reused") == 3  # the reference, the untrained model and sdar-seed1
    # one seed and one method of the spec: partial, and it says so
    assert (results_again["seeds"], results_again["seeds_done"], results_again["complete"]) == ([0, 1], [1], False)
    assert "Partial: seeds 1 done of 0, 1; methods sdar of grpo, sdar." in results_markdown(results_again)
    assert len(list((root / "out" / "eval-cache").glob("*.json"))) == 6  # the reference, the untrained model, 4 runs
    # the compute reported is what the evaluations took when played, not the ~0 s of reading the cache
    assert results_again["compute"]["eval_seconds"] > 0.5
    # played again from scratch, the same checkpoint on the same tasks gives the same numbers
    assert replayed.exit_code == 0, replayed.output
    assert "reused" not in replayed.output
    assert max(f.stat().st_mtime_ns for f in (root / "out" / "eval-cache").glob("*.json")) > written  # refreshed
    assert not list((root / "out" / "eval-cache").glob("*.partial"))
    assert [(r["method"], r["seed"]) for r in rerun["runs"]] == [("sdar", 1)]
    assert rerun["runs"][0]["final"] == before["final"]
    assert rerun["baseline"] == results["baseline"]
    assert rerun["references"] == results["references"]
    # --reevaluate over two seeds plays each target once: the second seed's pass reads the first's back
    assert replayed_two_seeds.exit_code == 0, replayed_two_seeds.output
    assert replayed_two_seeds.output.count("episodes in") == 4  # reference, before RL, sdar-seed0, sdar-seed1
    assert replayed_two_seeds.output.count("evaluated before, reused") == 3


def test_a_retrained_run_is_evaluated_again(tiny_model_dir, tmp_path):
    """The cache key follows the checkpoint's files: new weights at the same path are not a cache hit."""
    import torch
    from safetensors.torch import save_file

    from sdar_cli.evaluate import evaluation_key
    from sdar_cli.targets import resolve_target

    run = tmp_path / "run"
    checkpoint = run / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    # a whole adapter file (a cut-off one is refused as a target); its values change below, not its size
    save_file({"w": torch.zeros(2)}, checkpoint / "adapter_model.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    target = resolve_target(str(checkpoint), None, [])
    assert target.checkpoint == checkpoint
    settings = {"task_ids": ["test-00001"]}
    key = evaluation_key(target, settings, 6)
    assert evaluation_key(target, settings, 6) == key
    assert evaluation_key(target, settings, 7) != key
    assert evaluation_key(target, {"task_ids": ["test-00002"]}, 6) != key
    # only settings that shape training batches: the same episodes, the same key
    trained_differently = dataclasses.replace(target, config=target.config.model_copy(
        update={"rollout": target.config.rollout.model_copy(update={"group_size": 16, "temperature": 0.3})}))
    assert evaluation_key(trained_differently, settings, 6) == key
    prompted_differently = dataclasses.replace(target, config=target.config.model_copy(
        update={"rollout": target.config.rollout.model_copy(update={"max_new_tokens": 7})}))
    assert evaluation_key(prompted_differently, settings, 6) != key
    # retrained: same size, same path, other bytes
    save_file({"w": torch.ones(2)}, checkpoint / "adapter_model.safetensors")
    assert evaluation_key(target, settings, 6) != key


def test_an_unreadable_cache_entry_is_played_again(tiny_model_dir, tmp_path):
    from rich.console import Console

    from sdar_cli.evaluate import evaluate_targets

    overrides = [*TINY_OVERRIDES, f"model.name={tiny_model_dir}", "eval.episodes=2", "eval.batch_size=2"]
    (tmp_path / "c.yaml").write_text("{}\n")
    cache = tmp_path / "cache"
    with one_torch_thread():
        first = evaluate_targets([str(tiny_model_dir)], tmp_path / "c.yaml", overrides, Console(), cache_dir=cache)
        (entry,) = cache.glob("*.json")
        entry.write_text('{"report": {"overall"')  # cut short
        seconds: dict[str, float] = {}
        again = evaluate_targets([str(tiny_model_dir)], tmp_path / "c.yaml", overrides, Console(), cache_dir=cache,
                                 seconds=seconds)
    assert again == first and seconds[str(tiny_model_dir)] > 0
    assert json.loads(entry.read_text())["report"]["overall"] == first["targets"][0]["overall"]


def test_bad_spec_or_method_is_a_user_error(tmp_path):
    (tmp_path / "spec.yaml").write_text("config: x.yaml\nmethod: {}\n")
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml")])
    assert result.exit_code == 2 and "methods" in result.output and "Traceback" not in result.output
    (tmp_path / "spec.yaml").write_text("config: x.yaml\nmethods: {sdar: []}\n")
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml"), "--methods", "ppo"])
    assert result.exit_code == 2 and "unknown method" in result.output


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("methods: {grpo: []}\nseeds: [0, 1, 0]\n", "seeds: seed(s) [0] listed twice"),
        ("methods: {}\n", "name at least one method"),
        ("methods: {grpo: []}\nreferences: {'': m}\n", "a label is empty"),
        ("methods: {grpo: []}\nreferences: {grpo: m}\n", "the label 'grpo' is also a method"),
        ("methods: {grpo: []}\nreferences: {before RL: m}\n", "the label 'before RL' is also a method or the"),
        ("methods: {grpo: []}\nreferences: {untrained: ''}\n", "'untrained' names no model"),
        ("methods: {grpo: []}\nreferences: [m]\n", "references: Input should be a valid dictionary"),
        ("methods: {grpo: [], s: {set: [], seeds: [3]}}\nseeds: [0, 1]\n",
         "methods: s: seeds [3] must be distinct and among the spec's seeds [0, 1]; add [3] to `seeds`"),
        ("methods: {grpo: [], s: {set: [], seeds: [0, 0]}}\nseeds: [0]\n", "seeds [0, 0] must be distinct"),
        ("methods: {grpo: [], s: {set: []}}\n", "methods.s.MethodSpec.seeds: Field required"),
        ("methods: {grpo: []}\npaired_against: sdar\n", "paired_against: 'sdar' is not a method; name one of grpo"),
    ],
)
def test_an_ambiguous_spec_is_refused_with_the_fix(tmp_path, spec, message):
    (tmp_path / "spec.yaml").write_text("config: x.yaml\n" + spec)
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output


def test_a_missing_reference_or_a_repeated_seed_is_refused_before_any_training(tiny_model_dir, tmp_path):
    (tmp_path / "train.yaml").write_text(f"model:\n  name: {tiny_model_dir}\n")
    spec = {"config": "train.yaml", "methods": {"grpo": []}, "seeds": [0],
            "references": {"before warm-up": str(tmp_path / "no-such-model")}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "references: 'before warm-up':" in result.output and "does not exist" in result.output
    assert not (tmp_path / "out").exists()  # nothing trained
    # a checkpoint outside any run directory (its config unknown), or a hub-style name not in the offline cache
    bare = tmp_path / "bare-checkpoint"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")
    for reference, message in ((str(bare), "is not inside a run directory"), ("no-such-folder-here/warm-x", "Cannot load model 'no-such-folder-here/warm-x'")):
        spec["references"] = {"before warm-up": reference}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        result = CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert message in result.output and not (tmp_path / "out").exists()
    spec["references"] = {}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out"), "--seeds", "0,0"])
    assert result.exit_code == 2 and "--seeds names one twice: 0,0" in result.output
    assert not (tmp_path / "out").exists()


def test_partial_results_say_which_seeds_they_cover():
    from sdar_cli.compare import finite_or_none, partial_note

    spec = {"methods": {"grpo": [], "sdar": []}}
    assert partial_note({"complete": False, "seeds_done": [0, 1], "seeds": [0, 1, 2], "spec": spec,
                         "methods_done": ["grpo", "sdar"]}) == "Partial: seeds 0, 1 done of 0, 1, 2."
    assert partial_note({"complete": True, "seeds_done": [0], "seeds": [0]}) is None
    assert partial_note({}) is None  # results written before the field existed
    # a NaN gradient norm (a skipped update) is kept as null: json.dumps would write NaN, which is not JSON
    assert [finite_or_none(v) for v in (float("nan"), float("inf"), 0.5, 3, None)] == [None, None, 0.5, 3, None]


def test_a_best_checkpoint_before_the_last_is_evaluated_as_its_own_target(tiny_model_dir, tmp_path, monkeypatch):
    import sdar_cli.compare as compare_module

    overrides = dict(part.split("=", 1) for part in TINY_OVERRIDES)
    overrides.update({"model.name": str(tiny_model_dir), "train.max_steps": "2", "train.save_steps": "1",
                      "eval.episodes": "2", "eval.batch_size": "2"})
    (tmp_path / "train.yaml").write_text("algorithm:\n  name: grpo\n")
    spec = {"config": "train.yaml", "methods": {"grpo": []}, "seeds": [0], "best": True, "baseline": False,
            "overrides": [f"{key}={value}" for key, value in overrides.items()]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(compare_module, "best_checkpoint", lambda run_dir, metrics: run_dir / "checkpoint-1")
    with one_torch_thread():
        result = CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["checkpoint"].endswith("checkpoint-2") and run["best"]["checkpoint"].endswith("checkpoint-1")
    assert run["best"]["step"] == 1 and run["best"]["episodes"] == 2
    assert "best_target" not in run
    assert len(list((tmp_path / "out" / "eval-cache").glob("*.json"))) == 2  # the final and the best checkpoint


def test_a_method_on_some_seeds_only_and_a_kept_run_trained_with_other_settings(tiny_model_dir, tmp_path):
    """A sweep on one seed beside the main comparison, paired with the named method; a run on disk whose
    settings the spec no longer gives is refused before anything trains, not reported under the new ones."""
    from sdar_cli.compare import CompareError, check_existing_run
    from sdar_cli.config import load_config

    overrides = dict(part.split("=", 1) for part in TINY_OVERRIDES)
    overrides.update({"model.name": str(tiny_model_dir), "train.max_steps": "1", "eval.episodes": "2", "eval.batch_size": "2"})
    (tmp_path / "train.yaml").write_text("algorithm:\n  name: sdar\n")
    spec = {"config": "train.yaml", "seeds": [0, 1], "baseline": False, "paired_against": "grpo",
            "methods": {"big_lambda": {"set": ["algorithm.sdar_coef=1.0"], "seeds": [1]}, "grpo": ["algorithm.name=grpo"]},
            "overrides": [f"{key}={value}" for key, value in overrides.items()]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"

    def run(*args):
        with one_torch_thread():
            return CliRunner().invoke(app, ["compare", str(tmp_path / "spec.yaml"), "-o", str(out), *args])

    def results():
        return json.loads((out / "results.json").read_text())

    nothing = run("--methods", "big_lambda", "--seeds", "0")
    assert nothing.exit_code == 2 and "no run to train: big_lambda trains with seeds [1]" in nothing.output
    assert not out.exists()
    # the sweep alone: seed 0 has no run of it (nothing evaluated for it), and grpo is not there to pair with
    alone = run("--methods", "big_lambda")
    assert alone.exit_code == 0, alone.output
    assert "Not paired with grpo: it is not among --methods" in " ".join(alone.output.split())
    assert "Results so far" not in alone.output and alone.output.count("episodes in") == 1
    assert [(r["method"], r["seed"], "paired" in r) for r in results()["runs"]] == [("big_lambda", 1, False)]
    assert results()["methods_done"] == ["big_lambda"] and not results()["complete"]
    # a seed the spec does not list trains every plain method (not the sweep, which names its seeds)
    other_seed = run("--seeds", "0,5")
    assert other_seed.exit_code == 0, other_seed.output
    assert [(r["method"], r["seed"]) for r in results()["runs"]] == [("grpo", 0), ("grpo", 5)]
    assert results()["methods_done"] == ["grpo"] and not results()["complete"]
    assert "big_lambda-seed0" not in other_seed.output and not (out / "big_lambda-seed0").exists()
    done = run()
    assert done.exit_code == 0, done.output
    final = results()
    assert [(r["method"], r["seed"]) for r in final["runs"]] == [("big_lambda", 1), ("grpo", 0), ("grpo", 1)]
    assert final["complete"] and final["methods"]["big_lambda"]["seeds"] == 1
    assert "grpo-seed0: already trained (1 steps), kept." in done.output
    assert "big_lambda-seed1: already trained (1 steps), kept." in done.output
    big = final["runs"][0]
    assert big["paired"]["against"] == "grpo" and sum(big["paired"][k] for k in ("both", "only_first", "only_second", "neither")) == 2
    assert final["methods"]["big_lambda"]["paired"] == {key: big["paired"][key] for key in big["paired"] if key != "p_value"} | {"seeds": 1}
    assert yaml.safe_load((out / "big_lambda-seed1" / "config.yaml").read_text())["algorithm"]["sdar_coef"] == 1.0
    # the spec edited after grpo trained: its runs no longer match, and nothing trains (not even a new method)
    spec["methods"] = {"new": ["algorithm.name=grpo", "algorithm.kl_coef=0.2"], **spec["methods"]}
    spec["methods"]["grpo"] = ["algorithm.name=grpo", "algorithm.kl_coef=0.5"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    changed = run()
    assert changed.exit_code == 2 and "Traceback" not in changed.output
    message = " ".join(changed.output.split())
    assert "grpo-seed0 was trained with other settings than the spec gives it now: algorithm.kl_coef (0.01 -> 0.5)" in message
    assert not (out / "new-seed0").exists() and "training" not in changed.output
    assert results() == final  # nothing rewritten
    # a run trained past the spec's train.max_steps (here: its metrics say 2 steps, the spec 1) is not kept either
    config = load_config(tmp_path / "train.yaml", [*spec["overrides"], "algorithm.name=grpo", "train.seed=1", f"output.dir={out / 'grpo-seed1'}"])
    check_existing_run(config, out / "grpo-seed1", "grpo-seed1")  # as trained: accepted
    metrics = out / "grpo-seed1" / "metrics.jsonl"
    line = json.loads(metrics.read_text().splitlines()[-1])
    metrics.write_text(metrics.read_text() + json.dumps({**line, "step": 2}) + "\n")
    with pytest.raises(CompareError, match=r"grpo-seed1 was trained for 2 steps and the spec now asks for train.max_steps=1"):
        check_existing_run(config, out / "grpo-seed1", "grpo-seed1")


def test_a_pairing_counts_each_side_and_skips_runs_without_a_partner():
    from sdar_cli.compare import pair_runs

    def run(method, seed, wins):
        return {"method": method, "seed": seed, "final_episodes": [{"task_id": f"t{i}", "won": w} for i, w in enumerate(wins)]}

    runs = [run("grpo", 0, [1, 0, 0, 0, 1, 0]), run("sdar", 0, [1, 1, 1, 1, 0, 0]), run("sdar", 1, [1, 1, 1, 1, 0, 0])]
    pair_runs(runs, "grpo")
    assert "paired" not in runs[0] and "paired" not in runs[2]  # grpo itself; no grpo run with seed 1
    # sdar won 3 that grpo lost and lost 1 that grpo won: 2 x P(X <= 1 | 4 flips) = 10/16
    assert runs[1]["paired"] == {"against": "grpo", "both": 1, "only_first": 3, "only_second": 1, "neither": 1,
                                 "p_value": pytest.approx(10 / 16)}


def test_no_train_reports_the_finished_runs_and_trains_nothing(tiny_model_dir, tmp_path):
    """The same spec with and without --no-train: with it, only the finished run is evaluated and the
    missing or part-trained ones are named and left alone; without it, they train."""
    methods = {"grpo": ["algorithm.name=grpo"], "sdar": ["algorithm.name=sdar"],
               "sweep": {"set": ["algorithm.name=sdar", "algorithm.sdar_coef=1.0"], "seeds": [0]}}
    spec_path = _write_spec(tmp_path, tiny_model_dir, methods, [0, 1], {"train.max_steps": "2", "train.save_steps": "1"})
    spec = yaml.safe_load(spec_path.read_text())
    out = tmp_path / "out"
    run = _runner(spec_path, out)

    nothing = run("--no-train")
    assert nothing.exit_code == 2 and "Traceback" not in nothing.output
    assert "--no-train: no finished run to report" in " ".join(nothing.output.split())
    assert not (out / "results.json").exists() and not (out / "grpo-seed0").exists()
    assert run("--seeds", "0", "--methods", "grpo").exit_code == 0
    # sdar-seed0 stopped after its first step: a checkpoint on disk, but not the spec's 2 steps
    from sdar_cli.config import load_config
    from sdar_cli.run import train

    config = load_config(tmp_path / "train.yaml", [*spec["overrides"], "algorithm.name=sdar", "train.seed=0",
                                                   "train.max_steps=1", f"output.dir={out / 'sdar-seed0'}"])
    with one_torch_thread():
        assert train(config, out / "sdar-seed0").exit_code == 0
    report = run("--no-train")
    assert report.exit_code == 0, report.output
    said = " ".join(report.output.split())
    assert "sdar-seed0: stopped at step 1 of 2 (last whole checkpoint: checkpoint-1); left out (--no-train)." in said
    assert "grpo-seed1: not started; left out (--no-train)." in said
    assert "sdar-seed1: not started" in said and "sweep-seed0: not started" in said and "training" not in report.output
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("grpo", 0)]
    # seed 0 lacks sdar: no seed is done for every method
    assert results["methods_done"] == ["grpo"] and results["seeds_done"] == [] and not results["complete"]
    assert "Partial: no seed done for every method yet (seeds 0, 1)" in " ".join((out / "results.md").read_text().split())
    assert not (out / "grpo-seed1").exists() and not (out / "sdar-seed1").exists()
    assert max(r["step"] for r in read_metrics(out / "sdar-seed0")) == 1
    # the same command without --no-train trains what is missing (and resumes sdar-seed0 at its step 1)
    full = run()
    assert full.exit_code == 0, full.output
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("grpo", 0), ("grpo", 1), ("sdar", 0), ("sdar", 1),
                                                                   ("sweep", 0)]
    assert results["complete"] and "Resuming from" in full.output
    assert max(r["step"] for r in read_metrics(out / "sdar-seed0")) == 2
    # metrics that reach the last step without its checkpoint (lost to a kill while saving): not finished;
    # seed 0 stays done without the sweep (a method on named seeds only is not waited for)
    shutil.rmtree(out / "sdar-seed1" / "checkpoint-2")
    shutil.rmtree(out / "sweep-seed0" / "checkpoint-2")
    report = run("--no-train")
    assert report.exit_code == 0, report.output
    assert ("sdar-seed1: stopped at step 2 of 2 (last whole checkpoint: checkpoint-1); left out (--no-train)."
            in " ".join(report.output.split()))
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("grpo", 0), ("grpo", 1), ("sdar", 0)]
    assert results["seeds_done"] == [0] and not results["complete"]
    assert results["methods_done"] == ["grpo", "sdar"]
    assert "Partial: seeds 0 done of 0, 1; methods grpo, sdar of grpo, sdar, sweep" in " ".join((out / "results.md").read_text().split())
    # one sdar compare per output folder at a time
    from sdar_cli.resume import run_lock

    with run_lock(out):
        busy = run("--no-train")
    assert busy.exit_code == 2 and "Traceback" not in busy.output
    assert f"is in use by another sdar compare (pid {os.getpid()})" in " ".join(busy.output.split())


def _write_spec(tmp_path, tiny_model_dir, methods, seeds, extra=None, **keys):
    """A spec over train.yaml (sdar) on the tiny model in tmp_path; returns its path."""
    overrides = dict(part.split("=", 1) for part in TINY_OVERRIDES)
    overrides.update({"model.name": str(tiny_model_dir), "eval.episodes": "2", "eval.batch_size": "2", **(extra or {})})
    (tmp_path / "train.yaml").write_text("algorithm:\n  name: sdar\n")
    spec = {"config": "train.yaml", "seeds": seeds, "baseline": False, "methods": methods,
            "overrides": [f"{key}={value}" for key, value in overrides.items()], **keys}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path / "spec.yaml"


def _runner(spec_path, out):
    def run(*args):
        with one_torch_thread():
            return CliRunner().invoke(app, ["compare", str(spec_path), "-o", str(out), *args])
    return run


def _two_method_spec(tmp_path, tiny_model_dir, **extra):
    return _write_spec(tmp_path, tiny_model_dir, {"grpo": ["algorithm.name=grpo"], "sdar": ["algorithm.name=sdar"]},
                       [0], extra)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_run_exits_130_and_says_how_to_resume(tiny_model_dir, tmp_path, stop):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    spec = _two_method_spec(tmp_path, tiny_model_dir, **{"train.max_steps": "50", "train.save_steps": "100"})
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "sdar_cli", "compare", str(spec), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parent), "COLUMNS": "200"})
    metrics = out / "grpo-seed0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.2)
    process.send_signal(getattr(signal, stop))
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 130, output
    done = len(metrics.read_text().splitlines())
    said = " ".join(output.split())
    assert "Traceback" not in output and "did not finish" not in said and 1 <= done < 50
    assert (f"grpo-seed0 interrupted: stopped at step {done} of 50 (last whole checkpoint: checkpoint-{done}). Re-run "
            "the same sdar compare command to resume it") in said
    assert not (out / "sdar-seed0").exists() and not (out / "results.json").exists()


def test_ctrl_c_while_evaluating_exits_130_and_keeps_the_trained_runs(tiny_model_dir, tmp_path, monkeypatch):
    import sdar_cli.compare as compare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "evaluate_targets", interrupted)
    spec = _two_method_spec(tmp_path, tiny_model_dir, **{"train.max_steps": "1"})
    with one_torch_thread():
        result = CliRunner().invoke(app, ["compare", str(spec), "-o", str(tmp_path / "out")])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "Interrupted. Finished runs and evaluations are kept" in " ".join(result.output.split())
    assert [max(r["step"] for r in read_metrics(tmp_path / "out" / f"{m}-seed0")) for m in ("grpo", "sdar")] == [1, 1]


def test_merge_reports_runs_recorded_on_another_machine_without_training_them(tiny_model_dir, tmp_path):
    """Seed 0 trained in one folder (another machine), seed 1 in a second: the second with --merge reports
    all four runs, seed 0's as recorded, and trains none of seed 0; without --merge it reports its own only."""
    spec_path = _write_spec(tmp_path, tiny_model_dir, {"grpo": ["algorithm.name=grpo"], "sdar": ["algorithm.name=sdar"]},
                            [0, 1], {"train.max_steps": "1"})
    first, second = tmp_path / "first", tmp_path / "second"
    assert _runner(spec_path, first)("--seeds", "0").exit_code == 0
    recorded = json.loads((first / "results.json").read_text())
    run = _runner(spec_path, second)

    alone = run("--seeds", "1")
    assert alone.exit_code == 0, alone.output
    alone_results = json.loads((second / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in alone_results["runs"]] == [("grpo", 1), ("sdar", 1)]
    assert not alone_results["complete"] and alone_results["merged"] == []

    merged = run("--merge", str(first / "results.json"))  # all seeds: seed 0 is recorded, seed 1 finished here
    assert merged.exit_code == 0, merged.output
    assert "training" not in merged.output and "Merged, as recorded: grpo-seed0, sdar-seed0." in merged.output
    assert not (second / "grpo-seed0").exists() and not (second / "sdar-seed0").exists()
    results = json.loads((second / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("grpo", 0), ("grpo", 1), ("sdar", 0), ("sdar", 1)]
    assert results["complete"] and results["seeds_done"] == [0, 1]
    by_run = {(r["method"], r["seed"]): r for r in results["runs"]}
    for old in recorded["runs"]:
        new = by_run[old["method"], old["seed"]]
        assert new["merged_from"] == str(first / "results.json")
        assert new["final_episodes"] == old["final_episodes"] and new["curve"] == old["curve"]
    assert all("merged_from" not in by_run[key] for key in (("grpo", 1), ("sdar", 1)))
    # per method, both seeds; each sdar run paired with grpo of its own seed
    assert results["methods"]["sdar"]["per_seed"] == [by_run["sdar", 0]["final"]["success_rate"],
                                                      by_run["sdar", 1]["final"]["success_rate"]]
    assert results["methods"]["sdar"]["paired"]["seeds"] == 2
    assert results["compute"]["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in results["runs"]))
    assert "Merged from `" in (second / "results.md").read_text()

    # the same run recorded twice, a method made otherwise, another evaluation: refused, nothing trained
    twice = run("--merge", str(first / "results.json"), "--merge", str(first / "results.json"))
    assert twice.exit_code == 2 and "is recorded in both" in " ".join(twice.output.split())
    other = json.loads((first / "results.json").read_text())
    other["spec"]["methods"]["sdar"] = ["algorithm.name=sdar", "algorithm.sdar_coef=1.0"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    renamed = run("--merge", str(tmp_path / "other.json"))
    assert renamed.exit_code == 2 and "its 'sdar' was" in renamed.output and "Traceback" not in renamed.output
    other = json.loads((first / "results.json").read_text())
    other["evaluation"]["task_ids"] = list(reversed(other["evaluation"]["task_ids"]))
    (tmp_path / "other.json").write_text(json.dumps(other))
    tasks = run("--merge", str(tmp_path / "other.json"))
    assert tasks.exit_code == 2 and "differs from this one in task_ids" in " ".join(tasks.output.split())
    (tmp_path / "broken.json").write_text("{")
    other = json.loads((first / "results.json").read_text())
    del other["runs"][0]["final_episodes"]
    (tmp_path / "no-episodes.json").write_text(json.dumps(other))
    for bad in ("broken.json", "missing.json", "no-episodes.json"):
        refused = run("--merge", str(tmp_path / bad))
        assert refused.exit_code == 2 and "Traceback" not in refused.output and "--merge" in refused.output
    assert not (second / "grpo-seed0").exists()


def test_merge_warns_when_the_model_before_rl_scores_otherwise_there(tiny_model_dir, tmp_path):
    spec_path = _write_spec(tmp_path, tiny_model_dir, {"grpo": ["algorithm.name=grpo"]}, [0], {"train.max_steps": "1"},
                            baseline=True)
    first = tmp_path / "first"
    assert _runner(spec_path, first)("--seeds", "0").exit_code == 0
    recorded = json.loads((first / "results.json").read_text())
    changed = json.loads(json.dumps(recorded))
    changed["baseline"]["successes"] = recorded["baseline"]["successes"] + 1
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    outputs = {}
    for name in ("results.json", "changed.json"):
        source = first / name if name == "results.json" else tmp_path / name
        result = _runner(spec_path, tmp_path / f"out-{name}")("--merge", str(source))
        assert result.exit_code == 0, result.output
        assert not (tmp_path / f"out-{name}" / "grpo-seed0").exists()  # recorded: not trained here
        outputs[name] = " ".join(result.output.split())
    assert "the model before RL scores" not in outputs["results.json"]
    n = recorded["baseline"]["successes"]
    assert f"the model before RL scores {n}/2 here" in outputs["changed.json"]
    assert f"and {n + 1}/2 in {tmp_path / 'changed.json'}" in outputs["changed.json"]
