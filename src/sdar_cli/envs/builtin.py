"""HouseholdEnv: the built-in, pure-Python household task family (a tiny ALFWorld).

A house is a few rooms holding receptacles (countertop 1, fridge 1, ...) that hold objects
(mug 1, apple 2, ...). Each task asks the agent to put an object of some kind, possibly
cleaned or heated first, in or on a receptacle of some kind. The agent acts each turn with
one of the admissible action strings:

    go to <room>                  take <obj> from <recep>       put <obj> in/on <recep>
    open <recep>                  close <recep>                 examine <recep or held obj>
    clean <obj> with <sinkbasin>  heat <obj> with <microwave>   inventory      look

Everything is derived from (seed, split, index, difficulty, task_types) with a stable hash, so a task id
names the same world on every machine, and train and test worlds never coincide. The expert
plan shown to the teacher (`Observation.privileged`) is recomputed from the current state on
every step, so it stays right after the agent wanders off it.

    env = HouseholdEnv(difficulty=1)
    task, obs = env.reset(env.task_ids("train")[0])
    obs = env.step(obs.admissible_actions[0])
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

from .base import Environment, Observation, Task, check_int, numbered_task_ids, parse_numbered_task_id

# --------------------------------------------------------------------------------------------
# The catalogue: what can exist in a house. Plain data, read by the generator below.
# --------------------------------------------------------------------------------------------

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place",  # take X, put it on a surface Y
    "open_and_place",  # Y is a closed container: open it, then put X in it
    "pick_two",  # put two X in/on Y
    "clean_and_place",  # take X, clean it at a sinkbasin, then place it
    "heat_and_place",  # take X, heat it with a microwave, then place it
)

SPLITS: tuple[str, ...] = ("train", "test")

WIN_REWARD = 10.0
NOTHING_HAPPENS = "Nothing happens."
#: every generated task's expert plan length lies in this range (see also _Scale.min_plan)
MIN_PLAN, MAX_PLAN = 3, 15


@dataclass(frozen=True)
class _ReceptacleKind:
    prep: str  # "in" or "on": how goals and results speak of putting things there
    openable: bool  # starts closed; must be opened before taking from or putting into it
    station: str  # "clean", "heat" or "" : what it can do to a held object


RECEPTACLE_KINDS: dict[str, _ReceptacleKind] = {
    "bed": _ReceptacleKind("on", False, ""),
    "cabinet": _ReceptacleKind("in", True, ""),
    "coffeetable": _ReceptacleKind("on", False, ""),
    "countertop": _ReceptacleKind("on", False, ""),
    "desk": _ReceptacleKind("on", False, ""),
    "diningtable": _ReceptacleKind("on", False, ""),
    "drawer": _ReceptacleKind("in", True, ""),
    "dresser": _ReceptacleKind("on", False, ""),
    "fridge": _ReceptacleKind("in", True, ""),
    "microwave": _ReceptacleKind("in", False, "heat"),
    "safe": _ReceptacleKind("in", True, ""),
    "shelf": _ReceptacleKind("on", False, ""),
    "sidetable": _ReceptacleKind("on", False, ""),
    "sinkbasin": _ReceptacleKind("in", False, "clean"),
    "sofa": _ReceptacleKind("on", False, ""),
    "tvstand": _ReceptacleKind("on", False, ""),
}

#: room -> (receptacle kinds always present, optional kinds drawn by difficulty). Every room
#: has an always-open surface, so a held object can always be put down where the agent is.
ROOM_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "kitchen": (("countertop", "sinkbasin", "microwave"), ("fridge", "cabinet", "drawer", "diningtable", "shelf")),
    "livingroom": (("coffeetable",), ("sofa", "shelf", "cabinet", "drawer", "tvstand", "sidetable")),
    "bedroom": (("bed",), ("desk", "drawer", "dresser", "shelf", "sidetable", "safe")),
    "bathroom": (("countertop", "sinkbasin"), ("cabinet", "shelf", "drawer")),
    "office": (("desk",), ("shelf", "drawer", "cabinet", "sidetable", "safe")),
}


@dataclass(frozen=True)
class _ObjectKind:
    cleanable: bool
    heatable: bool
    homes: frozenset[str]  # receptacle kinds it plausibly sits in/on (spawn places and goals)


def _kind(cleanable: bool, heatable: bool, homes: str) -> _ObjectKind:
    return _ObjectKind(cleanable, heatable, frozenset(homes.split()))


OBJECT_KINDS: dict[str, _ObjectKind] = {
    "apple": _kind(True, True, "countertop diningtable fridge coffeetable"),
    "book": _kind(False, False, "shelf desk bed sofa coffeetable sidetable drawer"),
    "bowl": _kind(True, True, "countertop diningtable cabinet shelf fridge"),
    "bread": _kind(False, True, "countertop diningtable cabinet fridge"),
    "candle": _kind(False, False, "shelf countertop cabinet coffeetable sidetable"),
    "cellphone": _kind(False, False, "bed desk sidetable dresser sofa safe"),
    "cloth": _kind(True, False, "countertop cabinet drawer shelf"),
    "creditcard": _kind(False, False, "desk drawer safe dresser sidetable"),
    "cup": _kind(True, True, "countertop diningtable cabinet shelf desk sidetable"),
    "egg": _kind(False, True, "countertop fridge diningtable"),
    "keychain": _kind(False, False, "drawer sidetable sofa dresser coffeetable safe"),
    "knife": _kind(True, False, "countertop diningtable drawer"),
    "mug": _kind(True, True, "countertop diningtable cabinet shelf desk coffeetable sidetable"),
    "pen": _kind(False, False, "desk drawer shelf sidetable dresser"),
    "pillow": _kind(False, False, "bed sofa"),
    "plate": _kind(True, True, "countertop diningtable cabinet fridge shelf"),
    "potato": _kind(True, True, "countertop diningtable fridge cabinet"),
    "remotecontrol": _kind(False, False, "sofa coffeetable tvstand sidetable"),
    "soapbar": _kind(True, False, "countertop cabinet shelf"),
    "spoon": _kind(True, False, "countertop diningtable drawer"),
    "tomato": _kind(True, True, "countertop diningtable fridge"),
    "vase": _kind(False, False, "shelf coffeetable diningtable tvstand dresser"),
}

_PLURALS = {"bread": "loaves of bread", "knife": "knives", "potato": "potatoes", "tomato": "tomatoes"}


@dataclass(frozen=True)
class _Scale:
    """How big a house each difficulty builds."""

    rooms: int  # kitchen included
    extra_receptacles: int  # optional receptacle kinds added to each room
    distractors: tuple[int, int]  # inclusive range of non-goal objects
    spare_goal_objects: int  # at most this many extra copies of the goal object kind
    hide_prob: float  # chance a goal object starts in a closed container (when one fits)
    far_start: bool  # start the agent in a room holding no goal object (when there is one)
    min_plan: int  # shortest expert plan kept: harder levels drop the trivial layouts


SCALES: dict[int, _Scale] = {
    1: _Scale(rooms=2, extra_receptacles=1, distractors=(2, 3), spare_goal_objects=0, hide_prob=0.0,
              far_start=False, min_plan=3),
    2: _Scale(rooms=3, extra_receptacles=2, distractors=(4, 5), spare_goal_objects=1, hide_prob=0.5,
              far_start=True, min_plan=4),
    3: _Scale(rooms=4, extra_receptacles=3, distractors=(6, 8), spare_goal_objects=1, hide_prob=0.8,
              far_start=True, min_plan=5),
}

# --------------------------------------------------------------------------------------------
# A generated world (immutable) and the mutable state of one episode in it.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Recep:
    name: str  # "fridge 1"
    kind: str
    room: str
    prep: str
    openable: bool
    station: str


@dataclass(frozen=True)
class _Obj:
    name: str  # "mug 1"
    kind: str
    cleanable: bool
    heatable: bool


@dataclass(frozen=True)
class _Goal:
    """Met when `count` objects of `obj_kind` (cleaned/heated if `needs` says so) lie in
    receptacles of `recep_kind` (any instance of it)."""

    task_type: str
    obj_kind: str
    recep_kind: str
    count: int
    needs: str  # "", "clean" or "hot"

    def sentence(self) -> str:
        prep = RECEPTACLE_KINDS[self.recep_kind].prep
        if self.count == 2:
            thing = "two " + _PLURALS.get(self.obj_kind, self.obj_kind + "s")
        else:
            noun = f"{self.needs} {self.obj_kind}" if self.needs else self.obj_kind
            thing = _article(noun) + " " + noun
        return f"Your task is to: put {thing} {prep} the {self.recep_kind}."


class _World:
    """One task's house and goal. Never mutated after construction (it is cached and shared)."""

    def __init__(self, task_type: str, rooms: list[str], receps: list[_Recep], placements: list[tuple[_Obj, str]],
                 start_room: str, goal: _Goal) -> None:
        self.task_type = task_type
        self.rooms = tuple(rooms)
        self.receps = tuple(receps)
        self.recep = {r.name: r for r in receps}
        self.receps_in = {room: tuple(r for r in receps if r.room == room) for room in rooms}
        # objects in (kind, number) order so listings read "mug 1, mug 2, ..., mug 10"
        ordered = sorted(placements, key=lambda p: _name_key(p[0].name))
        self.objs = tuple(o for o, _ in ordered)
        self.obj = {o.name: o for o in self.objs}
        self.start_loc = {o.name: r for o, r in ordered}
        self.start_room = start_room
        self.goal = goal
        self.goal_objs = tuple(o.name for o in self.objs if o.kind == goal.obj_kind)
        self.goal_receps = tuple(r for r in receps if r.kind == goal.recep_kind)

    def signature(self) -> str:
        """A canonical text of everything that defines the task (for equality and disjointness)."""
        g = self.goal
        parts = [f"{self.task_type}:{g.count}x{g.needs}{g.obj_kind}->{g.recep_kind}", f"start={self.start_room}"]
        parts += [f"{r.name}@{r.room}" for r in self.receps]
        parts += [f"{o}<{r}" for o, r in self.start_loc.items()]
        return "|".join(parts)


