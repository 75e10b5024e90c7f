"""`sdar eval`: the Wilson interval, task choice, summaries, and the command on a tiny run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sdar_cli.cli import app
from sdar_cli.evaluate import EvalError, choose_tasks, summarize, summarize_by_task_type, wilson_interval
from sdar_cli.rollout import EpisodeResult

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # 5 of 10: centre 0.5, half = z / (1 + z^2/10) * sqrt(0.025 + z^2/400) = 0.2634
        (5, 10, 0.2366, 0.7634),
    ],
)
def test_wilson_interval_matches_published_values(successes, trials, low, high):
    computed = wilson_interval(successes, trials)
    assert computed == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_is_symmetric_and_defined_without_trials():
    low, high = wilson_interval(3, 10)
    mirrored_low, mirrored_high = wilson_interval(7, 10)
    assert (low, high) == pytest.approx((1 - mirrored_high, 1 - mirrored_low))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=5e-5)


def test_choose_tasks_depends_only_on_the_seed():
    ids = [f"test-{i:05d}" for i in range(50)]
    first = choose_tasks(ids, 10, seed=0)
    assert first == choose_tasks(ids, 10, seed=0)
    assert len(set(first)) == 10 and set(first) <= set(ids)
    assert first != choose_tasks(ids, 10, seed=1)
    with pytest.raises(EvalError, match="the split has only 50"):
        choose_tasks(ids, 51, seed=0)


def _episode(group, task_type, won, turns, invalid, reward=None):
    result = EpisodeResult(f"test-{group:05d}", task_type, group, episode=0, turns=turns, won=won,
                           invalid_actions=invalid)
    result.outcome_reward = 10.0 if won else 0.0 if reward is None else reward
    return result


def test_summary_counts_success_pass_at_k_and_invalid_turns():
    # two tasks played twice: task 0 won once in 3 turns; task 1 never
    episodes = [
        _episode(0, "pick_two", won=True, turns=3, invalid=0),
        _episode(0, "pick_two", won=False, turns=5, invalid=2),
        _episode(1, "heat_and_place", won=False, turns=5, invalid=1),
        _episode(1, "heat_and_place", won=False, turns=5, invalid=0),
    ]
    summary = summarize(episodes)
    assert summary["episodes"] == 4 and summary["successes"] == 1
    assert summary["success_rate"] == 0.25
    assert summary["success_ci95"] == pytest.approx(list(wilson_interval(1, 4)))
    assert summary["reward_mean"] == 2.5
    assert summary["turns_mean"] == 4.5
    assert summary["invalid_action_rate"] == pytest.approx(3 / 18)  # per turn, as in training
    assert (summary["tasks"], summary["tasks_solved"], summary["pass_at_k"]) == (2, 1, 0.5)
    by_type = summarize_by_task_type(episodes)
    assert list(by_type) == ["heat_and_place", "pick_two"]
    assert by_type["pick_two"]["success_rate"] == 0.5 and by_type["heat_and_place"]["success_rate"] == 0.0
    assert "metrics" not in summary  # the environment reported none


def test_summary_averages_episode_metrics_over_the_episodes_that_have_them():
    episodes = [_episode(0, "qa", won=True, turns=2, invalid=0), _episode(1, "qa", won=False, turns=3, invalid=0),
                _episode(2, "qa", won=False, turns=4, invalid=0)]
    episodes[0].metrics = {"exact_match": 1.0, "f1": 1.0}
    episodes[1].metrics = {"exact_match": 0.0, "f1": 0.5}
    episodes[2].metrics = {"exact_match": 0.0, "f1": 0.0, "searches": 3.0}
    assert summarize(episodes)["metrics"] == {"exact_match": pytest.approx(1 / 3), "f1": pytest.approx(0.5), "searches": 3.0}


def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_eval_of_a_run_is_reproducible_and_reports_every_metric(tiny_run_dir, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    result = _eval(tiny_run_dir, "--episodes", 4, "--json", first)
    assert result.exit_code == 0, result.output
    assert _eval(tiny_run_dir, "--episodes", 4, "--json", second).exit_code == 0
    assert first.read_text() == second.read_text()  # same seed: same tasks, same numbers

    report = json.loads(first.read_text())
    settings = report["settings"]
    assert (settings["split"], settings["seed"], settings["episodes"]) == ("test", 0, 4)
    assert (settings["decoding"], settings["temperature"]) == ("sample", 0.4)
    assert len(settings["task_ids"]) == 4 and all(t.startswith("test-") for t in settings["task_ids"])
    (target,) = report["targets"]
    assert (target["kind"], target["step"]) == ("run", 1)
    assert target["checkpoint"].endswith("checkpoint-1")
    overall = target["overall"]
    assert overall["episodes"] == 4 and len(target["episodes"]) == 4
    assert overall["success_ci95"] == pytest.approx(list(wilson_interval(overall["successes"], 4)))
    assert 1 <= overall["turns_mean"] <= 3  # the run's config: rollout.max_turns=3
    assert sum(s["episodes"] for s in target["by_task_type"].values()) == 4
    assert "success" in result.output and "by task type" in result.output

    other_seed = tmp_path / "seed1.json"
    assert _eval(tiny_run_dir, "--episodes", 4, "--set", "eval.seed=1", "--json", other_seed).exit_code == 0
    assert json.loads(other_seed.read_text())["settings"]["task_ids"] != settings["task_ids"]


def test_eval_compares_a_checkpoint_with_its_base_model_on_the_same_tasks(tiny_run_dir, tiny_model_dir, tmp_path):
    path = tmp_path / "compare.json"
    checkpoint = tiny_run_dir / "checkpoint-1"
    result = _eval(checkpoint, tiny_model_dir, "--episodes", 2, "--set", "eval.decoding=greedy", "--json", path)
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    checkpoint_report, base_report = report["targets"]
    assert (checkpoint_report["kind"], base_report["kind"]) == ("checkpoint", "base")
    assert base_report["model"] == str(tiny_model_dir) and base_report["checkpoint"] is None
    assert report["settings"]["decoding"] == "greedy" and report["settings"]["temperature"] is None
    tasks = report["settings"]["task_ids"]
    for target in report["targets"]:
        assert [e["task_id"] for e in target["episodes"]] == tasks
        assert max(e["turns"] for e in target["episodes"]) <= 3  # the base borrowed the run's max_turns
    flat = " ".join(result.output.split())
    assert "checkpoint-1" in flat and tiny_model_dir.name in flat


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--episodes", 5, "--set", "eval.samples_per_task=2"], "must divide eval.episodes"),
        (["--episodes", 4, "--set", "env.kwargs={num_test_tasks: 3}"], "the split has only 3"),
        (["--split", "validation"], "env.eval_split 'validation'"),
        (["--set", "eval.decodng=greedy"], "Did you mean 'eval.decoding'?"),
    ],
)
def test_eval_user_mistakes_exit_2(tiny_run_dir, args, message):
    result = _eval(tiny_run_dir, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_eval_of_unusable_targets_exits_2(tmp_path):
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "empty-run" / "config.yaml").write_text("{}\n")
    result = _eval(tmp_path / "empty-run")
    assert result.exit_code == 2 and "has no checkpoint-N/ yet" in " ".join(result.output.split())
    result = _eval(tmp_path / "no-such-run")
    assert result.exit_code == 2 and "no-such-run does not exist" in " ".join(result.output.split())
    (tmp_path / "stray").mkdir()
    result = _eval(tmp_path / "stray")
    assert result.exit_code == 2 and "neither a run directory" in " ".join(result.output.split())


def test_chat_template_text_reads_a_file_and_keeps_inline_text(tmp_path):
    from sdar_cli.models import chat_template_text

    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert chat_template_text(str(tmp_path / "t.jinja")) == "{{ messages }}"
    assert chat_template_text("{% for m in messages %}{{ m }}{% endfor %}").startswith("{% for")
    long_plain = "x" * 300  # not a path a file system accepts: kept as text, no OSError
    assert chat_template_text(long_plain) == long_plain


def test_a_skill_grpo_target_is_evaluated_without_and_with_skills(tiny_model_dir, tmp_path, monkeypatch):
    import sdar_cli.evaluate as evaluate_module
    from conftest import TINY_OVERRIDES

    shown = []
    play = evaluate_module.play_evaluation

    def recording_play(*args, **kwargs):
        samples, episodes = play(*args, **kwargs)
        tokenizer = args[1]
        shown.append(all("[Privileged Skill Information]" in tokenizer.decode(s.prompt_ids) for s in samples))
        return samples, episodes

    monkeypatch.setattr(evaluate_module, "play_evaluation", recording_play)
    config = tmp_path / "skill_grpo.yaml"
    config.write_text("algorithm:\n  name: skill_grpo\n")
    path = tmp_path / "report.json"
    overrides = [part for o in TINY_OVERRIDES for part in ("--set", o)]
    result = _eval(tiny_model_dir, "--config", config, "--episodes", 2, "--json", path, *overrides)
    assert result.exit_code == 0, result.output
    names = [t["target"] for t in json.loads(path.read_text())["targets"]]
    assert names == [str(tiny_model_dir), f"{tiny_model_dir} +skills"]
    assert shown == [False, True]  # Skill-GRPO (no skills at test time), then Skill-GRPO* (with them)
