"""ALFWorldEnv: ALFWorld's text household games (the paper's main benchmark), real or generated.

Each game is a room of receptacles (cabinet 1, fridge 1, sinkbasin 1, ...) holding objects, and
a goal of one of six types. The agent acts with ALFWorld's commands:

    go to <recep>     open/close <recep>    take <obj> from <recep>    move <obj> to <recep>
    clean/heat/cool <obj> with <sinkbasin/microwave/fridge>    use <lamp>    examine <x>
    inventory         look

The engine is alfworld's text path (textworld's PDDL environment with alfworld's name
demangler). Rewards: 10 on the step that wins (10 * won, given once), 0 otherwise; episodes end
on a win or at max_turns (50, as in the paper). Admissible commands are the engine's, without
"help" (as in verl-agent). Task.description is the "Your task is to: ..." sentence; the first
observation is the room description.

Data: either real games, as `alfworld-download` lays them out,

    $ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/{traj_data.json,game.tw-pddl}

or games generated offline (alfworld_gen.py) in the same layout and played by the same code.
Task ids are "<split>/<task>/<trial>", e.g. "train/pick_and_place_simple-Mug-None-Desk-302/trial_T2019...".

Privileged context (teacher only): the expert's plan from the current state. expert="fast" (the
default) plans with sdar's exact planner for the six goal forms below, in milliseconds, from the
engine's PDDL facts; expert="planner" asks alfworld's planner expert (fast-downward, what
AlfredExpert(PLANNER) returns), which takes seconds, and minutes on pick-two tasks in large
scenes; expert="none" gives no plan.

Concurrency: textworld's PDDL engine keeps parsers and translator settings in module globals,
so every engine call of every ALFWorldEnv in a process runs under one lock (the fast-downward
searches of expert="planner" run outside it). Fast-downward libraries are pooled and reused,
and parsed game logic and PDDL translations are cached, so a group of episodes of one game pays
for its parsing once.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from ..prompts import DEFAULT_PROMPT_TEMPLATE
from .alfworld_gen import ALFRED_TASK_TYPES, SPLITS, GenerateSpec, generate_dataset
from .base import TEXT_GAME_ROLLOUT_DEFAULTS, Environment, EnvironmentConfigError, Observation, Task, require_module

#: ALFWorld task type (the prefix of a game's task folder) -> Task.task_type (names the skill file)
TASK_TYPES: dict[str, str] = dict(zip(ALFRED_TASK_TYPES, (
    "pick_and_place",
    "look_at_obj_in_light",
    "pick_clean_then_place",
    "pick_heat_then_place",
    "pick_cool_then_place",
    "pick_two_obj",
)))
WIN_REWARD = 10.0
DATA_FOLDER = "json_2.1.1"
EXPERTS = ("fast", "planner", "none")
#: commands that only read the world: the plan from before them still holds
_OBSERVING = re.compile(r"(look|inventory|help|examine .+)")

#: the paper's ALFWorld turn prompt (verl-agent's ALFWORLD_TEMPLATE; {task} is "Your task is to: ..."): the
#: default turn prompt, naming the ALFRED environment and keeping the task on the first line
PROMPT_TEMPLATE = DEFAULT_PROMPT_TEMPLATE.replace(
    "operating in a text-based environment.\n{task}", "operating in the ALFRED Embodied Environment. {task}"
)


def default_cache_dir() -> Path:
    """Where generated games go unless env.kwargs.cache_dir says otherwise."""
    return Path(os.environ.get("SDAR_CACHE") or Path.home() / ".cache" / "sdar") / "alfworld"


def _missing_data(why: str) -> EnvironmentConfigError:
    return EnvironmentConfigError(
        f"ALFWorld data not found: {why}. The alfworld environment reads the games `alfworld-download` writes: "
        f"$ALFWORLD_DATA/{DATA_FOLDER}/{{train,valid_seen,valid_unseen}}/<task>/<trial>/{{traj_data.json,game.tw-pddl}}. "
        "On a machine with internet access run `pip install alfworld==0.4.2 && ALFWORLD_DATA=~/alfworld-data "
        "alfworld-download`, then set the ALFWORLD_DATA environment variable (or env.kwargs.data_path) to that folder. "
        "To train without a download, use generated games instead: env.kwargs.generate = "
        "{seed: 0, train: 200, valid_seen: 20, valid_unseen: 20}."
    )


def _data_root(data_path: str | os.PathLike | None) -> Path:
    """The folder holding json_2.1.1/ (data_path may also name json_2.1.1 itself)."""
    if data_path is not None:
        source, path = "env.kwargs.data_path", Path(data_path).expanduser()
    elif os.environ.get("ALFWORLD_DATA"):
        source, path = "$ALFWORLD_DATA", Path(os.environ["ALFWORLD_DATA"]).expanduser()
    else:
        source, path = "alfworld's default folder (ALFWORLD_DATA is not set)", Path.home() / ".cache" / "alfworld"
    if (path / DATA_FOLDER).is_dir():
        return path
    if path.name == DATA_FOLDER and path.is_dir():
        return path.parent
    if not path.exists():
        raise _missing_data(f"{source} = {path} does not exist")
    raise _missing_data(f"{source} = {path} holds no {DATA_FOLDER}/ folder")


# --------------------------------------------------------------------------------------------
# The game index: the playable games of a split, scanned once per process.
# --------------------------------------------------------------------------------------------

_INDEX: dict[tuple[Path, str], tuple[str, ...]] = {}
_INDEX_LOCK = threading.Lock()


def _solvable(game_file: Path) -> bool:
    try:
        return json.loads(game_file.read_text(encoding="utf-8")).get("solvable") is True
    except (OSError, ValueError):
        return False


def _scan_split(root: Path, split: str) -> tuple[str, ...]:
    """Sorted ids of the games alfworld would play: a known task type, traj_data.json present,
    not a movable-receptacle or sliced variant, and marked solvable."""
    split_dir = root / DATA_FOLDER / split
    if not split_dir.is_dir():
        raise _missing_data(f"the split folder {split_dir} does not exist")
    ids = []
    for game_file in sorted(split_dir.glob("*/*/game.tw-pddl")):
        trial_dir = game_file.parent
        task_folder = trial_dir.parent.name
        if task_folder.split("-", 1)[0] not in TASK_TYPES or "movable" in task_folder or "Sliced" in task_folder:
            continue
        if (trial_dir / "traj_data.json").is_file() and _solvable(game_file):
            ids.append(f"{split}/{task_folder}/{trial_dir.name}")
    return tuple(ids)


def _split_index(root: Path, split: str) -> tuple[str, ...]:
    key = (root, split)
    with _INDEX_LOCK:
        if key not in _INDEX:
            _INDEX[key] = _scan_split(root, split)
        return _INDEX[key]


# --------------------------------------------------------------------------------------------
# The engine: textworld's PddlEnv behind one process-wide lock, with pooled libraries and caches.
# --------------------------------------------------------------------------------------------

_ENGINE_LOCK = threading.Lock()
_IDLE_LIBRARIES: list[Any] = []  # loaded fast-downward libraries no episode holds
_LIBRARY_LOCK = threading.Lock()


def _acquire_library() -> Any:
    import fast_downward

    with _LIBRARY_LOCK:
        if _IDLE_LIBRARIES:
            return _IDLE_LIBRARIES.pop()
    # each PddlEnv needs its own copy of libdownward.so (it keeps the search state in globals)
    return fast_downward.load_lib()


def _release_library(library: Any) -> None:
    with _LIBRARY_LOCK:
        _IDLE_LIBRARIES.append(library)


@lru_cache(maxsize=32)
def _game_logic(domain: str, grammar: str) -> Any:
    from textworld.envs.pddl import logic as pddl_logic

    return pddl_logic.GameLogic(domain=domain, grammar=grammar)


@lru_cache(maxsize=1)
def _engine_patches() -> tuple[tuple[Any, str, Any, Any], ...]:
    """(owner, attribute, textworld's value, cached value): swapped in while the engine lock is held.

    textworld re-parses the same grammar strings and logic queries with TatSu on every step (most
    of its step time) and re-translates a game's PDDL on every load and reset; each is done once
    here. Parsed symbols are deep-copied because textworld sets their context; translated tasks
    and queries are only read. Call with the engine lock held (nothing is swapped in then).
    """
    import fast_downward
    from fast_downward.interface import pddl2sas
    from textworld.envs.pddl import textgen
    from textworld.logic import Rule

    parse_symbols, parse_query = textgen._parse_and_convert, Rule.parse_conjunctive_query

    @lru_cache(maxsize=32)
    def translate(domain: str, problem: str, verbose: bool, optimize: bool) -> Any:
        return pddl2sas(domain, problem, verbose=verbose, optimize=optimize)

    def cached_pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        return translate(domain, problem, verbose, optimize)

    @lru_cache(maxsize=4096)
    def symbols(text: str, rule_name: str, trace: bool) -> Any:
        return parse_symbols(text, rule_name=rule_name, trace=trace)

    def cached_symbols(text: str, rule_name: str = "symbols", trace: bool = False) -> Any:
        return copy.deepcopy(symbols(text, rule_name, trace))

    query = lru_cache(maxsize=4096)(parse_query)
    return (
        (fast_downward, "pddl2sas", fast_downward.pddl2sas, cached_pddl2sas),
        (textgen, "_parse_and_convert", parse_symbols, cached_symbols),
        (Rule, "parse_conjunctive_query", Rule.__dict__["parse_conjunctive_query"], classmethod(lambda cls, e: query(e))),
    )


@contextmanager
def _engine_section() -> Iterator[None]:
    """Hold the engine lock with the caches above in place; keep sys.argv (fast-downward overwrites it)."""
    with _ENGINE_LOCK:
        patches = _engine_patches()
        argv = sys.argv
        for owner, name, _, cached in patches:
            setattr(owner, name, cached)
        try:
            yield
        finally:
            for owner, name, original, _ in patches:
                setattr(owner, name, original)
            sys.argv = argv


@lru_cache(maxsize=1)
def _engine_class() -> type:
    import textworld
    from textworld.envs import PddlEnv
    from textworld.envs.pddl import logic as pddl_logic

    class PooledPddlEnv(PddlEnv):
        """textworld's PddlEnv on a pooled fast-downward library, with the game logic shared between episodes."""

        def __init__(self, infos: Any, downward_lib: Any) -> None:
            textworld.Environment.__init__(self, infos)
            self.downward_lib = downward_lib

        def load(self, path: str) -> None:  # PddlEnv.load, with the parsed grammar cached
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            self._game_file, self._game_data = path, data
            self.walkthrough = data.get("walkthrough")
            self._logic = _game_logic(data["pddl_domain"], data["grammar"])
            self._pddl_state = pddl_logic.PddlState(self.downward_lib, data["pddl_problem"], self._logic)
            self._entity_infos = self._get_entity_infos()

    return PooledPddlEnv


class _Engine:
    """One game session: PddlEnv + alfworld's demangler, holding a pooled library until released."""

    def __init__(self) -> None:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import (
            AlfredDemangler,
            AlfredInfos,
        )

        self._library = _acquire_library()
        self._pddl = _engine_class()(textworld.EnvInfos(won=True, admissible_commands=True), self._library)
        self.env = AlfredInfos(AlfredDemangler(self._pddl))
        self.release = weakref.finalize(self, _release_library, self._library)

    def load_and_reset(self, game_file: Path) -> Any:
        with _engine_section():
            self.env.load(str(game_file))
            return self.env.reset()

    def step(self, command: str) -> Any:
        with _engine_section():
            state, _, _ = self.env.step(command)
            return state

    def planner_plan(self) -> list[str]:
        """alfworld's planner expert from the current state (fast-downward; runs outside the engine lock)."""
        return list(self._pddl._pddl_state.replan(self._pddl._entity_infos))


# --------------------------------------------------------------------------------------------
# The fast expert: shortest plans for ALFWorld's six goal forms, from the engine's PDDL facts.
# --------------------------------------------------------------------------------------------

#: task type -> (fact the goal checks, command verb, station receptacle type)
_TREATMENTS = {
    "pick_clean_then_place_in_recep": ("isclean", "clean", "sinkbasintype"),
    "pick_heat_then_place_in_recep": ("ishot", "heat", "microwavetype"),
    "pick_cool_then_place_in_recep": ("iscool", "cool", "fridgetype"),
}


@dataclass(frozen=True)
class _Goal:
    task_type: str  # ALFRED name
    obj: str  # PDDL type of the goal object, e.g. "mugtype"
    recep: str  # PDDL type of the target receptacle ("" for look_at_obj_in_light)
    toggle: str  # PDDL type of the lamp ("" unless look_at_obj_in_light)

    @classmethod
    def from_traj_data(cls, task_type: str, traj_data: dict) -> _Goal:
        params = traj_data.get("pddl_params", {})

        def pddl_type(key: str) -> str:
            value = str(params.get(key) or "")
            return value.lower() + "type" if value else ""

        return cls(task_type, pddl_type("object_target"), pddl_type("parent_target"), pddl_type("toggle_target"))


class _World:
    """The facts of one state, indexed for planning."""

    def __init__(self, facts: Sequence[Any]) -> None:
        self.at = ""
        self.held: str | None = None
        self.where: dict[str, str] = {}  # object -> receptacle it is in
        self.recep_at: dict[str, str] = {}  # receptacle -> location
        self.kind: dict[str, str] = {}  # object or receptacle -> PDDL type
        self.openable: set[str] = set()
        self.opened: set[str] = set()
        self.marked: dict[str, set[str]] = {"isclean": set(), "ishot": set(), "iscool": set(), "istoggled": set()}
        self.can_contain: set[tuple[str, str]] = set()
        for fact in facts:
            args = [variable.name for variable in fact.arguments]
            name = fact.name
            if name == "atlocation":
                self.at = args[1]
            elif name == "holds":
                self.held = args[1]
            elif name == "inreceptacle":
                self.where[args[0]] = args[1]
            elif name == "receptacleatlocation":
                self.recep_at[args[0]] = args[1]
            elif name in ("objecttype", "receptacletype"):
                self.kind[args[0]] = args[1]
            elif name == "openable":
                self.openable.add(args[0])
            elif name == "opened":
                self.opened.add(args[0])
            elif name in self.marked:
                self.marked[name].add(args[0])
            elif name == "cancontain":
                self.can_contain.add((args[0], args[1]))

    def objects_of(self, pddl_type: str) -> list[str]:
        held = [self.held] if self.held and self.kind.get(self.held) == pddl_type else []
        return held + sorted(o for o in self.where if self.kind.get(o) == pddl_type)

    def receptacles_of(self, pddl_type: str) -> list[str]:
        return sorted(r for r in self.recep_at if self.kind.get(r) == pddl_type)


class _Sim:
    """A plan under construction: the actions so far and the state they lead to."""

    __slots__ = ("actions", "at", "held", "marked", "opened", "where", "world")

    def __init__(self, world: _World) -> None:
        self.world, self.at, self.held = world, world.at, world.held
        self.where, self.opened = dict(world.where), set(world.opened)
        self.marked: set[tuple[str, str]] = set()  # (fact, object) made true by the plan
        self.actions: list[tuple[str, ...]] = []

    def copy(self) -> _Sim:
        other = _Sim.__new__(_Sim)
        other.world, other.at, other.held = self.world, self.at, self.held
        other.where, other.opened, other.marked = dict(self.where), set(self.opened), set(self.marked)
        other.actions = list(self.actions)
        return other

    def has(self, fact: str, obj: str) -> bool:
        return obj in self.world.marked[fact] or (fact, obj) in self.marked

    def go(self, recep: str) -> None:
        if self.at != self.world.recep_at[recep]:
            self.actions.append(("go", recep))
            self.at = self.world.recep_at[recep]

    def reach(self, recep: str) -> None:
        self.go(recep)
        if recep in self.world.openable and recep not in self.opened:
            self.actions.append(("open", recep))
            self.opened.add(recep)

    def take(self, obj: str) -> None:
        recep = self.where.pop(obj)
        self.reach(recep)
        self.actions.append(("take", obj, recep))
        self.held = obj

    def put(self, recep: str) -> None:
        self.reach(recep)
        self.actions.append(("move", self.held, recep))
        self.where[self.held] = recep
        self.held = None

    def treat(self, fact: str, verb: str, station: str) -> None:
        self.go(station)
        self.actions.append((verb, self.held, station))
        self.marked.add((fact, self.held))

    def use(self, lamp: str) -> None:
        self.go(self.where[lamp])
        self.actions.append(("use", lamp))
        self.marked.add(("istoggled", lamp))


def _shortest(sims: list[_Sim]) -> _Sim | None:
    return min(sims, key=lambda s: len(s.actions), default=None)


def _free_hands(sim: _Sim, keep: str) -> list[_Sim]:
    """Ways to put down a held object that is not of type `keep` (unchanged when the hands are free
    or hold a `keep`): here when possible, else at the first receptacle that takes it."""
    world = sim.world
    if sim.held is None or world.kind.get(sim.held) == keep:
        return [sim]
    held_type = world.kind.get(sim.held)
    fits = [r for r in sorted(world.recep_at) if (world.kind.get(r), held_type) in world.can_contain]
    here = [r for r in fits if world.recep_at[r] == sim.at]
    options = []
    for recep in here or fits[:1]:
        dropped = sim.copy()
        dropped.put(recep)
        options.append(dropped)
    return options


def _plan_single(start: _Sim, goal: _Goal) -> _Sim | None:
    """pick_and_place and clean/heat/cool then place: one goal object, maybe treated, in a target."""
    world = start.world
    fact, verb, station_type = _TREATMENTS.get(goal.task_type, ("", "", ""))
    stations = world.receptacles_of(station_type) if fact else [""]
    candidates = []
    for sim in _free_hands(start, goal.obj):
        for obj in ([sim.held] if sim.held else world.objects_of(goal.obj)):
            for target in world.receptacles_of(goal.recep):
                for station in stations:
                    plan = sim.copy()
                    if plan.held != obj:
                        plan.take(obj)
                    if fact and not plan.has(fact, obj):
                        plan.treat(fact, verb, station)
                    plan.put(target)
                    candidates.append(plan)
    return _shortest(candidates)


def _plan_two(start: _Sim, goal: _Goal) -> _Sim | None:
    """pick_two_obj_and_place: two goal objects in the same target receptacle."""
    world = start.world
    candidates = []
    for sim in _free_hands(start, goal.obj):
        for target in world.receptacles_of(goal.recep):
            plan = sim.copy()
            if plan.held is not None:
                plan.put(target)
            while sum(1 for o, r in plan.where.items() if r == target and world.kind.get(o) == goal.obj) < 2:
                options = []
                for obj in (o for o in world.objects_of(goal.obj) if plan.where.get(o) not in (None, target)):
                    option = plan.copy()
                    option.take(obj)
                    option.put(target)
                    options.append(option)
                plan = _shortest(options)
                if plan is None:
                    break
            if plan is not None:
                candidates.append(plan)
    return _shortest(candidates)


def _plan_light(start: _Sim, goal: _Goal) -> _Sim | None:
    """look_at_obj_in_light: hold a goal object at a lamp that has been switched on."""
    world = start.world
    candidates = []
    for sim in _free_hands(start, goal.obj):
        for obj in ([sim.held] if sim.held else world.objects_of(goal.obj)):
            for lamp in world.objects_of(goal.toggle):
                plan = sim.copy()
                if plan.held != obj:
                    plan.take(obj)
                plan.go(plan.where[lamp])
                if not plan.has("istoggled", lamp):
                    plan.use(lamp)
                candidates.append(plan)
    return _shortest(candidates)


def fast_expert_plan(facts: Sequence[Any], names: dict[str, str], goal: _Goal) -> list[str]:
    """A shortest command sequence from the state `facts` to the goal ([] when there is none).

    Every command costs one step ("go to" takes one step to any receptacle), so the plan
    minimises over the goal object, the target and station instances and where to put down a
    held object that is in the way; pick-two chooses its objects greedily per target.
    """
    start = _Sim(_World(facts))
    planner = {"pick_two_obj_and_place": _plan_two, "look_at_obj_in_light": _plan_light}.get(goal.task_type, _plan_single)
    plan = planner(start, goal)
    if plan is None:
        return []
    texts = {
        "go": "go to {1}", "open": "open {1}", "take": "take {1} from {2}", "move": "move {1} to {2}",
        "clean": "clean {1} with {2}", "heat": "heat {1} with {2}", "cool": "cool {1} with {2}", "use": "use {1}",
    }
    return [texts[op].format(*[op, *(names[x] for x in args)]) for op, *args in plan.actions]


def _plan_text(plan: Sequence[str]) -> str:
    if not plan:
        return ""
    return "Expert plan from here:\n" + "\n".join(f"{i}. {action}" for i, action in enumerate(plan, 1))


# --------------------------------------------------------------------------------------------
# The environment.
# --------------------------------------------------------------------------------------------


class ALFWorldEnv(Environment):
    """ALFWorld text games of six task types, from alfworld-download's folder or generated offline.

    Splits: train, valid_seen, valid_unseen (the paper evaluates on valid_unseen). Reward 10 on
    the winning step. Construction is cheap after the first: the game index, parsed games and
    generated files are cached per process, keyed by their arguments.
    """

    max_turns: int = 50
    rollout_defaults: ClassVar[dict[str, Any]] = {
        **TEXT_GAME_ROLLOUT_DEFAULTS,
        # official: invalid only by format, and every parsed action is played ("Nothing happens." if inadmissible)
        "invalid_action": "format",
        "prompt_template": PROMPT_TEMPLATE,
    }
    skill_bank: ClassVar[str | None] = "alfworld"

    def __init__(self, data_path: str | None = None, generate: dict | None = None, cache_dir: str | None = None,
                 task_types: Sequence[str] | None = None, expert: str = "fast") -> None:
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {', '.join(EXPERTS)}, got {expert!r}")
        self.expert = expert
        self.task_types = self._check_task_types(task_types)
        if generate is not None:
            if data_path is not None:
                raise ValueError("set either data_path (real ALFWorld games) or generate (offline games), not both")
            spec = GenerateSpec.from_kwargs(generate)
        else:
            root = _data_root(data_path)  # before importing alfworld, which sets ALFWORLD_DATA to its default
        require_module("alfworld.agents.environment.alfred_tw_env", "alfworld", "The ALFWorld environment")
        require_module("fast_downward", "alfworld", "The ALFWorld environment")
        if generate is not None:
            root = generate_dataset(spec, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
        self.root = root
        self.generated = generate is not None
        self._engine: _Engine | None = None
        self._goal: _Goal | None = None
        self._plan: list[str] = []
        self._admissible: list[str] = []
        self._done = self._won = False

    @staticmethod
    def _check_task_types(task_types: Sequence[str] | None) -> frozenset[str]:
        if task_types is None:
            return frozenset(TASK_TYPES.values())
        if isinstance(task_types, str):
            task_types = [task_types]
        unknown = sorted(set(task_types) - set(TASK_TYPES.values()))
        if unknown or not task_types:
            raise ValueError(f"task_types must be a non-empty list of {', '.join(TASK_TYPES.values())}; "
                             f"unknown: {unknown}")
        return frozenset(task_types)

    # -- task ids --------------------------------------------------------------------------

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
        ids = _split_index(self.root, split)
        if not ids and not self.generated:
            raise _missing_data(f"{self.root / DATA_FOLDER / split} holds no playable (solvable) games")
        return [i for i in ids if TASK_TYPES[i.split("/")[1].split("-", 1)[0]] in self.task_types]

    def _trial_dir(self, task_id: str) -> Path:
        split = task_id.split("/", 1)[0] if isinstance(task_id, str) else ""
        if split not in SPLITS or task_id not in self.task_ids(split):
            raise ValueError(f"unknown task id {task_id!r}; ids look like 'train/<task folder>/<trial folder>' "
                             "and come from task_ids(split)")
        return self.root / DATA_FOLDER / task_id

    # -- episodes --------------------------------------------------------------------------

    def reset(self, task_id: str) -> tuple[Task, Observation]:
        trial_dir = self._trial_dir(task_id)
        alfred_type = trial_dir.parent.name.split("-", 1)[0]
        traj_data = json.loads((trial_dir / "traj_data.json").read_text(encoding="utf-8"))
        if self._engine is None:
            self._engine = _Engine()
        state = self._engine.load_and_reset(trial_dir / "game.tw-pddl")
        self._goal = _Goal.from_traj_data(alfred_type, traj_data)
        self._done = self._won = False
        self._plan = []
        intro = state.feedback
        start = intro.find("Your task is to:")
        if start < 0:
            raise ValueError(f"{trial_dir / 'game.tw-pddl'}: the intro has no 'Your task is to:' sentence")
        description = intro[start:].strip()
        room = re.sub(r"^\s*-=.*?=-\s*", "", intro[:start]).strip()
        task = Task(task_id=task_id, task_type=TASK_TYPES[alfred_type], description=description)
        return task, self._observe(state, room, None)

    def step(self, action: str) -> Observation:
        if self._engine is None or self._goal is None:
            raise RuntimeError("call reset(task_id) before step()")
        if self._done:
            return Observation(text="Nothing happens.", done=True, won=self._won)
        command = " ".join(str(action).lower().split())
        state = self._engine.step(command)
        won = bool(state["won"])
        self._done = self._won = won
        return self._observe(state, state.feedback.strip(), command, reward=WIN_REWARD if won else 0.0)

    def expert_plan(self) -> list[str]:
        """The expert's commands from the current state to the goal ([] when there is none)."""
        return list(self._plan)

    def expert_action(self) -> str | None:
        """The expert's next command, for `sdar warmup` (None with expert: none, or once the game is over)."""
        return self._plan[0] if self._plan else None

    def _observe(self, state: Any, text: str, command: str | None, reward: float = 0.0) -> Observation:
        previous = self._admissible
        self._admissible = [c for c in state["admissible_commands"] if c != "help"]
        if self._done:
            self._plan = []
            return Observation(text=text, admissible_actions=[], reward=reward, done=True, won=self._won)
        self._plan = self._next_plan(state, command, previous)
        return Observation(text=text, admissible_actions=list(self._admissible), reward=reward,
                           privileged=_plan_text(self._plan))

    def _next_plan(self, state: Any, command: str | None, previous: list[str]) -> list[str]:
        if self.expert == "none":
            return []
        if self.expert == "fast":
            names = {key: info.name for key, info in state["_entity_infos"].items()}
            return fast_expert_plan(state["_facts"], names, self._goal)
        # the planner is slow: keep its plan while the agent follows it or does not change the world
        if command is not None and self._plan:
            if command == self._plan[0]:
                return self._plan[1:]
            if command not in previous or _OBSERVING.fullmatch(command):
                return self._plan
        return self._engine.planner_plan()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.release()
            self._engine = None