class _State:
    """Mutable episode state. `loc` maps each object not held to its receptacle name."""

    __slots__ = ("room", "held", "loc", "opened", "cleaned", "heated")

    def __init__(self, room: str, held: str | None, loc: dict[str, str], opened: set[str],
                 cleaned: set[str], heated: set[str]) -> None:
        self.room, self.held, self.loc = room, held, loc
        self.opened, self.cleaned, self.heated = opened, cleaned, heated

    @classmethod
    def initial(cls, world: _World) -> _State:
        # every openable receptacle starts closed, every object dirty and cold
        return cls(world.start_room, None, dict(world.start_loc), set(), set(), set())

    def copy(self) -> _State:
        return _State(self.room, self.held, dict(self.loc), set(self.opened), set(self.cleaned), set(self.heated))

    def key(self) -> tuple:
        """A hashable snapshot: equal keys mean equal states."""
        return (self.room, self.held, tuple(sorted(self.loc.items())), tuple(sorted(self.opened)),
                tuple(sorted(self.cleaned)), tuple(sorted(self.heated)))


def _name_key(name: str) -> tuple[str, int]:
    kind, _, num = name.rpartition(" ")
    return kind, int(num)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------------------------
# World rules: what is accessible, what the goal needs, what each action does.
# --------------------------------------------------------------------------------------------


