"""Where the teacher's privileged block goes, what it holds, and `sdar probe-teacher`'s measurement of it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_OVERRIDES, build_tiny_model, build_tiny_tokenizer, one_torch_thread
from sdar_cli.batching import left_pad, right_pad
from sdar_cli.cli import app
from sdar_cli.config import RolloutSettings, TeacherSettings, load_config
from sdar_cli.envs import environment_factory
from sdar_cli.envs.builtin import HouseholdEnv
from sdar_cli.rollout import TurnRenderer, play_episodes
from sdar_cli.targets import Target
from sdar_cli.teacher_probe import auc, expert_states, probe_task_ids, probe_teacher, response_gap_and_gate, verdict
from sdar_cli.warmup import demonstration_response

HEADER = "[Privileged Skill Information]\n"
GENERATION_PROMPT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def first_state(task_id="train-00003"):
    env = HouseholdEnv()
    task, observation = env.reset(task_id)
    return env, task, observation


def render(tokenizer, task_id="train-00003", **teacher):
    """(student text, teacher text, privileged context) of the first turn of `task_id` under `teacher` settings."""
    env, task, observation = first_state(task_id)
    renderer = TurnRenderer(tokenizer, RolloutSettings(), TeacherSettings(**teacher))
    privileged = renderer.privileged_context(task, observation.privileged, env)
    student, ids = renderer.turn_prompt_ids(task, [], observation.text, observation.admissible_actions, privileged)
    return tokenizer.decode(student), tokenizer.decode(ids), privileged


# ------------------------------------------------------------------------------------- placement
def test_each_placement_puts_the_block_where_it_says(tokenizer):
    _, _, plan = render(tokenizer, context="plan")
    block = f"{HEADER}{plan}\n\n"
    student, prefix, _ = render(tokenizer, context="plan", placement="prefix")
    _, user_start, _ = render(tokenizer, context="plan", placement="user_start")
    _, user_end, _ = render(tokenizer, context="plan", placement="user_end")

    assert prefix == block + student  # official: before the templated prompt, chat markup and all
    assert user_start.startswith("<|im_start|>user\n" + block) and user_start.endswith(GENERATION_PROMPT)
    assert user_start.replace(block, "", 1) == student  # the same chat rendering with the block inside
    assert user_end.endswith(f"\n\n{HEADER}{plan}{GENERATION_PROMPT}")  # right before the reply
    assert user_end.replace(f"\n\n{HEADER}{plan}", "", 1) == student
    assert len({prefix, user_start, user_end}) == 3


def test_the_student_prompt_does_not_depend_on_the_teacher(tokenizer):
    students = {render(tokenizer, context=c, placement=p)[0] for c in ("plan", "none") for p in ("prefix", "user_end")}
    assert len(students) == 1 and "Expert plan" not in students.pop()


def test_user_placements_are_shortened_by_the_prompt_rule(tokenizer):
    env = HouseholdEnv()
    task, observation = env.reset("train-00003")
    history = []
    for _ in range(3):  # three turns of history, so the rule has pairs to drop
        action = env.expert_action()
        history.append((observation.text, action))
        observation = env.step(action)

    def prompts(placement, limit):
        renderer = TurnRenderer(
            tokenizer, RolloutSettings(max_prompt_tokens=limit, history_turns=3), TeacherSettings(context="plan", placement=placement)
        )
        privileged = renderer.privileged_context(task, observation.privileged, env)
        student, teacher = renderer.turn_prompt_ids(task, history, observation.text, observation.admissible_actions, privileged)
        return tokenizer.decode(student), tokenizer.decode(teacher), renderer.truncated_prompts

    _, roomy, cuts = prompts("user_end", 4096)
    student, tight, tight_cuts = prompts("user_end", len(tokenizer(roomy)["input_ids"]) - 1)
    assert cuts == 0 and tight_cuts == 1
    assert len(tokenizer(tight)["input_ids"]) < len(tokenizer(roomy)["input_ids"])
    assert roomy.count("[Observation") == 3 and tight.count("[Observation") < 3  # the oldest pairs went first
    assert tight.endswith(observation.privileged + GENERATION_PROMPT)  # the block, at the end, stays


# --------------------------------------------------------------------------------------- context
def test_next_action_states_the_experts_next_action_after_the_plan(tokenizer):
    env, _, observation = first_state()
    _, plan_text, plan = render(tokenizer, context="plan")
    _, next_text, next_action = render(tokenizer, context="next_action")
    assert plan == observation.privileged
    assert next_action == f"{plan}\nThe expert's next action is: {env.expert_action()}"
    assert env.expert_action() == "open drawer 1" and plan_text != next_text


def test_none_shows_the_header_only(tokenizer):
    student, teacher, context = render(tokenizer, context="none", placement="prefix")
    assert context == "" and teacher == HEADER + "\n\n" + student


def test_shuffled_shows_another_tasks_context_of_the_nearest_length(tokenizer):
    renderer = TurnRenderer(tokenizer, RolloutSettings(), TeacherSettings(context="shuffled"))
    env, task, observation = first_state("train-00003")
    assert renderer.privileged_context(task, observation.privileged, env) == ""  # alone: header only, counted
    assert renderer.shuffled_fallbacks == 1

    own = TurnRenderer(tokenizer, RolloutSettings(), TeacherSettings(context="next_action"))
    contexts = {}
    for task_id in ("train-00000", "train-00001", "train-00002", "train-00004"):
        other_env, other_task, other_observation = first_state(task_id)
        renderer.remember_contexts([(other_task, other_observation.privileged, other_env)])
        contexts[task_id] = own.privileged_context(other_task, other_observation.privileged, other_env)
    shuffled = renderer.privileged_context(task, observation.privileged, env)
    mine = own.privileged_context(task, observation.privileged, env)

    def tokens(text):
        return len(tokenizer(text)["input_ids"])

    assert shuffled in contexts.values() and shuffled != mine
    nearest = min(abs(tokens(text) - tokens(mine)) for text in contexts.values())
    assert abs(tokens(shuffled) - tokens(mine)) == nearest
    assert renderer.shuffled_fallbacks == 1


def test_the_rollout_builds_teacher_prompts_with_the_configured_placement(tokenizer):
    def first_action_policy(prompts):
        return [tokenizer("open drawer 1</action>", add_special_tokens=False)["input_ids"] for _ in prompts]

    def play(placement):
        renderer = TurnRenderer(
            tokenizer, RolloutSettings(response_prefix="<action>"), TeacherSettings(context="next_action", placement=placement)
        )
        samples, _ = play_episodes(["train-00003"], [0], HouseholdEnv, first_action_policy, renderer, max_turns=2)
        return samples

    prefix, user_end = play("prefix"), play("user_end")
    assert [s.prompt_ids for s in prefix] == [s.prompt_ids for s in user_end]
    assert [s.response_ids for s in prefix] == [s.response_ids for s in user_end]
    first, second = (tokenizer.decode(s.teacher_prompt_ids) for s in user_end)
    assert first.endswith("The expert's next action is: open drawer 1" + GENERATION_PROMPT + "<action>")
    assert second.endswith("The expert's next action is: take knife 1 from drawer 1" + GENERATION_PROMPT + "<action>")
    assert tokenizer.decode(prefix[0].teacher_prompt_ids).startswith(HEADER)


def test_gate_records_keep_the_teacher_placement_and_context(tiny_run_dir):
    record = json.loads((tiny_run_dir / "gates" / "step-1.jsonl").read_text().splitlines()[0])
    assert (record["teacher_placement"], record["teacher_context"]) == ("prefix", "both")


def test_config_rejects_an_unknown_placement():
    with pytest.raises(Exception, match="teacher.placement"):
        load_config(None, ["teacher.placement=middle"])


# ------------------------------------------------------------------------------------ statistics
def test_auc_counts_pairs_and_ties():
    assert auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(3.5 / 4)
    assert auc([0.0], [1.0]) == 0.0


def test_gap_and_gate_are_per_token_means():
    gap, gate = response_gap_and_gate([-1.0, -2.0], [-2.0, -2.0], beta=5.0)
    assert gap == pytest.approx(0.5)
    assert gate == pytest.approx((torch.sigmoid(torch.tensor(5.0)).item() + 0.5) / 2)


def test_verdict_thresholds():
    assert verdict(0.9, 0.7, 0.3)[0] == "informative"
    assert verdict(0.9, 0.52, 0.50)[0] == "barely informative"  # ranks well, but the gate barely moves
    assert verdict(0.55, 0.6, 0.4)[0] == "barely informative"
    assert verdict(0.2, 0.3, 0.6)[0] == "misleading"


# ------------------------------------------------------------------------------------- the probe
HINT_OVERRIDES = [
    "rollout.prompt_template='{task}'",
    "rollout.response_prefix=<action>",
    "rollout.max_turns=4",
    "rollout.temperature=1.0",
    "teacher.context=next_action",
    "teacher.placement=user_end",
    "teacher.context_template='{context}'",
    "env.kwargs={task_types: [pick_and_place]}",
]
PROBE_STATES = 24
BATCH = 8


def hint_copier(tokenizer, config, steps=100):
    """The tiny model trained, on teacher prompts of train tasks the probe does not visit, to answer the action
    the hint states: its teacher is informative by construction."""
    torch.manual_seed(0)
    model = build_tiny_model(tokenizer, seed=0)
    renderer = TurnRenderer(tokenizer, config.rollout, config.teacher)
    make_env = environment_factory(config.env.name, config.env.kwargs)
    unseen = probe_task_ids(config, make_env().task_ids(config.env.train_split))[PROBE_STATES:]
    states = expert_states(renderer, make_env, unseen, 96, config.rollout.max_turns, seed=1)
    responses = [tokenizer(demonstration_response(config, s.expert_action), add_special_tokens=False)["input_ids"] for s in states]
    prompt_ids, prompt_mask = left_pad([s.teacher_prompt_ids for s in states], tokenizer.pad_token_id)
    response_ids, response_mask = right_pad(responses, tokenizer.pad_token_id)
    input_ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, : prompt_ids.size(1)] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = torch.randint(0, len(states), (BATCH,))
        loss = model(input_ids=input_ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_probe_tells_an_informative_teacher_from_an_uninformative_one(tokenizer):
    config = load_config(None, HINT_OVERRIDES)
    target = Target("tiny", "base", config, None, None)
    with one_torch_thread():
        untrained = probe_teacher(target, PROBE_STATES, build_tiny_model(tokenizer, seed=0), tokenizer)
        copier = hint_copier(tokenizer, config)
        trained = probe_teacher(target, PROBE_STATES, copier, tokenizer)
        # the same trained model, shown the header only: the hint's content is what informs it
        headless = probe_teacher(
            Target("tiny", "base", load_config(None, [*HINT_OVERRIDES, "teacher.context=none"]), None, None),
            PROBE_STATES, copier, tokenizer,
        )
    assert trained["states"] == untrained["states"] == PROBE_STATES
    assert trained["verdict"] == "informative", trained["verdict_reason"]
    assert trained["auc"] >= 0.75 and trained["expert"]["gap_mean"] > 0 > trained["other"]["gap_mean"]
    assert untrained["verdict"] != "informative" and abs(untrained["auc"] - 0.5) < 0.2
    assert headless["verdict"] != "informative" and headless["extra_prompt_tokens"]["mean"] == 0
    assert trained["extra_prompt_tokens"]["mean"] > 20


def test_probe_without_an_expert_scores_the_agents_own_samples(tokenizer):
    config = load_config(None, ["env.name=tests_envs:NoExpertEnv", *TINY_OVERRIDES, "teacher.context=plan"])
    with one_torch_thread():
        report = probe_teacher(Target("tiny", "base", config, None, None), 4, build_tiny_model(tokenizer), tokenizer)
    assert report["mode"] == "own_samples" and report["verdict"] is None and report["auc"] is None
    assert report["states"] == 4 and report["extra_prompt_tokens"]["mean"] > 20
    assert 0.0 < report["own"]["gate_mean"] < 1.0


# ------------------------------------------------------------------------------------------- CLI
def tiny_sets(model_dir, *extra):
    return [part for o in [f"model.name={model_dir}", *TINY_OVERRIDES, *extra] for part in ("--set", o)]


def test_probe_teacher_command_prints_a_verdict_and_writes_json(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  context: plan\n  placement: user_end\n")
    with one_torch_thread():
        result = CliRunner().invoke(
            app, ["probe-teacher", str(config), "--states", "6", "--json", str(tmp_path / "probe.json"), *tiny_sets(tiny_model_dir)]
        )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["teacher"] == {"context": "plan", "placement": "user_end", "weights": "live"}
    assert report["states"] == 6 and len(report["per_state"]) == 6
    assert f"Verdict: {report['verdict']}" in result.output and "AUC" in result.output


def test_probe_teacher_user_mistakes_exit_2(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    bad_states = CliRunner().invoke(app, ["probe-teacher", str(config), "--states", "0", *tiny_sets(tiny_model_dir)])
    assert bad_states.exit_code == 2 and "--states must be at least 1" in bad_states.output
    no_dry_run = CliRunner().invoke(app, ["train", str(config), "--probe-teacher", *tiny_sets(tiny_model_dir)])
    assert no_dry_run.exit_code == 2 and "--probe-teacher goes with --dry-run" in no_dry_run.output
    missing = CliRunner().invoke(app, ["probe-teacher", str(config), "--checkpoint", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_train_dry_run_probe_teacher_prints_the_verdict(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  context: plan\n")
    with one_torch_thread():
        plain = CliRunner().invoke(app, ["train", str(config), "--dry-run", *tiny_sets(tiny_model_dir)])
        probed = CliRunner().invoke(app, ["train", str(config), "--dry-run", "--probe-teacher", *tiny_sets(tiny_model_dir)])
    assert plain.exit_code == 0 and probed.exit_code == 0, probed.output
    assert "Verdict:" not in plain.output
    assert "Estimated peak" in probed.output and "Verdict:" in probed.output and "8 states" in probed.output


def test_probe_teacher_runs_in_one_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["probe-teacher", str(tmp_path / "run.yaml")])
    assert result.exit_code == 2 and "sdar probe-teacher runs in one process" in result.output
