"""Offline ALFWorld task generator: ALFWorld-format games of all six task types, no download.

`alfworld-download` needs github.com. This module writes games in exactly the layout it
produces, so the ALFWorld environment plays them through its real-data code path:

    <root>/json_2.1.1/<split>/<task>/<trial>/traj_data.json   task_type, pddl_params, scene, ...
    <root>/json_2.1.1/<split>/<task>/<trial>/game.tw-pddl     {pddl_domain, grammar, pddl_problem, solvable}

Each game is built from what the alfworld wheel ships: the ALFRED floor plans
(alfworld/gen/layouts: the receptacles of a real AI2-THOR scene with their ids and standing
points), ALFRED's object catalogue (alfworld.gen.constants: which receptacle holds which object,
what can be cleaned, heated, cooled), the goal PDDL and goal sentences
(alfworld.gen.goal_library.gdict), and the PDDL domain and text grammar (alfworld/data). Object
ids follow ALFRED's (`Mug|+00.52|+00.91|-01.37`, sinks `Sink|...|SinkBasin`, mangled to
`Mug_bar__plus_00_dot_52...` as in ALFRED's PDDL), so the engine names them "mug 1",
"sinkbasin 1" as in the real games. Goal objects never start where they would already satisfy
the goal, and every station the goal needs is present: each game is solvable by construction
(the tests replay the expert plan of every task type).

Task `index` of a split is a pure function of (seed, split, index): its random stream is seeded
by a SHA-256 of those values and every catalogue set is sorted before drawing from it, so
asking for more tasks keeps the first ones and the files are byte-identical on any machine
(for a given alfworld version). valid_unseen games use ALFRED's held-out floor plans
(10, 219, 308, 424); train and valid_seen use the others.

    spec = GenerateSpec.from_kwargs({"seed": 0, "train": 200, "valid_seen": 20, "valid_unseen": 20})
    root = generate_dataset(spec, cache_dir)      # <cache_dir>/generated-v1-seed0-200-20-20
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.resources import files
from pathlib import Path

from ..atomic import staged_dir

#: bump when generated files change, so a cache written by an older generator is not reused
GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "valid_seen", "valid_unseen")
#: the six ALFWorld task types, in ALFWorld's order (alfworld.agents.environment.alfred_tw_env.TASK_TYPES)
ALFRED_TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
#: ALFRED's valid_unseen scenes: one kitchen, living room, bedroom and bathroom never used in training
UNSEEN_FLOOR_PLANS: frozenset[int] = frozenset({10, 219, 308, 424})
#: task type -> (station receptacle kind, alfworld.gen.constants.VAL_ACTION_OBJECTS key)
STATIONS: dict[str, tuple[str, str]] = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
#: the light of look_at_obj_in_light tasks and the receptacle kinds it stands on
TOGGLE = "DeskLamp"
LAMP_HOLDERS: tuple[str, ...] = ("Desk", "Dresser", "SideTable")
#: receptacle kinds a floor plan lists without a standing point get this many instances (default 1)
EXTRA_INSTANCES = {"StoveBurner": 4}
DISTRACTORS = (6, 12)  # inclusive range of objects besides the goal objects
#: receptacle kinds the planner's domain names by type: always declared in the problem
_DOMAIN_TYPES = ("SinkBasinType - rtype", "MicrowaveType - rtype", "FridgeType - rtype",
                 "KnifeType - otype", "ButterKnifeType - otype")


def stable_int(*parts: object) -> int:
    """A process-independent 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


@dataclass(frozen=True)
class GenerateSpec:
    """What to generate: a seed and the number of tasks of each split."""

    seed: int
    counts: tuple[tuple[str, int], ...]  # ((split, n), ...) in SPLITS order

    @classmethod
    def from_kwargs(cls, generate: object) -> GenerateSpec:
        """Validate the env's `generate` kwarg {seed, train, valid_seen, valid_unseen}; ValueError/TypeError if wrong."""
        if not isinstance(generate, Mapping):
            raise TypeError("generate must be a mapping like {seed: 0, train: 200, valid_seen: 20, valid_unseen: 20}, "
                             f"got {generate!r}")
        unknown = sorted(set(generate) - {"seed", *SPLITS})
        if unknown:
            raise ValueError(f"generate has unknown key(s) {unknown}; allowed: seed, {', '.join(SPLITS)}")
        values = {"seed": 0, "train": 200, "valid_seen": 20, "valid_unseen": 20, **generate}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or (key != "seed" and value < 0):
                kind = "an integer" if key == "seed" else "a non-negative integer"
                raise ValueError(f"generate.{key} must be {kind}, got {value!r}")
        return cls(values["seed"], tuple((split, values[split]) for split in SPLITS))

    def folder_name(self) -> str:
        return f"generated-v{GENERATOR_VERSION}-seed{self.seed}-" + "-".join(str(n) for _, n in self.counts)