def _accessible(state: _State, r: _Recep) -> bool:
    """Objects can be taken from / put into r only when it is not a closed container."""
    return not r.openable or r.name in state.opened


def _contents(world: _World, state: _State, recep_name: str) -> list[str]:
    return [o.name for o in world.objs if state.loc.get(o.name) == recep_name]


def _qualifies(world: _World, state: _State, obj: str) -> bool:
    """Whether obj has the kind and condition the goal asks for (wherever it is)."""
    goal = world.goal
    if world.obj[obj].kind != goal.obj_kind:
        return False
    if goal.needs == "clean":
        return obj in state.cleaned
    if goal.needs == "hot":
        return obj in state.heated
    return True


def _placed(world: _World, state: _State, obj: str) -> bool:
    """Whether obj already counts toward the goal: qualifying and lying in a goal receptacle."""
    where = state.loc.get(obj)
    return where is not None and world.recep[where].kind == world.goal.recep_kind and _qualifies(world, state, obj)


def _placed_count(world: _World, state: _State) -> int:
    return sum(_placed(world, state, o) for o in world.goal_objs)


def _goal_met(world: _World, state: _State) -> bool:
    return _placed_count(world, state) >= world.goal.count


# An action is (op, *args); its text is what the agent types. Ops: go, take, put, open, close,
# clean, heat, examine, inventory, look.
Action = tuple


