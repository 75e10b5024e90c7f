"""Tests of ALFWorldEnv: generated games in the alfworld-download layout, played by alfworld's engine."""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import pytest

from sdar_cli.envs import EnvironmentConfigError, environment_factory
from sdar_cli.envs import alfworld as alfworld_env
from sdar_cli.envs.alfworld import TASK_TYPES, WIN_REWARD, ALFWorldEnv
from sdar_cli.envs.alfworld_gen import GenerateSpec, generate_dataset
from sdar_cli.envs.base import Observation
from sdar_cli.skills import SHIPPED_BANKS_DIR

# 6 train games cover the six task types (round robin); valid_unseen uses the held-out scenes
GENERATE = {"seed": 0, "train": 6, "valid_seen": 1, "valid_unseen": 6}
PLAN_HEADER = "Expert plan from here:\n"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("alfworld-cache")


@pytest.fixture(scope="module")
def env_kwargs(cache_dir) -> dict:
    return {"generate": GENERATE, "cache_dir": str(cache_dir)}


@pytest.fixture(scope="module")
def env(env_kwargs):
    environment = ALFWorldEnv(**env_kwargs)
    yield environment
    environment.close()


@pytest.fixture(scope="module")
def data_root(env) -> Path:
    """The generated folder: laid out exactly like alfworld-download's $ALFWORLD_DATA."""
    return env.root


def plan_of(obs: Observation) -> list[str]:
    """Parse the numbered plan the teacher sees."""
    assert obs.privileged.startswith(PLAN_HEADER)
    steps = [line.split(". ", 1) for line in obs.privileged[len(PLAN_HEADER):].split("\n")]
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1))
    return [action for _, action in steps]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- expert plans win every task type --------------------------------------------------------


def test_train_split_holds_all_six_task_types(env):
    ids = env.task_ids("train")
    assert len(ids) == 6
    assert {TASK_TYPES[i.split("/")[1].split("-")[0]] for i in ids} == set(TASK_TYPES.values())
    assert ids == sorted(ids)


@pytest.mark.parametrize("task_type", sorted(TASK_TYPES.values()))
def test_following_the_expert_plan_wins_with_reward_10(env, task_type):
    task_id = next(i for i in env.task_ids("train") if TASK_TYPES[i.split("/")[1].split("-")[0]] == task_type)
    task, obs = env.reset(task_id)
    assert task.task_type == task_type
    assert task.description.startswith("Your task is to: ") and task.description.endswith(".")
    assert obs.text.startswith("You are in the middle of a room. Looking quickly around you, you see ")
    assert "help" not in obs.admissible_actions and "look" in obs.admissible_actions
    plan = plan_of(obs)
    assert plan == env.expert_plan() and len(plan) >= 3 and env.expert_action() == plan[0]
    rewards = []
    for i, action in enumerate(plan):
        assert not obs.done
        assert action in obs.admissible_actions
        obs = env.step(action)
        rewards.append(obs.reward)
        assert "basinbasin" not in obs.text
        if i < len(plan) - 1:
            assert plan_of(obs) == plan[i + 1:]  # the plan from the new state is the rest of the old one
    assert obs.done and obs.won
    assert rewards == [0.0] * (len(plan) - 1) + [WIN_REWARD]
    assert obs.admissible_actions == [] and obs.privileged == "" and env.expert_action() is None
    after = env.step("look")  # the reward is given once
    assert after.done and after.won and after.reward == 0.0


def test_a_sequence_that_never_places_the_object_does_not_win(env):
    for task_id in env.task_ids("train"):
        _, obs = env.reset(task_id)
        rewards = []
        for action in [a for a in obs.admissible_actions if a.startswith("go to")][:8] + ["inventory", "look"]:
            obs = env.step(action)
            rewards.append(obs.reward)
            assert obs.text and not obs.done
        assert sum(rewards) == 0.0 and not obs.won
        assert plan_of(obs)  # still solvable from here


