"""TextWorldEnv: generated games win by their walkthrough and plan, are reproducible by seed, cached on disk and
re-seeded when TextWorld builds a quest shorter than asked. Tiny games compiled into temporary caches."""

from __future__ import annotations

import json
import re
import threading

import pytest

from sdar_cli.config import RolloutSettings
from sdar_cli.envs import EnvironmentConfigError, environment_factory
from sdar_cli.envs import textworld as tw
from sdar_cli.envs.textworld import TextWorldEnv
from sdar_cli.skills import SHIPPED_BANKS_DIR

# Jericho calls TextWorld games "not fully supported" (its own score detection); the environment hides that
pytestmark = pytest.mark.filterwarnings("ignore:Game .* is not fully supported")

QUEST = {"game_kind": "quest", "world_size": 2, "num_objects": 4, "quest_length": 3, "num_train_tasks": 2,
         "num_test_tasks": 1, "seed": 0}
COOKING = {"game_kind": "cooking", "recipe_size": 1, "world_size": 1, "num_train_tasks": 1, "num_test_tasks": 1}


@pytest.fixture(scope="module")
def cache_a(tmp_path_factory):
    return tmp_path_factory.mktemp("textworld-cache-a")


@pytest.fixture(scope="module")
def quest_env(cache_a):
    env = TextWorldEnv(cache_dir=cache_a, **QUEST)
    yield env
    env.close()


@pytest.fixture(scope="module")
def first_game(quest_env):
    """What train-00000 shows at reset, for comparisons across caches and objects."""
    task, observation = quest_env.reset("train-00000")
    return task, observation, quest_env.walkthrough()


@pytest.fixture(scope="module")
def cooking_env(tmp_path_factory):
    env = TextWorldEnv(cache_dir=tmp_path_factory.mktemp("textworld-cooking"), **COOKING)
    yield env
    env.close()


def count_compiles(monkeypatch) -> list:
    calls = []
    real = tw._compile_game

    def counting(game, destination):
        calls.append(destination)
        real(game, destination)

    monkeypatch.setattr(tw, "_compile_game", counting)
    return calls


def plan_of(observation) -> list[str]:
    return re.findall(r"^\d+\. (.+)$", observation.privileged, re.MULTILINE)


def test_task_ids_name_split_and_index(quest_env):
    assert quest_env.task_ids("train") == ["train-00000", "train-00001"]
    assert quest_env.task_ids("test") == ["test-00000"]
    with pytest.raises(ValueError, match="valid splits are train, test"):
        quest_env.task_ids("valid")
    for bad in ("train-00002", "train-1", "test-00001", 7):
        with pytest.raises(ValueError, match="task id"):
            quest_env.reset(bad)


def test_replaying_the_walkthrough_wins(quest_env, first_game):
    task, observation, walkthrough = first_game
    assert task.task_type == "quest" and task.task_id == "train-00000"
    assert task.description and "TextWorld" not in observation.text  # banner and objective were cut
    assert "$$" not in observation.text and not re.search(r"^>", observation.text, re.MULTILINE)
    assert re.search(r"-= .+ =-", observation.text)  # the room header stays
    assert len(walkthrough) >= QUEST["quest_length"]
    assert plan_of(observation) == walkthrough  # a quest's plan at the start is its walkthrough
    assert observation.privileged.startswith("Expert plan from here:\n1. ")
    quest_env.reset("train-00000")
    rewards = []
    for command in walkthrough:
        observation = quest_env.step(command)
        rewards.append(observation.reward)
    assert rewards == [0.0] * (len(walkthrough) - 1) + [tw.WIN_REWARD]
    assert observation.done and observation.won and observation.admissible_actions == []
    assert observation.privileged == "Goal reached."
    assert "*** The End ***" in observation.text and "RESTART" not in observation.text
    after = quest_env.step(walkthrough[-1])  # a finished episode admits nothing
    assert after.text == tw.NOTHING_HAPPENS and after.reward == 0.0 and after.done


def test_following_the_plan_after_a_detour_wins(quest_env):
    _, observation = quest_env.reset("train-00001")
    plan = plan_of(observation)
    detour = next(a for a in observation.admissible_actions if a not in plan and a.split()[0] in ("go", "examine"))
    observation = quest_env.step(detour)
    total, steps = observation.reward, 1
    while not observation.done and steps < 20:
        action = quest_env.expert_action()  # the plan is re-computed from the current state
        assert action == plan_of(observation)[0]
        observation = quest_env.step(action)
        total, steps = total + observation.reward, steps + 1
    assert observation.won and total == tw.WIN_REWARD
    assert steps <= len(plan) + 3
    assert quest_env.expert_action() is None


def test_wrong_actions_do_not_win(quest_env, first_game):
    quest_env.reset("train-00000")
    total = 0.0
    for action in ["look", "inventory", "look", "dance wildly", "take the moon"]:
        observation = quest_env.step(action)
        total += observation.reward
        assert not observation.done and not observation.won
    assert total == 0.0
    assert observation.text == tw.NOTHING_HAPPENS  # an inadmissible command is not sent to the game
    assert plan_of(observation) == first_game[2]  # nothing moved: the plan is still the whole walkthrough
    with pytest.raises(RuntimeError, match="reset"):
        TextWorldEnv(cache_dir=quest_env.cache_dir, **QUEST).step("look")