def _action_text(action: Action) -> str:
    op, args = action[0], action[1:]
    if op == "go":
        return f"go to {args[0]}"
    if op == "take":
        return f"take {args[0]} from {args[1]}"
    if op == "put":
        return f"put {args[0]} in/on {args[1]}"
    if op in ("clean", "heat"):
        return f"{op} {args[0]} with {args[1]}"
    return " ".join((op,) + args)  # open X, close X, examine X, inventory, look


def _admissible(world: _World, state: _State) -> dict[str, Action]:
    """Every action valid in `state`, keyed by its text."""
    actions: list[Action] = [("look",), ("inventory",)]
    actions += [("go", room) for room in world.rooms if room != state.room]
    held = world.obj[state.held] if state.held else None
    for r in world.receps_in[state.room]:
        actions.append(("examine", r.name))
        if r.openable:
            actions.append(("close" if r.name in state.opened else "open", r.name))
        if _accessible(state, r):
            if held is None:
                actions += [("take", o, r.name) for o in _contents(world, state, r.name)]
            else:
                actions.append(("put", held.name, r.name))
        if held is not None and ((r.station == "clean" and held.cleanable) or (r.station == "heat" and held.heatable)):
            actions.append((r.station, held.name, r.name))
    if held is not None:
        actions.append(("examine", held.name))
    return {_action_text(a): a for a in actions}


def _apply(state: _State, action: Action) -> None:
    """Change `state` by an admissible action (the planner simulates with this too)."""
    op, args = action[0], action[1:]
    if op == "go":
        state.room = args[0]
    elif op == "take":
        state.held = args[0]
        del state.loc[args[0]]
    elif op == "put":
        state.loc[args[0]] = args[1]
        state.held = None
    elif op == "open":
        state.opened.add(args[0])
    elif op == "close":
        state.opened.discard(args[0])
    elif op == "clean":
        state.cleaned.add(args[0])
    elif op == "heat":
        state.heated.add(args[0])
    # examine, inventory, look change nothing


# --------------------------------------------------------------------------------------------
# Text the agent reads.
# --------------------------------------------------------------------------------------------


def _list_things(names: list[str]) -> str:
    """'a mug 1', 'a mug 1 and an apple 2', 'a mug 1, a cup 2, and an apple 2'."""
    items = [f"{_article(n)} {n}" for n in names]
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _recep_view(world: _World, state: _State, r: _Recep) -> str:
    if not _accessible(state, r):
        return f"{_article(r.name)} {r.name} (closed)"
    inside = _contents(world, state, r.name)
    return f"{_article(r.name)} {r.name} ({', '.join(inside) if inside else 'empty'})"


def _room_view(world: _World, state: _State) -> str:
    """Where the agent is and what it sees: the reset/look/go observation."""
    seen = ", ".join(_recep_view(world, state, r) for r in world.receps_in[state.room])
    others = ", ".join(room for room in world.rooms if room != state.room)
    text = f"You are in the {state.room}. You see {seen}. Other rooms: {others}."
    if state.held:
        text += f" You are carrying the {state.held}."
    return text