def test_an_inadmissible_command_changes_nothing(env):
    _, obs = env.reset(env.task_ids("train")[0])
    nothing = env.step("take the moon from the sky")
    assert nothing.text == "Nothing happens." and nothing.reward == 0.0 and not nothing.done
    assert nothing.admissible_actions == obs.admissible_actions and nothing.privileged == obs.privileged
    # case and spacing are forgiven
    moved = env.step("  " + plan_of(obs)[0].upper() + " ")
    assert moved.text.startswith("You arrive at ")


def test_observations_match_a_plain_alfworld_engine(env):
    """The caches behind the engine lock change nothing: random play reads exactly as in alfworld's own stack."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs import PddlEnv

    rng = random.Random(0)
    for task_id in env.task_ids("train")[:2]:
        task, obs = env.reset(task_id)
        plain = AlfredInfos(AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True))))
        plain.load(str(env.root / "json_2.1.1" / task_id / "game.tw-pddl"))
        state = plain.reset()
        assert state.feedback.endswith(obs.text + "\n\n" + task.description)
        for _ in range(15):
            assert obs.admissible_actions == [c for c in state["admissible_commands"] if c != "help"]
            action = rng.choice(obs.admissible_actions + ["jump"])
            obs, (state, _, _) = env.step(action), plain.step(action)
            assert obs.text == state.feedback.strip() and obs.won == state["won"]
            if obs.done:
                break


def test_wrong_ids_and_splits_are_rejected(env):
    with pytest.raises(ValueError, match="valid splits are train, valid_seen, valid_unseen"):
        env.task_ids("test")
    with pytest.raises(ValueError, match="unknown task id"):
        env.reset("train/not-a-task/trial_x")
    with pytest.raises(RuntimeError, match="reset"):
        ALFWorldEnv(generate=GENERATE, cache_dir=str(env.root.parent)).step("look")


def test_alfworld_planner_expert_agrees_with_the_fast_expert(env_kwargs):
    """expert='planner' is alfworld's planner expert (fast-downward): its plan wins and is no shorter."""
    planner = ALFWorldEnv(**env_kwargs, expert="planner")
    fast = ALFWorldEnv(**env_kwargs)
    for task_id in planner.task_ids("valid_unseen")[:2]:  # look_at_obj_in_light and pick_and_place: quick to plan
        _, obs = planner.reset(task_id)
        _, fast_obs = fast.reset(task_id)
        plan = plan_of(obs)
        assert len(plan) == len(plan_of(fast_obs))
        for action in plan:
            obs = planner.step(action)
        assert obs.won and obs.reward == WIN_REWARD
    planner.close()
    fast.close()


def test_no_expert_gives_no_privileged_context(env_kwargs):
    env = ALFWorldEnv(**env_kwargs, expert="none")
    _, obs = env.reset(env.task_ids("train")[0])
    assert obs.privileged == "" and env.expert_plan() == [] and env.expert_action() is None


# -- generated data: reproducible, in alfworld-download's layout -----------------------------


def test_same_seed_same_files_and_more_tasks_keep_the_first(tmp_path, data_root):
    again = generate_dataset(GenerateSpec.from_kwargs(GENERATE), tmp_path / "a")
    assert tree(again) == tree(data_root)
    bigger = generate_dataset(GenerateSpec.from_kwargs({**GENERATE, "train": 8}), tmp_path / "b")
    first = {k: v for k, v in tree(again).items() if k.startswith("json_2.1.1/train/")}
    assert first.items() <= tree(bigger).items()
    other = generate_dataset(GenerateSpec.from_kwargs({**GENERATE, "seed": 1}), tmp_path / "c")
    assert tree(other) != tree(again)