def test_same_seed_same_game_in_another_cache_compiled_once_by_racing_threads(tmp_path, monkeypatch, first_game):
    compiles = count_compiles(monkeypatch)
    envs = [TextWorldEnv(cache_dir=tmp_path, **QUEST) for _ in range(2)]
    results: list = [None, None]

    def play(slot: int) -> None:
        task, observation = envs[slot].reset("train-00000")
        results[slot] = (task, observation, envs[slot].walkthrough())

    threads = [threading.Thread(target=play, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(compiles) == 1  # the second thread waited for the first one's game
    for task, observation, walkthrough in results:
        assert task == first_game[0]
        assert observation.text == first_game[1].text and observation.privileged == first_game[1].privileged
        assert walkthrough == first_game[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first_game_files(envs[0]))
    for env in envs:
        env.close()


def test_episodes_in_parallel_threads_all_play(quest_env):
    """Loading TextWorld games from several threads at once fails at random without the module's lock."""
    quest_env.game_path("train-00001")
    start = threading.Barrier(8)
    errors, wins = [], []

    def play(slot: int) -> None:
        env = TextWorldEnv(cache_dir=quest_env.cache_dir, **QUEST)
        try:
            for round_ in range(3):
                start.wait(timeout=60)
                _, observation = env.reset(quest_env.task_ids("train")[(slot + round_) % 2])
                while not observation.done:
                    observation = env.step(plan_of(observation)[0])
                wins.append(observation.won)
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(repr(err))
            start.abort()  # the others stop waiting for this thread
        finally:
            env.close()

    threads = [threading.Thread(target=play, args=(slot,)) for slot in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and wins == [True] * 24


def first_game_files(env):
    path = env.game_path("train-00000")
    return [path, path.with_suffix(".json")]


def test_cached_game_is_reused(cache_a, first_game, monkeypatch):
    env = TextWorldEnv(cache_dir=cache_a, **QUEST)
    path = env.game_path("train-00000")
    before = path.stat().st_mtime_ns

    def no_generation(*args):
        raise AssertionError("the cached game should have been used")

    monkeypatch.setattr(tw, "generate_game", no_generation)
    task, observation = env.reset("train-00000")
    assert task == first_game[0] and observation.text == first_game[1].text
    assert path.stat().st_mtime_ns == before
    assert not list(cache_a.glob(".compiling-*"))  # no temporary folder left behind
    env.close()


def test_different_tasks_are_different_games(quest_env, first_game):
    quest_env.reset("train-00001")
    other = quest_env.walkthrough()
    assert other != first_game[2]
    assert quest_env.game_path("train-00001") != quest_env.game_path("train-00000")
    assert tw.task_seed(0, "train", 0) != tw.task_seed(0, "test", 0) != tw.task_seed(1, "train", 0)


def test_reseed_rule_keeps_the_first_long_enough_attempt(monkeypatch):
    lengths = {tw.attempt_seed(99, 0): 2, tw.attempt_seed(99, 1): 3, tw.attempt_seed(99, 2): 4}
    tried = []

    def fake_make(spec, split, seed):
        tried.append(seed)
        if seed == tw.attempt_seed(99, 1):
            raise RuntimeError("TextWorld could not build this one")
        return seed

    monkeypatch.setattr(tw, "_make_game", fake_make)
    monkeypatch.setattr(tw, "plan_length", lambda game: lengths.get(game, 0))
    spec = tw._game_spec("quest", 4, None, None, None, None, None)
    assert tw.generate_game(spec, "train", 99) == (tw.attempt_seed(99, 2), 2)
    assert tried == [99, tw.attempt_seed(99, 1), tw.attempt_seed(99, 2)]
    assert len({tw.attempt_seed(99, k) for k in range(tw.MAX_SEED_ATTEMPTS)}) == tw.MAX_SEED_ATTEMPTS
    monkeypatch.setattr(tw, "plan_length", lambda game: 1)
    with pytest.raises(RuntimeError, match="at least 4 actions.*Lower quest_length"):
        tw.generate_game(spec, "train", 99)


def test_a_quest_shorter_than_asked_is_reseeded(tmp_path):
    # measured: with these parameters and seed 0, TextWorld's first draw for train-00008 is a 4-action quest
    kwargs = {"game_kind": "quest", "world_size": 2, "num_objects": 4, "quest_length": 5, "num_train_tasks": 9}
    env = TextWorldEnv(cache_dir=tmp_path, **kwargs)
    seed = tw.task_seed(0, "train", 8)
    assert tw.plan_length(tw._make_game(env.spec, "train", seed)) == 4
    path = env.game_path("train-00008")
    metadata = json.loads(path.with_suffix(".json").read_text())["metadata"]["sdar"]
    assert metadata["task_seed"] == seed and metadata["attempt"] >= 1
    assert metadata["game_seed"] == tw.attempt_seed(seed, metadata["attempt"])
    _, observation = env.reset("train-00008")
    assert len(env.walkthrough()) >= 5 and len(plan_of(observation)) >= 5
    env.close()


def test_cooking_walkthrough_wins_and_eating_an_ingredient_loses(cooking_env):
    task, observation = cooking_env.reset("train-00000")
    assert task.task_type == "cooking" and "cookbook" in task.description
    assert plan_of(observation)[-2:] == ["prepare meal", "eat meal"]
    rewards = [cooking_env.step(command).reward for command in cooking_env.walkthrough()]
    assert rewards[-1] == tw.WIN_REWARD and sum(rewards) == tw.WIN_REWARD

    _, observation = cooking_env.reset("train-00000")
    eaten = None
    while eaten is None:
        command = plan_of(observation)[0]
        observation = cooking_env.step(command)
        taken = re.match(r"take (.+?)( from .+)?$", command)
        if taken and f"eat {taken.group(1)}" in observation.admissible_actions:
            eaten = taken.group(1)
    observation = cooking_env.step(f"eat {eaten}")
    assert observation.done and not observation.won and observation.reward == 0.0
    assert "You lost" in observation.text and observation.privileged == ""


def test_environment_factory_builds_working_environments(cache_a, first_game):
    make = environment_factory("textworld", {**QUEST, "cache_dir": str(cache_a)})
    env = make()
    task, _ = env.reset("train-00000")
    assert isinstance(env, TextWorldEnv) and task == first_game[0]
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quest_length": 0}, "quest_length must be between 1 and"),
        ({"game_kind": "maze"}, "game_kind must be one of quest, cooking"),
        ({"world_size": 0}, "world_size must be between 1 and 20"),
        ({"objective_style": "verbose"}, "objective_style must be one of brief, detailed"),
        ({"recipe_size": 2}, "recipe_size applies to game_kind 'cooking' only"),
        ({"game_kind": "cooking", "world_size": 5}, r"world_size of a cooking game must be one of \(1, 6, 9, 12\)"),
        ({"game_kind": "cooking", "num_objects": 4}, "num_objects applies to game_kind 'quest' only"),
        ({"game_kind": "cooking", "cooking_skills": ["fry"]}, "cooking_skills must be a list drawn from"),
        ({"game_kind": "cooking", "recipe_size": 6}, "recipe_size must be between 1 and 5"),
        ({"num_train_tasks": 0}, "num_train_tasks must be at least 1"),
    ],
)
def test_bad_kwargs_are_rejected_with_the_reason(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextWorldEnv(cache_dir=tmp_path, **kwargs)
    with pytest.raises(EnvironmentConfigError, match=message):
        environment_factory("textworld", {"cache_dir": str(tmp_path), **kwargs})


def test_unusable_cache_dir_names_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(EnvironmentConfigError, match="cache_dir.*SDAR_CACHE"):
        TextWorldEnv(cache_dir=blocker / "games")


def test_default_cache_dir_follows_sdar_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDAR_CACHE", str(tmp_path))
    assert TextWorldEnv().cache_dir == tmp_path / "textworld"


def test_clean_feedback_drops_banner_objective_prompt_and_restart_question():
    raw = (
        "\n\n    ________  __    __\n   |        \\|  \\  |  \\\n    \\$$$$$$$$| $$  | $$ \n\n"
        "Get the key! Then win.\n\n-= Cellar =-\nYou see a box.\n\n\n\n>          -= Cellar =-0/1"
    )
    assert tw.clean_feedback(raw, "Get the key! Then win.") == "-= Cellar =-\nYou see a box."
    end = ("\nYou unlock the box.\n\n\nYour score has just gone up by one point.\n\n\n        *** The End ***\n\n"
           "You scored 1 out of a possible 1, in 6 turns.\n\n\nWould you like to RESTART, RESTORE a saved game, QUIT "
           "or UNDO the last command?\n>      -= Cellar =-0/5")
    assert tw.clean_feedback(end) == ("You unlock the box.\n\nYour score has just gone up by one point.\n\n"
                                      "*** The End ***\n\nYou scored 1 out of a possible 1, in 6 turns.")


def test_max_turns_grow_with_the_game(tmp_path):
    assert TextWorldEnv(cache_dir=tmp_path, quest_length=5).max_turns == 30
    assert TextWorldEnv(cache_dir=tmp_path, quest_length=12).max_turns == 48
    assert TextWorldEnv(cache_dir=tmp_path, game_kind="cooking", recipe_size=3, world_size=6).max_turns == 80


def test_rollout_defaults_and_skill_bank():
    RolloutSettings.model_validate(TextWorldEnv.rollout_defaults)
    bank = SHIPPED_BANKS_DIR / TextWorldEnv.skill_bank
    for stem in ("general", *tw.GAME_KINDS):
        text = (bank / f"{stem}.md").read_text()
        assert 1000 <= len(text.encode()) <= 4096 and text.count("\n## ") >= 2