def _examine_text(world: _World, state: _State, name: str) -> str:
    if name in world.obj:
        marks = [m for m, s in (("clean", state.cleaned), ("hot", state.heated)) if name in s]
        return f"This is {_article(name)} {name}." + (f" It is {' and '.join(marks)}." if marks else "")
    r = world.recep[name]
    if not _accessible(state, r):
        return f"The {name} is closed."
    inside = _contents(world, state, name)
    if not inside:
        return f"The {name} is empty."
    return f"{r.prep.capitalize()} the {name}, you see {_list_things(inside)}."


def _result_text(world: _World, state: _State, action: Action) -> str:
    """What the agent reads after `action` was applied (state is the state after it)."""
    op, args = action[0], action[1:]
    if op in ("go", "look"):
        return _room_view(world, state)
    if op == "take":
        return f"You pick up the {args[0]} from the {args[1]}."
    if op == "put":
        return f"You put the {args[0]} {world.recep[args[1]].prep} the {args[1]}."
    if op == "open":
        inside = _contents(world, state, args[0])
        seen = f"In it, you see {_list_things(inside)}." if inside else "It is empty."
        return f"You open the {args[0]}. {seen}"
    if op == "close":
        return f"You close the {args[0]}."
    if op in ("clean", "heat"):
        return f"You {op} the {args[0]} using the {args[1]}."
    if op == "examine":
        return _examine_text(world, state, args[0])
    # inventory
    return f"You are carrying: {state.held}." if state.held else "You are not carrying anything."


def _privileged_text(plan: list[str]) -> str:
    if not plan:
        return "Goal reached."
    return "Expert plan from here:\n" + "\n".join(f"{i}. {a}" for i, a in enumerate(plan, 1))


# --------------------------------------------------------------------------------------------
# The expert planner.
# --------------------------------------------------------------------------------------------
# Task-aware and recomputed from any state: for every order in which the still-missing goal
# objects could be handled, it simulates fetch -> clean/heat -> deliver with cheapest local
# choices, and keeps the shortest plan. When two objects are missing, it also tries sending
# both to each single goal receptacle, since the locally cheapest one for the first object
# can cost the second a walk. Goal objects are few (at most 3), so this is at most a few dozen
# short simulations: tens of microseconds, cheap enough to run on every step. The tests check the
# plans against breadth-first search over the full action graph.


class _Sim:
    """A planning scratchpad: a copied state plus the actions taken on it."""

    def __init__(self, world: _World, state: _State, target: _Recep | None = None) -> None:
        self.world, self.state, self.actions = world, state.copy(), []
        self.target = target  # deliver everything here; None: the cheapest goal receptacle each time

    def do(self, action: Action) -> None:
        self.actions.append(_action_text(action))
        _apply(self.state, action)

    def reach(self, r: _Recep) -> None:
        """Walk to r's room and open it if needed, so its contents are accessible."""
        if self.state.room != r.room:
            self.do(("go", r.room))
        if not _accessible(self.state, r):
            self.do(("open", r.name))

    def put_down(self) -> None:
        """Free the hands in the current room; every room has an always-open surface."""
        r = next(r for r in self.world.receps_in[self.state.room] if _accessible(self.state, r))
        self.do(("put", self.state.held, r.name))

    def fetch(self, obj: str) -> None:
        if self.state.held is not None:
            self.put_down()
        self.reach(self.world.recep[self.state.loc[obj]])
        self.do(("take", obj, self.state.loc[obj]))

    def delivery_cost(self, room: str) -> int:
        """Actions needed to put the held object into a goal receptacle, starting in `room`."""
        return min((r.room != room) + (not _accessible(self.state, r)) + 1 for r in self.world.goal_receps)

    def treat(self, obj: str) -> None:
        """Clean or heat the held goal object if the goal asks for it and it is not yet."""
        needs = self.world.goal.needs
        if not needs or _qualifies(self.world, self.state, obj):
            return
        station = "clean" if needs == "clean" else "heat"
        # choose the station whose room also makes the delivery cheapest
        candidates = [r for r in self.world.receps if r.station == station]
        best = min(candidates, key=lambda r: (r.room != self.state.room) + self.delivery_cost(r.room))
        self.reach(best)
        self.do((station, obj, best.name))

    def deliver(self, obj: str) -> None:
        here = self.state.room
        best = self.target or min(self.world.goal_receps,
                                  key=lambda r: (r.room != here) + (not _accessible(self.state, r)))
        self.reach(best)
        self.do(("put", obj, best.name))