def test_generated_files_follow_alfworld_format(data_root):
    games = sorted(data_root.glob("json_2.1.1/*/*/*/game.tw-pddl"))
    assert len(games) == sum(v for k, v in GENERATE.items() if k != "seed")
    for game_file in games:
        game = json.loads(game_file.read_text())
        assert set(game) == {"pddl_domain", "grammar", "pddl_problem", "solvable"} and game["solvable"] is True
        assert "UNKNOWN GOAL" not in game["grammar"]
        assert "(:domain alfred)" in game["pddl_problem"] and "_bar_" in game["pddl_problem"]
        traj = json.loads((game_file.parent / "traj_data.json").read_text())
        assert game_file.parent.parent.name.startswith(traj["task_type"] + "-" + traj["pddl_params"]["object_target"])
    unseen = {json.loads(p.read_text())["scene"]["scene_num"] for p in data_root.glob("json_2.1.1/valid_unseen/*/*/traj_data.json")}
    seen = {json.loads(p.read_text())["scene"]["scene_num"] for p in data_root.glob("json_2.1.1/train/*/*/traj_data.json")}
    assert unseen <= {10, 219, 308, 424} and not unseen & seen


def test_generated_receptacle_ids_name_basins_as_alfred_does():
    # alfworld's demangler appends "basin" to any id containing it: "SinkBasin|..." would read "sinkbasinbasin"
    from sdar_cli.envs.alfworld_gen import catalogue

    for scene in catalogue().scenes:
        for receptacle in scene.receptacles:
            parts = receptacle.alfred_id.split("|")
            if receptacle.kind.endswith("Basin"):
                assert (parts[0] + "Basin", parts[-1]) == (receptacle.kind, receptacle.kind)
            else:
                assert parts[0] == receptacle.kind and "basin" not in receptacle.alfred_id.lower()


def test_generate_kwarg_is_validated(cache_dir):
    with pytest.raises(ValueError, match="unknown key"):
        ALFWorldEnv(generate={"seed": 0, "test": 3}, cache_dir=str(cache_dir))
    with pytest.raises(ValueError, match="non-negative"):
        ALFWorldEnv(generate={"train": -1}, cache_dir=str(cache_dir))
    with pytest.raises(ValueError, match="not both"):
        ALFWorldEnv(generate=GENERATE, data_path=str(cache_dir), cache_dir=str(cache_dir))


# -- the real-data path ---------------------------------------------------------------------


def test_real_data_path_reads_an_alfworld_download_folder(tmp_path, env, data_root, monkeypatch):
    real = tmp_path / "alfworld-data"
    shutil.copytree(data_root / "json_2.1.1", real / "json_2.1.1")
    # games alfworld skips: marked unsolvable, movable-receptacle tasks, no traj_data.json
    first = real / "json_2.1.1" / env.task_ids("train")[0]
    for name, edit in [("pick_and_place_simple-Zzz-None-Desk-1", "unsolvable"),
                       ("pick_and_place_with_movable_recep-Apple-Bowl-Fridge-1", "movable"),
                       ("pick_and_place_simple-Yyy-None-Desk-1", "no-traj")]:
        copy = real / "json_2.1.1" / "train" / name / "trial_T1"
        shutil.copytree(first, copy)
        if edit == "unsolvable":
            game = json.loads((copy / "game.tw-pddl").read_text())
            (copy / "game.tw-pddl").write_text(json.dumps({**game, "solvable": False}))
        if edit == "no-traj":
            (copy / "traj_data.json").unlink()

    from_kwarg = ALFWorldEnv(data_path=str(real))
    assert not from_kwarg.generated
    for split in ("train", "valid_seen", "valid_unseen"):
        assert from_kwarg.task_ids(split) == env.task_ids(split)
    assert ALFWorldEnv(data_path=str(real / "json_2.1.1")).task_ids("train") == env.task_ids("train")
    monkeypatch.setenv("ALFWORLD_DATA", str(real))
    from_env_var = ALFWorldEnv()
    task_id = from_env_var.task_ids("valid_unseen")[0]
    task, obs = from_env_var.reset(task_id)
    assert (task, obs.text) == (env.reset(task_id)[0], env.reset(task_id)[1].text)
    assert ALFWorldEnv(data_path=str(real), task_types=["pick_two_obj"]).task_ids("train") == [
        i for i in env.task_ids("train") if i.split("/")[1].startswith("pick_two_obj_and_place")]