# --------------------------------------------------------------------------------------------
# The catalogue: ALFRED scenes and object rules, read once from the alfworld wheel.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receptacle:
    alfred_id: str  # "Cabinet|+00.68|+00.50|-02.20"; sinks "Sink|-01.90|+00.97|-01.50|SinkBasin"
    kind: str  # "Cabinet", "SinkBasin"
    location: str  # ALFRED standing point "loc|0|-5|2|30"


@dataclass(frozen=True)
class Scene:
    floor_plan: int
    scene_type: str  # Kitchen, LivingRoom, Bedroom, Bathroom
    receptacles: tuple[Receptacle, ...]
    object_kinds: tuple[str, ...]  # pickupable kinds the floor plan holds, sorted
    has_lamp: bool

    @property
    def receptacle_kinds(self) -> frozenset[str]:
        return frozenset(r.kind for r in self.receptacles)


@dataclass(frozen=True)
class Catalogue:
    domain: str  # alfred.pddl
    grammar: str  # alfred.twl2, with "UNKNOWN GOAL" where the task sentence goes
    goals: dict  # alfworld.gen.goal_library.gdict: task type -> {pddl, templates}
    can_contain: dict  # receptacle kind -> frozenset of object kinds
    abilities: dict  # Cleanable/Heatable/Coolable/Sliceable -> frozenset of object kinds
    openable: frozenset
    holds_objects: frozenset  # object kinds that are themselves containers (bowl, mug, ...)
    scenes: tuple[Scene, ...]