def _plan(world: _World, state: _State) -> list[str]:
    """A shortest-found action list that reaches the goal from `state` ([] when already met)."""
    if _goal_met(world, state):
        return []
    need = world.goal.count - _placed_count(world, state)
    candidates = [o for o in world.goal_objs if not _placed(world, state, o)]
    targets: list[_Recep | None] = [None] + (list(world.goal_receps) if need > 1 else [])
    best: list[str] | None = None
    for order, target in itertools.product(itertools.permutations(candidates, need), targets):
        sim = _Sim(world, state, target)
        for obj in order:
            if sim.state.held != obj:
                sim.fetch(obj)
            sim.treat(obj)
            sim.deliver(obj)
            if _goal_met(world, sim.state):
                break
        if best is None or len(sim.actions) < len(best):
            best = sim.actions
    assert best is not None, "the generator guarantees enough goal objects"
    return best


# --------------------------------------------------------------------------------------------
# The seeded world generator.
# --------------------------------------------------------------------------------------------


def _stable_int(*parts: object) -> int:
    """A process-independent 64-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _split_of(signature: str) -> str:
    """The split a world belongs to, decided by the world itself so train and test never share one."""
    return SPLITS[_stable_int("household-split", signature) % 2]


def _build_house(rng: random.Random, scale: _Scale) -> tuple[list[str], list[_Recep]]:
    others = [room for room in ROOM_LAYOUTS if room != "kitchen"]
    rooms = ["kitchen"] + rng.sample(others, scale.rooms - 1)
    counts: dict[str, int] = {}
    receps = []
    for room in rooms:
        always, optional = ROOM_LAYOUTS[room]
        for kind in list(always) + rng.sample(optional, scale.extra_receptacles):
            counts[kind] = counts.get(kind, 0) + 1
            k = RECEPTACLE_KINDS[kind]
            receps.append(_Recep(f"{kind} {counts[kind]}", kind, room, k.prep, k.openable, k.station))
    return rooms, receps


def _goal_shapes(task_type: str) -> list[tuple[str, str, frozenset[str]]]:
    """(object kind, goal receptacle kind, other kinds the object can start in) for a task type."""
    shapes = []
    for obj_kind, k in OBJECT_KINDS.items():
        if (task_type == "clean_and_place" and not k.cleanable) or (task_type == "heat_and_place" and not k.heatable):
            continue
        for recep_kind in sorted(k.homes):
            openable = RECEPTACLE_KINDS[recep_kind].openable
            # pick_and_place targets a surface; open_and_place a closed container
            if (task_type == "pick_and_place" and openable) or (task_type == "open_and_place" and not openable):
                continue
            shapes.append((obj_kind, recep_kind, k.homes - {recep_kind}))
    return shapes


GOAL_SHAPES: dict[str, list[tuple[str, str, frozenset[str]]]] = {t: _goal_shapes(t) for t in TASK_TYPES}


def _pick_goal(rng: random.Random, task_type: str, receps: list[_Recep]) -> _Goal | None:
    """A goal of `task_type` feasible in this house, or None when the house has none."""
    present = {r.kind for r in receps}
    # feasible: the goal receptacle exists and the object can start somewhere else
    options = [(o, r) for o, r, starts in GOAL_SHAPES[task_type] if r in present and not starts.isdisjoint(present)]
    if not options:
        return None
    obj_kind, recep_kind = rng.choice(options)
    needs = {"clean_and_place": "clean", "heat_and_place": "hot"}.get(task_type, "")
    return _Goal(task_type, obj_kind, recep_kind, 2 if task_type == "pick_two" else 1, needs)


def _place_objects(rng: random.Random, scale: _Scale, goal: _Goal, receps: list[_Recep]) -> list[tuple[_Obj, str]]:
    """Goal-kind objects (never already in a goal receptacle) plus distractors of other kinds."""
    counts: dict[str, int] = {}
    placements = []

    def place(kind: str, spots: list[_Recep]) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        k = OBJECT_KINDS[kind]
        placements.append((_Obj(f"{kind} {counts[kind]}", kind, k.cleanable, k.heatable), rng.choice(spots).name))

    home = OBJECT_KINDS[goal.obj_kind].homes
    goal_spots = [r for r in receps if r.kind in home and r.kind != goal.recep_kind and not r.station]
    hidden_spots = [r for r in goal_spots if r.openable]
    for _ in range(goal.count + rng.randint(0, scale.spare_goal_objects)):
        # hiding goal objects in closed containers is what lengthens plans at higher levels
        hide = hidden_spots and rng.random() < scale.hide_prob
        place(goal.obj_kind, hidden_spots if hide else goal_spots)
    distractor_kinds = [k for k in OBJECT_KINDS if k != goal.obj_kind]
    for _ in range(rng.randint(*scale.distractors)):
        kind = rng.choice(distractor_kinds)
        spots = [r for r in receps if r.kind in OBJECT_KINDS[kind].homes]
        if spots:
            place(kind, spots)
    return placements


def _pick_start(rng: random.Random, scale: _Scale, rooms: list[str], receps: list[_Recep],
                placements: list[tuple[_Obj, str]], goal: _Goal) -> str:
    """The agent's start room; at higher levels, away from the goal objects when possible."""
    if not scale.far_start:
        return rng.choice(rooms)
    room_of = {r.name: r.room for r in receps}
    busy = {room_of[where] for o, where in placements if o.kind == goal.obj_kind}
    return rng.choice([room for room in rooms if room not in busy] or rooms)