def test_missing_data_names_alfworld_data_and_the_download(tmp_path, monkeypatch):
    for kwargs, env_var in [({"data_path": str(tmp_path / "nowhere")}, None),
                            ({}, str(tmp_path / "nowhere")),
                            ({"data_path": str(tmp_path)}, None)]:  # exists, but holds no json_2.1.1/
        if env_var:
            monkeypatch.setenv("ALFWORLD_DATA", env_var)
        with pytest.raises(EnvironmentConfigError) as err:
            ALFWorldEnv(**kwargs)
        message = str(err.value)
        assert "ALFWORLD_DATA" in message and "alfworld-download" in message and "json_2.1.1" in message
        assert "generate" in message
    (tmp_path / "json_2.1.1" / "train").mkdir(parents=True)
    with pytest.raises(EnvironmentConfigError, match="valid_seen does not exist"):
        ALFWorldEnv(data_path=str(tmp_path)).task_ids("valid_seen")
    with pytest.raises(EnvironmentConfigError, match="no playable"):
        ALFWorldEnv(data_path=str(tmp_path)).task_ids("train")


# -- plumbing: factory, skills, threads ------------------------------------------------------


def test_environment_factory_builds_alfworld(env_kwargs):
    make = environment_factory("alfworld", env_kwargs)
    env = make()
    assert isinstance(env, ALFWorldEnv) and env.max_turns == 50 and env.skill_bank == "alfworld"
    _, obs = env.reset(env.task_ids("valid_unseen")[0])
    assert obs.admissible_actions
    env.close()
    with pytest.raises(EnvironmentConfigError, match="expert"):
        environment_factory("alfworld", {**env_kwargs, "expert": "oracle"})


def test_rollout_defaults_and_skill_files():
    defaults = ALFWorldEnv.rollout_defaults
    assert defaults["history_turns"] == 2 and defaults["stop_strings"] == ["</action>"]
    assert "<think>" in defaults["prompt_template"] and "{task}" in defaults["prompt_template"]
    bank = SHIPPED_BANKS_DIR / ALFWorldEnv.skill_bank
    assert {p.stem for p in bank.glob("*.md")} == {"general", *TASK_TYPES.values()}
    for path in bank.glob("*.md"):
        assert 500 < len(path.read_text()) < 4096 and "\n## " in path.read_text()


def play(env: ALFWorldEnv, task_id: str, seed: int) -> list[tuple]:
    """A seeded mix of expert and random admissible actions; everything observed along the way."""
    rng = random.Random(seed)
    task, obs = env.reset(task_id)
    seen = [(task, obs)]
    for _ in range(12):
        if obs.done:
            break
        action = rng.choice(obs.admissible_actions) if rng.random() < 0.4 else plan_of(obs)[0]
        obs = env.step(action)
        seen.append((action, obs))
    return seen


def test_two_envs_in_two_threads_match_sequential_play(env_kwargs):
    ids = ALFWorldEnv(**env_kwargs).task_ids("train")
    jobs = [(ids[0], 1), (ids[5], 2)]
    sequential = [play(ALFWorldEnv(**env_kwargs), task_id, seed) for task_id, seed in jobs]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def worker(slot: int) -> None:
        env = ALFWorldEnv(**env_kwargs)
        barrier.wait()
        results[slot] = play(env, *jobs[slot])
        env.close()

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == sequential


def test_closing_returns_the_engine_library_to_the_pool(env_kwargs):
    env = ALFWorldEnv(**env_kwargs)
    env.reset(env.task_ids("train")[0])
    idle = len(alfworld_env._IDLE_LIBRARIES)
    env.close()
    assert len(alfworld_env._IDLE_LIBRARIES) == idle + 1
    env.reset(env.task_ids("train")[1])  # a closed env can play again: it takes a library back
    assert len(alfworld_env._IDLE_LIBRARIES) == idle
    env.close()
