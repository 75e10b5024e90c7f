"""TextWorldEnv: procedurally generated text adventures from Microsoft TextWorld (pip install textworld).

Two kinds of game (the task type, which also names the skill file):

    quest     TextWorld's random quest (`make_game`): a map of `world_size` rooms holding `num_objects`
              objects, and a chain of `quest_length` actions to perform (fetch a key, unlock a box,
              put an object somewhere, ...). The objective names only the final action ("brief") or
              spells out every step ("detailed").
    cooking   TextWorld's cooking challenge (the tw-cooking games of the First TextWorld Problems):
              find the `recipe_size` ingredients the cookbook lists, prepare them as it says (cook
              them with the stove, oven or BBQ; slice, dice or chop them with a knife), then
              "prepare meal" in the kitchen and "eat meal". Eating an ingredient or burning it loses.

A task id names its split and index ("train-00003"); the game's seed is a stable hash of
(seed, split, index), so the same id names the same game on every machine. A game is generated
and compiled (Inform 7, shipped with TextWorld, 1-5 s) on the first reset of its task and kept in
`cache_dir` under a name that hashes all generation parameters and the seed; later resets, in any
process, load the compiled file (~20 ms). Compilation writes to a temporary folder and renames,
so concurrent processes never read a half-written game. TextWorld's Python side is not thread-safe:
within a process all TextWorld calls run one at a time under a lock (steps take ~10 ms).

Quest length rule: TextWorld sometimes builds a quest shorter than asked. A generated game is kept
only when its expert plan from the start (TextWorld's winning policy) has at least `quest_length`
actions; otherwise the next seed of the task's fixed seed sequence is tried (attempt k > 0 uses
stable_hash(task seed, k)), up to MAX_SEED_ATTEMPTS attempts.

Reward: WIN_REWARD (10) on the step that wins (as in ALFWorld), 0 otherwise; a lost game (cooking)
ends the episode with 0. The teacher's privileged context is TextWorld's `policy_commands`, the
plan re-computed from the current state after every step.

    env = TextWorldEnv(game_kind="quest", quest_length=5)
    task, obs = env.reset(env.task_ids("train")[0])
    obs = env.step(obs.admissible_actions[0])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from .base import (
    TEXT_GAME_ROLLOUT_DEFAULTS,
    Environment,
    EnvironmentConfigError,
    Observation,
    Task,
    check_int,
    numbered_task_ids,
    parse_numbered_task_id,
    require_module,
)

# Jericho warns that TextWorld's games are "not fully supported" (its own score/move detection); TextWorld tracks
# score, wins and losses itself, so the warning says nothing about these games.
warnings.filterwarnings("ignore", message=r"Game '.*' is not fully supported", module="jericho")

GAME_KINDS: tuple[str, ...] = ("quest", "cooking")
OBJECTIVE_STYLES: tuple[str, ...] = ("brief", "detailed")
COOKING_WORLD_SIZES: tuple[int, ...] = (1, 6, 9, 12)  # the room counts the cooking challenge supports
COOKING_SKILLS: tuple[str, ...] = ("open", "cook", "cut")

WIN_REWARD = 10.0
NOTHING_HAPPENS = "Nothing happens."
MAX_QUEST_LENGTH = 40
MAX_SEED_ATTEMPTS = 25
#: part of every cache key: bump it when the generation rule changes so stale games are not reused
GENERATOR_VERSION = 1


# --------------------------------------------------------------------------------------------
# What decides a game, and the seeds.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GameSpec:
    """Every generation parameter of a game except its seed; None marks one the kind does not use."""

    kind: str
    quest_length: int
    world_size: int
    num_objects: int | None  # quest
    objective_style: str | None  # quest
    recipe_size: int | None  # cooking
    cooking_skills: tuple[str, ...] | None  # cooking

    def cache_name(self, split: str, task_seed: int) -> str:
        """The file stem of the compiled game: readable kind and split, then a hash of everything."""
        key = json.dumps({"spec": asdict(self), "split": split, "seed": task_seed, "version": GENERATOR_VERSION,
                          "textworld": _textworld_version()}, sort_keys=True)
        return f"{self.kind}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def _stable_seed(*parts: object) -> int:
    """A process-independent seed in [0, 2**31) (Python's hash() is salted per process)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**31


def task_seed(base_seed: int, split: str, index: int) -> int:
    """The fixed seed of task `index` of `split`."""
    return _stable_seed("sdar-textworld", base_seed, split, index)


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of generation attempt `attempt` of a task (attempt 0 is the task seed itself)."""
    return seed if attempt == 0 else _stable_seed("sdar-textworld-reseed", seed, attempt)


@lru_cache(maxsize=1)
def _textworld_version() -> str:
    import textworld

    return textworld.__version__


# --------------------------------------------------------------------------------------------
# Generation (TextWorld's generators) and the quest length rule.
# --------------------------------------------------------------------------------------------

# TextWorld's Python side shares mutable state between games (the logic parser, knowledge-base and type caches):
# concurrent game loads fail at random. Every TextWorld call (generate, load, reset, step) holds this lock;
# only the Inform 7 compiler (a subprocess) runs outside it. A step takes 4-16 ms, so episodes barely wait.
_TEXTWORLD_LOCK = threading.RLock()


def _make_game(spec: GameSpec, split: str, seed: int) -> Any:
    """One TextWorld game (not yet compiled) for `seed`; TextWorld's errors pass through."""
    import textworld
    from textworld.generator import make_game

    options = textworld.GameOptions()
    options.seeds = seed
    if spec.kind == "quest":
        options.nb_rooms = spec.world_size
        options.nb_objects = spec.num_objects
        options.quest_length = spec.quest_length
        options.grammar.only_last_action = spec.objective_style == "brief"
        return make_game(options)
    from textworld.challenges.tw_cooking import cooking

    skills = set(spec.cooking_skills or ())
    settings = {
        "recipe": spec.recipe_size,
        "take": spec.recipe_size,  # every ingredient has to be found (none starts in the inventory)
        "go": spec.world_size,
        "open": "open" in skills,
        "cook": "cook" in skills,
        "cut": "cut" in skills,
        "drop": False,  # a limited inventory breaks the challenge's walkthrough (a known TextWorld bug)
        "recipe_seed": seed,
        "split": split,  # the challenge's own food split: test games use foods/preparations train never sees
    }
    return cooking.make(settings, options)


def plan_length(game: Any) -> int:
    """Actions of the expert plan from the start (TextWorld's winning policy); 0 when there is none."""
    from textworld.generator.game import GameProgression

    return len(GameProgression(game).winning_policy or ())


def generate_game(spec: GameSpec, split: str, seed: int) -> tuple[Any, int]:
    """The game of a task and the attempt that produced it, by the quest length rule (module docstring).

    Raises RuntimeError when MAX_SEED_ATTEMPTS attempts give no game with a long enough plan.
    """
    lengths: list[str] = []
    for attempt in range(MAX_SEED_ATTEMPTS):
        try:
            with _TEXTWORLD_LOCK:
                game = _make_game(spec, split, attempt_seed(seed, attempt))
                length = plan_length(game)
        except Exception as err:  # noqa: BLE001 - a failed draw is one more re-seed, like a short one
            lengths.append(f"{type(err).__name__}")
            continue
        if length >= spec.quest_length:
            return game, attempt
        lengths.append(str(length))
    raise RuntimeError(
        f"no {spec.kind} game with an expert plan of at least {spec.quest_length} actions in {MAX_SEED_ATTEMPTS} "
        f"seeds (plan lengths or errors: {', '.join(lengths)}). Lower quest_length or enlarge the game "
        "(world_size, num_objects, recipe_size, cooking_skills)."
    )


def _compile_game(game: Any, destination: Path) -> None:
    """Compile `game` to destination (.z8, with its .json beside it), atomically: a temporary folder, then
    renames (the .json first, so a visible .z8 always has its .json)."""
    from textworld.generator.inform7 import compile_inform7_game, generate_inform7_source

    with tempfile.TemporaryDirectory(prefix=".compiling-", dir=destination.parent) as folder:
        compiled = Path(folder) / destination.name
        with _TEXTWORLD_LOCK:
            source = generate_inform7_source(game)
            game.save(str(compiled.with_suffix(".json")))
        compile_inform7_game(source, str(compiled))
        os.replace(compiled.with_suffix(".json"), destination.with_suffix(".json"))
        os.replace(compiled, destination)


_KEY_LOCKS: dict[str, threading.Lock] = {}
_KEY_LOCKS_GUARD = threading.Lock()


def _key_lock(path: Path) -> threading.Lock:
    with _KEY_LOCKS_GUARD:
        return _KEY_LOCKS.setdefault(str(path), threading.Lock())


def compiled_game(spec: GameSpec, split: str, seed: int, cache_dir: Path) -> Path:
    """The path of the compiled game of (spec, split, seed), generating and compiling it if the cache lacks it.

    Threads of one process wait for each other on the same game; other processes may compile the same
    game at the same time, harmlessly (same content, atomic renames).
    """
    path = cache_dir / (spec.cache_name(split, seed) + ".z8")
    if path.is_file():
        return path
    with _key_lock(path):
        if not path.is_file():
            game, attempt = generate_game(spec, split, seed)
            with _TEXTWORLD_LOCK:
                game.metadata["walkthrough"] = game.walkthrough
            game.metadata["sdar"] = {"spec": asdict(spec), "split": split, "task_seed": seed, "attempt": attempt,
                                     "game_seed": attempt_seed(seed, attempt)}
            _compile_game(game, path)
    return path


# --------------------------------------------------------------------------------------------
# Text the agent reads.
# --------------------------------------------------------------------------------------------

_ART_LINE = re.compile(r"^[ _|\\/$>]*[_|\\/$][ _|\\/$>]*$")  # banner lines hold only $ _ | \ / > and spaces
_PROMPT_LINE = re.compile(r"^>.*$", re.MULTILINE)  # the command prompt and the status bar behind it
_RESTART_QUESTION = "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"


def clean_feedback(text: str, objective: str = "") -> str:
    """TextWorld's feedback without the ASCII-art banner, the objective (the prompt shows it as the task),
    the prompt/status line and the end-of-game restart question; runs of blank lines collapse to one.

    At reset the banner and the objective come first, so everything up to the end of the objective goes.
    """
    objective = objective.strip()
    if objective and objective in text:
        text = text.split(objective, 1)[1]
    text = _PROMPT_LINE.sub("", text.replace(_RESTART_QUESTION, ""))
    lines = [line.strip() for line in text.splitlines() if not _ART_LINE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _privileged_text(plan: list[str], won: bool) -> str:
    if won:
        return "Goal reached."
    if not plan:
        return ""
    return "Expert plan from here:\n" + "\n".join(f"{i}. {command}" for i, command in enumerate(plan, 1))


# --------------------------------------------------------------------------------------------
# The environment.
# --------------------------------------------------------------------------------------------


def _game_spec(game_kind: str, quest_length: int, world_size: int | None, num_objects: int | None,
               objective_style: str | None, recipe_size: int | None,
               cooking_skills: list[str] | tuple[str, ...] | None) -> GameSpec:
    """The validated spec; a parameter of the other kind is an error rather than silently ignored."""
    if game_kind not in GAME_KINDS:
        raise ValueError(f"game_kind must be one of {', '.join(GAME_KINDS)}, got {game_kind!r}")
    quest_length = check_int("quest_length", quest_length, 1, MAX_QUEST_LENGTH)
    if game_kind == "quest":
        for name, value in (("recipe_size", recipe_size), ("cooking_skills", cooking_skills)):
            if value is not None:
                raise ValueError(f"{name} applies to game_kind 'cooking' only; remove it or set game_kind: cooking")
        style = "brief" if objective_style is None else objective_style
        if style not in OBJECTIVE_STYLES:
            raise ValueError(f"objective_style must be one of {', '.join(OBJECTIVE_STYLES)}, got {style!r}")
        return GameSpec(
            kind="quest",
            quest_length=quest_length,
            world_size=check_int("world_size", 3 if world_size is None else world_size, 1, 20),
            num_objects=check_int("num_objects", 6 if num_objects is None else num_objects, 0, 60),
            objective_style=style,
            recipe_size=None,
            cooking_skills=None,
        )
    for name, value in (("num_objects", num_objects), ("objective_style", objective_style)):
        if value is not None:
            raise ValueError(f"{name} applies to game_kind 'quest' only (cooking games place their own objects "
                             "and state a fixed objective); remove it")
    rooms = check_int("world_size", 1 if world_size is None else world_size, 1)
    if rooms not in COOKING_WORLD_SIZES:
        raise ValueError(f"world_size of a cooking game must be one of {COOKING_WORLD_SIZES}, got {rooms!r}")
    skills = COOKING_SKILLS if cooking_skills is None else cooking_skills
    if isinstance(skills, str) or not all(s in COOKING_SKILLS for s in skills):
        raise ValueError(f"cooking_skills must be a list drawn from {list(COOKING_SKILLS)}, got {skills!r}")
    return GameSpec(
        kind="cooking",
        quest_length=quest_length,
        world_size=rooms,
        num_objects=None,
        objective_style=None,
        recipe_size=check_int("recipe_size", 1 if recipe_size is None else recipe_size, 1, 5),
        cooking_skills=tuple(s for s in COOKING_SKILLS if s in skills),
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDAR_CACHE", Path.home() / ".cache" / "sdar")) / "textworld"


@lru_cache(maxsize=1)
def _inform7_compiler() -> Path:
    from textworld.generator.inform7.world2inform7 import I7_DEFAULT_PATH

    return Path(os.environ.get("INFORM_HOME", I7_DEFAULT_PATH)) / "share" / "inform7" / "Compilers" / "ni"


class TextWorldEnv(Environment):
    """Seeded TextWorld games, compiled on first use and cached on disk.

    Task ids are "train-00017" / "test-00003". Rewards: WIN_REWARD on the winning step, 0 otherwise.
    The episode ends when the game is won or lost. An action that is not admissible is not sent to the
    game and answers "Nothing happens." (the rollout already counts it as invalid).

    Default episode length: max(30, 4 * expected plan length), the expected plan being quest_length
    for quests and 4 * recipe_size + world_size + 2 for cooking (a generous budget: the expert needs
    at most about a quarter of it).
    """

    max_turns: int = 30
    rollout_defaults: ClassVar[dict[str, Any]] = dict(TEXT_GAME_ROLLOUT_DEFAULTS)
    skill_bank: ClassVar[str | None] = "textworld"

    def __init__(self, game_kind: str = "quest", quest_length: int = 5, world_size: int | None = None,
                 num_objects: int | None = None, objective_style: str | None = None, recipe_size: int | None = None,
                 cooking_skills: list[str] | None = None, num_train_tasks: int = 1000, num_test_tasks: int = 100,
                 seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.spec = _game_spec(game_kind, quest_length, world_size, num_objects, objective_style, recipe_size,
                               cooking_skills)
        self.num_tasks = {
            "train": check_int("num_train_tasks", num_train_tasks, 1),
            "test": check_int("num_test_tasks", num_test_tasks, 0),
        }
        self.seed = check_int("seed", seed, -(2**63))
        expected_plan = (self.spec.quest_length if self.spec.kind == "quest"
                         else 4 * (self.spec.recipe_size or 1) + self.spec.world_size + 2)
        self.max_turns = max(30, 4 * expected_plan)
        require_module("textworld", "textworld", "The TextWorld environment")
        compiler = _inform7_compiler()
        if not compiler.is_file():
            raise EnvironmentConfigError(
                f"The Inform 7 compiler TextWorld needs is missing ({compiler}). Reinstall TextWorld with its "
                "compilers: pip install --force-reinstall textworld==1.7.0 (Linux or macOS), or point INFORM_HOME "
                "at an Inform 7 installation."
            )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EnvironmentConfigError(
                f"cannot create the TextWorld game cache {self.cache_dir} ({err}). Set env.kwargs.cache_dir to a "
                "writable folder, or SDAR_CACHE (games go to $SDAR_CACHE/textworld)."
            ) from None
        if not os.access(self.cache_dir, os.W_OK | os.X_OK):
            raise EnvironmentConfigError(
                f"the TextWorld game cache {self.cache_dir} is not writable. Set env.kwargs.cache_dir to a writable "
                "folder, or SDAR_CACHE (games go to $SDAR_CACHE/textworld)."
            )
        self._game = None  # the textworld environment of the current episode
        self._game_path: Path | None = None
        self._objective = ""
        self._walkthrough: list[str] = []
        self._admissible: dict[str, str] = {}  # lower-cased command -> TextWorld's spelling
        self._privileged = ""
        self._done = False

    # -- task ids --------------------------------------------------------------------------

    def task_ids(self, split: str) -> list[str]:
        return numbered_task_ids(split, self.num_tasks)

    def _parse_task_id(self, task_id: str) -> tuple[str, int]:
        return parse_numbered_task_id(task_id, self.num_tasks)

    def game_path(self, task_id: str) -> Path:
        """The compiled game file of a task (generated and compiled now if the cache lacks it)."""
        split, index = self._parse_task_id(task_id)
        return compiled_game(self.spec, split, task_seed(self.seed, split, index), self.cache_dir)

    # -- episodes --------------------------------------------------------------------------

    def reset(self, task_id: str) -> tuple[Task, Observation]:
        import textworld

        path = self.game_path(task_id)
        with _TEXTWORLD_LOCK:
            if self._game is None or self._game_path != path:
                self.close()
                infos = textworld.EnvInfos(admissible_commands=True, policy_commands=True, won=True, lost=True,
                                           score=True, max_score=True, objective=True, extras=["walkthrough"])
                self._game, self._game_path = textworld.start(str(path), request_infos=infos), path
            state = self._game.reset()
        self._objective = " ".join(str(state["objective"]).split())
        self._walkthrough = list(state["extra.walkthrough"] or [])
        self._done = False
        task = Task(task_id=task_id, task_type=self.spec.kind, description=self._objective)
        return task, self._observe(state, clean_feedback(state.feedback, str(state["objective"])))

    def step(self, action: str) -> Observation:
        """Send one admissible command (case and spacing are forgiven) to the game."""
        if self._game is None:
            raise RuntimeError("call reset(task_id) before step()")
        command = self._admissible.get(" ".join(str(action).lower().split()))
        if command is None:
            return Observation(text=NOTHING_HAPPENS, admissible_actions=sorted(self._admissible.values()),
                               done=self._done, privileged=self._privileged)
        with _TEXTWORLD_LOCK:
            state, _, _ = self._game.step(command)
        won = bool(state["won"])
        self._done = won or bool(state["lost"])
        return self._observe(state, clean_feedback(state.feedback), reward=WIN_REWARD if won else 0.0)

    def expert_action(self) -> str | None:
        """The first command of TextWorld's plan from the current state (None once the game is over)."""
        plan = getattr(self, "_plan", [])
        return plan[0] if plan else None

    def walkthrough(self) -> list[str]:
        """TextWorld's walkthrough of the current game: commands that win it from the start."""
        return list(self._walkthrough)

    def close(self) -> None:
        if self._game is not None:
            with _TEXTWORLD_LOCK:
                self._game.close()
        self._game, self._game_path = None, None

    def _observe(self, state: Any, text: str, reward: float = 0.0) -> Observation:
        won = bool(state["won"])
        commands = [] if self._done else list(state["admissible_commands"] or [])
        self._admissible = {" ".join(c.lower().split()): c for c in commands}
        plan = [] if self._done else list(state["policy_commands"] or [])
        self._plan = plan
        self._privileged = _privileged_text(plan, won)
        return Observation(text=text, admissible_actions=sorted(commands), reward=reward, done=self._done, won=won,
                           privileged=self._privileged)