@lru_cache(maxsize=4096)
def _generate(seed: int, split: str, index: int, difficulty: int, task_types: tuple[str, ...] = TASK_TYPES) -> _World:
    """The world of task `index` of `split`: a pure function of its arguments.

    Draws candidate worlds from a stream seeded by a stable hash and keeps the first that is
    feasible, has an expert plan of scale.min_plan..MAX_PLAN actions, and belongs to `split`.
    """
    rng = random.Random(_stable_int("household-task", seed, split, index, difficulty))
    scale = SCALES[difficulty]
    task_type = task_types[index % len(task_types)]  # round robin keeps every split balanced
    for _ in range(10_000):
        rooms, receps = _build_house(rng, scale)
        goal = _pick_goal(rng, task_type, receps)
        if goal is None:
            continue
        placements = _place_objects(rng, scale, goal, receps)
        world = _World(task_type, rooms, receps, placements, _pick_start(rng, scale, rooms, receps, placements, goal),
                       goal)
        if _split_of(world.signature()) != split:
            continue
        if max(MIN_PLAN, scale.min_plan) <= len(_plan(world, _State.initial(world))) <= MAX_PLAN:
            return world
    raise RuntimeError(f"could not generate household task {split}-{index} (difficulty {difficulty})")


# --------------------------------------------------------------------------------------------
# The environment.
# --------------------------------------------------------------------------------------------


def _check_task_types(task_types: object) -> tuple[str, ...]:
    """None means all five types; otherwise a non-empty list of known types, kept in order."""
    if task_types is None:
        return TASK_TYPES
    if isinstance(task_types, str):
        task_types = [task_types]
    if not isinstance(task_types, (list, tuple)) or not task_types:
        raise ValueError(f"task_types must be a non-empty list of task types ({', '.join(TASK_TYPES)}), "
                         f"got {task_types!r}")
    unknown = [t for t in task_types if t not in TASK_TYPES]
    if unknown:
        raise ValueError(f"unknown task type {unknown[0]!r} in task_types; valid types are {', '.join(TASK_TYPES)}")
    return tuple(dict.fromkeys(task_types))