def _location_id(x: float, z: float, rotation: int, horizon: int) -> str:
    """ALFRED's standing-point id: grid x and z (0.25 m cells), rotation / 90, camera horizon."""
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{rotation // 90 % 4}|{horizon}"


def _position_id(kind: str, rng: random.Random) -> str:
    """An ALFRED id: the kind and a 3D position, e.g. "Mug|+00.52|+00.91|-01.37". Basins are named
    after their fixture, "Sink|...|SinkBasin", as alfworld's demangler expects (else "sinkbasinbasin")."""
    x, y, z = rng.uniform(-4, 4), rng.uniform(0, 2), rng.uniform(-4, 4)
    if kind.endswith("Basin"):
        return f"{kind[:-len('Basin')]}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}|{kind}"
    return f"{kind}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"


def _scene(number: int, scene_type: str, listed: set[str], points: dict, can_contain: dict, pickupable: frozenset) -> Scene:
    """The receptacles of a floor plan: those with a standing point keep ALFRED's id and point;
    listed kinds without one get a seeded id and a free point. Every receptacle has its own point."""
    rng = random.Random(stable_int("alfworld-scene", number))
    receptacles: list[Receptacle] = []
    used: set[str] = set()

    def free_location(x: float, z: float, rotation: int, horizon: int) -> str:
        location = _location_id(x, z, rotation, horizon)
        while location in used:  # two receptacles sharing a point would share one "go to"
            horizon += 15
            location = _location_id(x, z, rotation, horizon)
        used.add(location)
        return location

    for alfred_id, (x, z, rotation, horizon) in sorted(points.items()):
        parts = alfred_id.split("|")
        kind = parts[0] + "Basin" if len(parts) == 5 else parts[0]  # Sink|..|SinkBasin, Bathtub|..|BathtubBasin
        if kind not in can_contain:
            continue
        if len(parts) == 5:  # one layout calls a bathtub "...|SinkBasin": keep the id's suffix and the kind equal
            alfred_id = "|".join(parts[:4] + [kind])
        receptacles.append(Receptacle(alfred_id, kind, free_location(x, z, int(rotation), int(horizon))))
    with_points = {r.kind for r in receptacles}
    for kind in sorted((listed & set(can_contain)) - with_points):
        for _ in range(EXTRA_INSTANCES.get(kind, 1)):
            location = free_location(rng.uniform(-3, 3), rng.uniform(-3, 3), rng.choice((0, 90, 180, 270)), 30)
            receptacles.append(Receptacle(_position_id(kind, rng), kind, location))
    # only objects some receptacle of this scene can hold
    holdable = {kind for kind in listed & pickupable if any(kind in can_contain[r.kind] for r in receptacles)}
    return Scene(number, scene_type, tuple(receptacles), tuple(sorted(holdable)), TOGGLE in listed)


@lru_cache(maxsize=1)
def catalogue() -> Catalogue:
    from alfworld.gen import constants
    from alfworld.gen.goal_library import gdict

    holds_objects = frozenset(constants.MOVABLE_RECEPTACLES)
    can_contain = {kind: frozenset(k for k in held if not k.endswith("Sliced"))
                   for kind, held in constants.VAL_RECEPTACLE_OBJECTS.items() if kind not in holds_objects}
    pickupable = frozenset().union(*can_contain.values())
    layouts = files("alfworld") / "gen" / "layouts"
    scenes = []
    for scene_type in sorted(constants.SCENE_TYPE):
        for number in constants.SCENE_TYPE[scene_type]:
            listed_file = layouts / f"FloorPlan{number}-objects.json"
            points_file = layouts / f"FloorPlan{number}-openable.json"
            if listed_file.is_file() and points_file.is_file():
                listed = set(json.loads(listed_file.read_text()))
                points = json.loads(points_file.read_text())
                scenes.append(_scene(number, scene_type, listed, points, can_contain, pickupable))
    return Catalogue(
        domain=(files("alfworld") / "data" / "alfred.pddl").read_text(),
        grammar=(files("alfworld") / "data" / "alfred.twl2").read_text(),
        goals=gdict,
        can_contain=can_contain,
        abilities={name: frozenset(kinds) for name, kinds in constants.VAL_ACTION_OBJECTS.items()},
        openable=frozenset(constants.OPENABLE_CLASS_LIST),
        holds_objects=holds_objects,
        scenes=tuple(scenes),
    )


# --------------------------------------------------------------------------------------------
# One task: a goal that fits a scene, objects placed in it, and the files ALFWorld reads.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    task_type: str  # ALFRED name, e.g. "pick_heat_then_place_in_recep"
    obj: str  # object kind, e.g. "Mug"
    recep: str  # receptacle kind ("" for look_at_obj_in_light)
    toggle: str  # "DeskLamp" for look_at_obj_in_light, else ""

    def start_kinds(self, cat: Catalogue, scene: Scene) -> list[str]:
        """Receptacle kinds a goal object may start in: any that holds it, except the target and the station."""
        excluded = {self.recep, STATIONS.get(self.task_type, ("",))[0]}
        return sorted(k for k in scene.receptacle_kinds if self.obj in cat.can_contain[k] and k not in excluded)


def _goals(cat: Catalogue, scene: Scene, task_type: str) -> list[Goal]:
    """Every goal of `task_type` this scene can host (object kind present, target and station present)."""
    kinds = scene.receptacle_kinds
    goals = []
    for obj in scene.object_kinds:
        if task_type == "look_at_obj_in_light":
            if scene.has_lamp and kinds.intersection(LAMP_HOLDERS):
                goals.append(Goal(task_type, obj, "", TOGGLE))
            continue
        station, ability = STATIONS.get(task_type, ("", ""))
        if station and (station not in kinds or obj not in cat.abilities[ability]):
            continue
        for recep in sorted(kinds - {station}):
            if obj in cat.can_contain[recep]:
                goals.append(Goal(task_type, obj, recep, ""))
    return [g for g in goals if g.start_kinds(cat, scene)]


@cache
def _scenes_for(split: str, task_type: str) -> tuple[tuple[Scene, tuple[Goal, ...]], ...]:
    from alfworld.gen import constants

    cat = catalogue()
    unseen = split == "valid_unseen"
    valid_types = constants.GOALS_VALID[task_type]
    found = []
    for scene in cat.scenes:
        if (scene.floor_plan in UNSEEN_FLOOR_PLANS) == unseen and scene.scene_type in valid_types:
            goals = _goals(cat, scene, task_type)
            if goals:
                found.append((scene, tuple(goals)))
    return tuple(found)


def _mangle(text: str) -> str:
    """ALFRED's PDDL spelling of ids (PlannedGameState.fix_pddl_str_chars)."""
    table = {"-": "_minus_", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
    return re.sub(r"[-|+.,]", lambda m: table[m.group()], text)


@dataclass(frozen=True)
class GeneratedTask:
    folder: str  # "<task>/<trial>" inside the split folder
    traj_data: dict
    game: dict


def generate_task(seed: int, split: str, index: int) -> GeneratedTask:
    """Task `index` of `split`: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    cat = catalogue()
    rng = random.Random(stable_int("alfworld-task", GENERATOR_VERSION, seed, split, index))
    task_type = ALFRED_TASK_TYPES[index % len(ALFRED_TASK_TYPES)]  # round robin: every type in every split
    scene, goals = rng.choice(_scenes_for(split, task_type))
    goal = rng.choice(goals)

    ids: set[str] = set()
    placed: list[tuple[str, str, str]] = []  # (alfred id, kind, receptacle alfred id)

    def place(kind: str, holders: list[Receptacle]) -> None:
        alfred_id = _position_id(kind, rng)
        while alfred_id in ids:
            alfred_id = _position_id(kind, rng)
        ids.add(alfred_id)
        placed.append((alfred_id, kind, rng.choice(holders).alfred_id))

    start_kinds = goal.start_kinds(cat, scene)
    starts = [r for r in scene.receptacles if r.kind in start_kinds]
    low = 2 if task_type == "pick_two_obj_and_place" else 1
    for _ in range(rng.randint(low, low + 2)):
        place(goal.obj, starts)
    others = [k for k in scene.object_kinds if k != goal.obj]
    for _ in range(rng.randint(*DISTRACTORS)):
        kind = rng.choice(others)
        place(kind, [r for r in scene.receptacles if kind in cat.can_contain[r.kind]])
    if goal.toggle:
        place(goal.toggle, [r for r in scene.receptacles if r.kind in LAMP_HOLDERS])

    sentence = rng.choice(cat.goals[task_type]["templates"]).format(
        obj=goal.obj.lower(), recep=goal.recep.lower(), toggle=goal.toggle.lower(), mrecep="")
    trial = f"trial_G{index:05d}"
    problem = _problem(cat, scene, goal, placed, rng, f"{split}_{trial}")
    traj_data = {
        "task_id": trial,
        "task_type": task_type,
        "pddl_params": {"object_target": goal.obj, "parent_target": goal.recep, "toggle_target": goal.toggle,
                        "mrecep_target": "", "object_sliced": False},
        "scene": {"floor_plan": f"FloorPlan{scene.floor_plan}", "scene_num": scene.floor_plan},
        "turk_annotations": {"anns": [{"task_desc": sentence[0].upper() + sentence[1:] + ".", "high_descs": []}]},
        "sdar_generated": {"generator_version": GENERATOR_VERSION, "seed": seed, "split": split, "index": index},
    }
    game = {
        "pddl_domain": cat.domain,
        "grammar": cat.grammar.replace("UNKNOWN GOAL", sentence),  # alfworld's add_task_to_grammar
        "pddl_problem": problem,
        "solvable": True,
    }
    task_folder = f"{task_type}-{goal.obj}-None-{goal.recep or goal.toggle}-{scene.floor_plan}"
    return GeneratedTask(f"{task_folder}/{trial}", traj_data, game)


def _problem(cat: Catalogue, scene: Scene, goal: Goal, placed: list[tuple[str, str, str]],
             rng: random.Random, name: str) -> str:
    """The PDDL problem in ALFRED's vocabulary: objects, receptacles, standing points, facts, goal."""
    recep_location = {r.alfred_id: r.location for r in scene.receptacles}
    start = _location_id(rng.uniform(-3, 3), rng.uniform(-3, 3), rng.choice((0, 90, 180, 270)), 30)
    while start in recep_location.values():  # the agent starts in the middle of the room
        start = _location_id(rng.uniform(-3, 3), rng.uniform(-3, 3), rng.choice((0, 90, 180, 270)), 30)
    object_kinds = sorted({kind for _, kind, _ in placed})
    receptacle_kinds = sorted(scene.receptacle_kinds)
    declared = sorted({f"{k}Type - otype" for k in object_kinds} | {f"{k}Type - rtype" for k in receptacle_kinds}
                      | set(_DOMAIN_TYPES))
    objects = ["agent1 - agent", *declared]
    objects += [f"{_mangle(i)} - object" for i, _, _ in sorted(placed)]
    objects += [f"{_mangle(r.alfred_id)} - receptacle" for r in sorted(scene.receptacles, key=lambda r: r.alfred_id)]
    objects += [f"{_mangle(loc)} - location" for loc in sorted({*recep_location.values(), start})]

    init = [f"(atLocation agent1 {_mangle(start)})"]
    for r in sorted(scene.receptacles, key=lambda r: r.alfred_id):
        rid = _mangle(r.alfred_id)
        init += [f"(receptacleType {rid} {r.kind}Type)", f"(receptacleAtLocation {rid} {_mangle(r.location)})"]
        if r.kind in cat.openable:
            init.append(f"(openable {rid})")
    for alfred_id, kind, holder in sorted(placed):
        oid = _mangle(alfred_id)
        init += [f"(objectType {oid} {kind}Type)", f"(inReceptacle {oid} {_mangle(holder)})",
                 f"(objectAtLocation {oid} {_mangle(recep_location[holder])})"]
        if kind == TOGGLE:
            init.append(f"(toggleable {oid})")
            continue
        init.append(f"(pickupable {oid})")
        for ability, fact in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                              ("Sliceable", "sliceable")):
            if kind in cat.abilities[ability]:
                init.append(f"({fact} {oid})")
        if kind in cat.holds_objects:
            init.append(f"(isReceptacleObject {oid})")
    init += [f"(canContain {r}Type {o}Type)" for r in receptacle_kinds for o in object_kinds
             if o in cat.can_contain[r]]

    goal_pddl = cat.goals[goal.task_type]["pddl"].format(obj=goal.obj, recep=goal.recep, toggle=goal.toggle, mrecep="")
    goal_pddl = "\n".join(line.strip() for line in goal_pddl.replace("#", "-").strip().splitlines())
    return (f"(define (problem {name})\n(:domain alfred)\n(:objects\n" + "\n".join(objects) + "\n)\n(:init\n"
            + "\n".join(init) + "\n)\n" + goal_pddl + "\n")


# --------------------------------------------------------------------------------------------
# Writing a dataset: once per spec, atomically (temp folder + rename), safe across threads and processes.
# --------------------------------------------------------------------------------------------

_WRITE_LOCK = threading.Lock()


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data) + "\n", encoding="utf-8")