class HouseholdEnv(Environment):
    """Seeded household tasks: move (clean/heated) objects between receptacles across rooms.

    Task ids are "train-00017" / "test-00003". Ids, worlds and plans depend only on the
    constructor arguments, never on the process. Rewards: WIN_REWARD on the step that meets
    the goal (done and won), 0 otherwise. An action that is not admissible changes nothing
    and answers "Nothing happens.".
    """

    max_turns: int = 15
    skill_bank = "household"
    resets_cheaply = True

    def __init__(self, num_train_tasks: int = 1000, num_test_tasks: int = 200, difficulty: int = 1,
                 seed: int = 0, task_types: list[str] | None = None) -> None:
        self.num_tasks = {
            "train": check_int("num_train_tasks", num_train_tasks, 1),
            "test": check_int("num_test_tasks", num_test_tasks, 0),
        }
        self.difficulty = check_int("difficulty", difficulty, 1, max(SCALES))
        self.seed = check_int("seed", seed, -(2**63))
        self.task_types = _check_task_types(task_types)
        self._world: _World | None = None
        self._state: _State | None = None
        self._actions: dict[str, Action] = {}  # admissible in the current state (set by _observe)
        self._done = False
        self._won = False

    # -- task ids --------------------------------------------------------------------------

    def task_ids(self, split: str) -> list[str]:
        return numbered_task_ids(split, self.num_tasks)

    def _world_of(self, task_id: str) -> _World:
        split, index = parse_numbered_task_id(task_id, self.num_tasks)
        return _generate(self.seed, split, index, self.difficulty, self.task_types)

    def task_signature(self, task_id: str) -> str:
        """A canonical text of the task's world and goal: equal signatures mean equal tasks."""
        return self._world_of(task_id).signature()

    # -- episodes --------------------------------------------------------------------------

    def reset(self, task_id: str) -> tuple[Task, Observation]:
        world = self._world_of(task_id)
        self._world, self._state = world, _State.initial(world)
        self._done = self._won = False
        task = Task(task_id=task_id, task_type=world.task_type, description=world.goal.sentence())
        return task, self._observe(_room_view(world, self._state))

    def step(self, action: str) -> Observation:
        """Apply one action text (case and spacing are forgiven); anything else changes nothing."""
        world, state = self._require_episode()
        chosen = self._actions.get(" ".join(str(action).lower().split()))
        if chosen is None:
            return self._observe(NOTHING_HAPPENS)
        _apply(state, chosen)
        if _goal_met(world, state):
            self._done = self._won = True
            return self._observe(_result_text(world, state, chosen), reward=WIN_REWARD)
        return self._observe(_result_text(world, state, chosen))

    def expert_plan(self) -> list[str]:
        """The expert's action texts from the current state to the goal ([] once it is met)."""
        world, state = self._require_episode()
        return _plan(world, state)

    def expert_action(self) -> str | None:
        plan = self.expert_plan()
        return plan[0] if plan else None

    def state_key(self) -> tuple:
        """A hashable snapshot of the episode state (for tests and debugging)."""
        return self._require_episode()[1].key()

    def _require_episode(self) -> tuple[_World, _State]:
        if self._world is None or self._state is None:
            raise RuntimeError("call reset(task_id) before step()")
        return self._world, self._state

    def _observe(self, text: str, reward: float = 0.0) -> Observation:
        world, state = self._require_episode()
        # a finished episode admits nothing, so every later step answers "Nothing happens."
        self._actions = {} if self._done else _admissible(world, state)
        if self._done:
            return Observation(text=text, admissible_actions=[], reward=reward, done=True, won=self._won,
                               privileged=_privileged_text([]))
        return Observation(text=text, admissible_actions=sorted(self._actions), reward=reward,
                           privileged=_privileged_text(_plan(world, state)))


def expert_plan(env: HouseholdEnv) -> list[str]:
    """Module-level alias of `env.expert_plan()`."""
    return env.expert_plan()