def generate_dataset(spec: GenerateSpec, cache_dir: Path) -> Path:
    """The folder holding json_2.1.1/ for `spec`, written on the first call (for any process).

    Every split folder exists even when its count is 0. Another thread or process writing the
    same spec at the same time is harmless: each writes a private temp folder and the first
    rename wins (the files are identical).
    """
    root = Path(cache_dir) / spec.folder_name()
    if (root / "json_2.1.1").is_dir():
        return root
    with _WRITE_LOCK:
        if (root / "json_2.1.1").is_dir():
            return root
        # done: a lost race (the files are identical); any other failed rename is a real error
        with staged_dir(root, done=lambda folder: (folder / "json_2.1.1").is_dir()) as temp:
            for split, count in spec.counts:
                split_dir = temp / "json_2.1.1" / split
                split_dir.mkdir(parents=True)
                for index in range(count):
                    task = generate_task(spec.seed, split, index)
                    trial_dir = split_dir / task.folder
                    trial_dir.mkdir(parents=True)
                    _dump(trial_dir / "traj_data.json", task.traj_data)
                    _dump(trial_dir / "game.tw-pddl", task.game)
            _dump(temp / "sdar_generate.json", {"generator_version": GENERATOR_VERSION, "seed": spec.seed,
                                                "counts": dict(spec.counts)})
    return root
