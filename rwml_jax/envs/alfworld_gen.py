"""Generating small, solvable ALFWorld games offline, in ALFWorld's own PDDL domain and text grammar.

Each game is a tiny room (4-7 receptacles, the task's objects and a few distractors) of one of ALFWorld's
scene kinds, for one of its six task types. Everything ALFWorld-specific comes from the installed `alfworld`
package: the domain (`alfworld/data/alfred.pddl`), the grammar (`alfred.twl2`), the goal formulas and task
sentences (`alfworld.gen.goal_library`), which receptacle holds which object and which objects can be
heated / cooled / cleaned / toggled (`alfworld.gen.constants`). The problem file follows the layout of the
official games (objects with ALFRED-style mangled ids such as `Apple_bar__plus_01_dot_20_bar_...`, the same
init predicates), so `AlfworldEnv` loads them like any other game.

A walkthrough is planned symbolically, turned into commands with the engine's own object names (alfworld's
demangler: "apple 1"), and replayed through the real engine; a game is written only if every walkthrough
command is admissible and the game is won exactly at the last one, so `solvable: true` is checked, not
assumed. Generation is seeded: the same (seed, index) always gives the same game file.

Output: `<out>/<task_type>-<Obj>-None-<Recep>-<scene>/trial_G<seed>_<index>/game.tw-pddl` with the JSON
fields of the official files (pddl_domain, grammar, pddl_problem, solvable, walkthrough), plus
`<out>/generation.json` (seed, count, the games and their walkthroughs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from rwml_jax.envs import alfworld_memo
from rwml_jax.envs.alfworld_data import GAME_FILE, TASK_TYPES

# Scene kinds: ALFRED scene-number base and the receptacle / object classes of a small room of that kind.
SCENE_KINDS: dict[str, dict[str, Any]] = {
    "Kitchen": {
        "scene_base": 0,
        "receptacles": ["CounterTop", "Cabinet", "Drawer", "Fridge", "Microwave", "SinkBasin", "DiningTable",
                        "StoveBurner", "Shelf", "GarbageCan", "CoffeeMachine"],
        "objects": ["Apple", "Bowl", "Bread", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork", "Kettle",
                    "Knife", "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate", "Pot", "Potato",
                    "SaltShaker", "SoapBottle", "Spatula", "Spoon", "Tomato", "WineBottle"],
    },
    "LivingRoom": {
        "scene_base": 200,
        "receptacles": ["Sofa", "CoffeeTable", "SideTable", "ArmChair", "Drawer", "Cabinet", "Shelf",
                        "DiningTable", "GarbageCan", "Dresser", "Desk"],
        "objects": ["Book", "Box", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Newspaper", "Pillow",
                    "RemoteControl", "Statue", "Vase", "Watch", "WateringCan", "TissueBox", "Plate", "Bowl"],
    },
    "Bedroom": {
        "scene_base": 300,
        "receptacles": ["Bed", "Desk", "Drawer", "Dresser", "SideTable", "Shelf", "GarbageCan", "Safe",
                        "ArmChair"],
        "objects": ["AlarmClock", "BaseballBat", "BasketBall", "Book", "Bowl", "Box", "CD", "CellPhone",
                    "CreditCard", "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow", "TennisRacket",
                    "Watch"],
    },
    "Bathroom": {
        "scene_base": 400,
        "receptacles": ["CounterTop", "Cabinet", "SinkBasin", "Toilet", "BathtubBasin", "TowelHolder",
                        "Drawer", "GarbageCan", "Shelf", "HandTowelHolder", "ToiletPaperHanger"],
        "objects": ["Candle", "Cloth", "DishSponge", "HandTowel", "SoapBar", "SoapBottle", "SprayBottle",
                    "TissueBox", "ToiletPaper", "Towel"],
    },
}
# Receptacles whose ALFRED id carries a "basin" suffix (alfworld's demangler names them "sinkbasin").
_BASIN_PARENT = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}
_APPLIANCE = {"pick_clean_then_place_in_recep": "SinkBasin", "pick_heat_then_place_in_recep": "Microwave",
              "pick_cool_then_place_in_recep": "Fridge"}
_PROPERTY = {"pick_clean_then_place_in_recep": "Cleanable", "pick_heat_then_place_in_recep": "Heatable",
             "pick_cool_then_place_in_recep": "Coolable"}
_VERB = {"pick_clean_then_place_in_recep": "clean", "pick_heat_then_place_in_recep": "heat",
         "pick_cool_then_place_in_recep": "cool"}
_LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")
MIN_RECEPTACLES, MAX_RECEPTACLES = 4, 7
MIN_DISTRACTORS, MAX_DISTRACTORS = 2, 5
_MAX_TRIES = 50


class GenerationError(RuntimeError):
    """No solvable game could be generated for the requested task type (should not happen)."""


@dataclasses.dataclass
class _Thing:
    id: str  # mangled ALFRED id, e.g. Apple_bar__plus_01_dot_20_bar__plus_00_dot_90_bar__minus_00_dot_35
    cls: str  # ALFRED class, e.g. "Apple", "SinkBasin"
    location: str  # loc_bar_... id (receptacles) or the location of the holding receptacle (objects)
    holder: str | None = None  # receptacle id holding an object


@dataclasses.dataclass
class GeneratedGame:
    task_type: str
    folder: str  # "<task folder>/<trial folder>", the game's task id
    gamefile: str
    walkthrough: list[str]
    task: str  # the task sentence


# ------------------------------------------------------------------ package resources

def alfworld_logic_files() -> tuple[str, str]:
    """(alfred.pddl text, alfred.twl2 text) shipped inside the installed alfworld package."""
    try:
        import importlib.resources as ir

        data = ir.files("alfworld") / "data"
        return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ImportError(f"generating ALFWorld games needs the `alfworld` package (pip install alfworld): {e}") \
            from e


def _constants() -> Any:
    import alfworld.gen.constants as constants

    return constants


def _goal_library() -> Any:
    import alfworld.gen.goal_library as glib

    return glib


# ------------------------------------------------------------------ ids

def _coord(rng: random.Random, lo: float, hi: float) -> str:
    v = rng.uniform(lo, hi)
    sign = "plus" if v >= 0 else "minus"
    whole, frac = f"{abs(v):05.2f}".split(".")
    return f"_{sign}_{whole}_dot_{frac}"


def _mangled_id(rng: random.Random, cls: str, taken: set[str]) -> str:
    while True:
        base = _BASIN_PARENT.get(cls, cls)
        ident = f"{base}_bar_{_coord(rng, -3, 3)}_bar_{_coord(rng, 0, 2)}_bar_{_coord(rng, -3, 3)}"
        if cls in _BASIN_PARENT:
            ident += f"_bar_{cls}"
        if ident.lower() not in taken:
            taken.add(ident.lower())
            return ident


def _loc_id(rng: random.Random, taken: set[str]) -> str:
    def n(v: int) -> str:
        return f"_minus_{-v}" if v < 0 else f"{v}"

    while True:
        ident = (f"loc_bar_{n(rng.randint(-12, 12))}_bar_{n(rng.randint(-12, 12))}"
                 f"_bar_{rng.randint(0, 3)}_bar_{rng.choice([0, 15, 30, 45, 60])}")
        if ident not in taken:
            taken.add(ident)
            return ident


# ------------------------------------------------------------------ scene sampling

@dataclasses.dataclass
class _Scene:
    task_type: str
    kind: str
    scene_number: int
    obj_cls: str  # the task's object class
    recep_cls: str  # the task's target receptacle class ("DeskLamp" for look_at_obj_in_light: the toggle)
    receptacles: list[_Thing]
    objects: list[_Thing]
    agent_location: str
    targets: list[_Thing]  # the task's object instance(s)
    goal_recep: _Thing | None  # receptacle to put the object(s) in
    appliance: _Thing | None  # sinkbasin / microwave / fridge
    lamp: _Thing | None
    lamp_holder: _Thing | None


def _fits(constants: Any, obj: str, recep: str) -> bool:
    return obj in constants.VAL_RECEPTACLE_OBJECTS.get(recep, ())


def _sample_scene(rng: random.Random, task_type: str) -> _Scene | None:
    """One random small scene for `task_type`, or None if this draw cannot host the task."""
    c = _constants()
    kinds = sorted(k for k in c.GOALS_VALID[task_type] if k in SCENE_KINDS)
    kind = rng.choice(kinds)
    spec = SCENE_KINDS[kind]
    recep_pool = [r for r in spec["receptacles"] if r in c.VAL_RECEPTACLE_OBJECTS]
    obj_pool = sorted(o for o in spec["objects"] if any(_fits(c, o, r) for r in recep_pool))

    appliance_cls = _APPLIANCE.get(task_type)
    if appliance_cls is not None and appliance_cls not in recep_pool:
        return None
    # Task object and target receptacle class.
    if task_type == "look_at_obj_in_light":
        holders = [r for r in _LAMP_HOLDERS if r in recep_pool]
        if not holders:
            return None
        lamp_holder_cls = rng.choice(holders)
        obj_cls = rng.choice(obj_pool)
        recep_cls = "DeskLamp"
    else:
        lamp_holder_cls = None
        cands = obj_pool
        if task_type in _PROPERTY:
            cands = [o for o in cands if o in c.VAL_ACTION_OBJECTS[_PROPERTY[task_type]]]
        if not cands:
            return None
        obj_cls = rng.choice(cands)
        recep_cands = [r for r in recep_pool if _fits(c, obj_cls, r) and r != appliance_cls]
        if not recep_cands:
            return None
        recep_cls = rng.choice(recep_cands)
    source_cands = [r for r in recep_pool if _fits(c, obj_cls, r) and r != recep_cls]
    if not source_cands:
        return None

    # Receptacle classes: the required ones, then distractors (repeats allowed: "drawer 2").
    required = [rng.choice(source_cands)]
    if recep_cls != "DeskLamp":
        required.append(recep_cls)
    if appliance_cls:
        required.append(appliance_cls)
    if lamp_holder_cls:
        required.append(lamp_holder_cls)
    n_recep = rng.randint(max(MIN_RECEPTACLES, len(set(required))), MAX_RECEPTACLES)
    classes = list(dict.fromkeys(required))
    while len(classes) < n_recep:
        classes.append(rng.choice(recep_pool))

    ids: set[str] = set()
    locs: set[str] = set()
    receptacles = [_Thing(_mangled_id(rng, cls, ids), cls, _loc_id(rng, locs)) for cls in classes]
    agent_location = _loc_id(rng, locs)
    by_cls: dict[str, list[_Thing]] = {}
    for r in receptacles:
        by_cls.setdefault(r.cls, []).append(r)

    def place(cls: str, allowed: list[_Thing]) -> _Thing:
        holder = rng.choice(allowed)
        return _Thing(_mangled_id(rng, cls, ids), cls, holder.location, holder.id)

    # Task objects: never start inside a receptacle of the goal class (the goal would already hold).
    start_cands = [r for r in receptacles if _fits(c, obj_cls, r.cls) and r.cls != recep_cls]
    n_targets = 2 if task_type == "pick_two_obj_and_place" else 1
    targets = [place(obj_cls, start_cands) for _ in range(n_targets)]
    objects = list(targets)
    lamp = lamp_holder = None
    if lamp_holder_cls:
        lamp_holder = rng.choice(by_cls[lamp_holder_cls])
        lamp = _Thing(_mangled_id(rng, "DeskLamp", ids), "DeskLamp", lamp_holder.location, lamp_holder.id)
        objects.append(lamp)
    for _ in range(rng.randint(MIN_DISTRACTORS, MAX_DISTRACTORS)):
        cls = rng.choice([o for o in obj_pool if o != obj_cls])
        allowed = [r for r in receptacles if _fits(c, cls, r.cls)]
        if allowed:
            objects.append(place(cls, allowed))

    goal_recep = rng.choice(by_cls[recep_cls]) if recep_cls in by_cls else None
    appliance = rng.choice(by_cls[appliance_cls]) if appliance_cls else None
    scene_number = spec["scene_base"] + rng.randint(1, 30)
    return _Scene(task_type, kind, scene_number, obj_cls, recep_cls, receptacles, objects, agent_location,
                  targets, goal_recep, appliance, lamp, lamp_holder)


# ------------------------------------------------------------------ PDDL problem

def _problem_text(scene: _Scene, problem_name: str) -> str:
    c = _constants()
    glib = _goal_library()
    # Type constants, as in the official problems: every static receptacle class is an rtype, every other
    # ALFRED class (including movable receptacles such as Bowl, and Sink / Bathtub) an otype.
    rtypes = sorted(set(c.STATIC_RECEPTACLES) - {"Sink", "Bathtub"})
    otypes = sorted(set(c.OBJECTS) - set(rtypes))
    lines = [f"(define (problem {problem_name})", "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"        {t}Type - otype" for t in otypes]
    lines += [f"        {t}Type - rtype" for t in rtypes]
    lines += [f"        {o.id} - object" for o in scene.objects]
    lines += [f"        {r.id} - receptacle" for r in scene.receptacles]
    locations = sorted({r.location for r in scene.receptacles} | {scene.agent_location})
    lines += [f"        {loc} - location" for loc in locations]
    lines += ["        )", "", "(:init", ""]
    facts: list[str] = []
    facts += [f"(receptacleType {r.id} {r.cls}Type)" for r in scene.receptacles]
    facts += [f"(objectType {o.id} {o.cls}Type)" for o in scene.objects]
    r_classes = sorted({r.cls for r in scene.receptacles})
    o_classes = sorted({o.cls for o in scene.objects})
    facts += [f"(canContain {rc}Type {oc}Type)" for rc in r_classes for oc in o_classes if _fits(c, oc, rc)]
    facts += [f"(pickupable {o.id})" for o in scene.objects if o.cls not in c.VAL_ACTION_OBJECTS["Toggleable"]]
    facts += [f"(isReceptacleObject {o.id})" for o in scene.objects if o.cls in c.MOVABLE_RECEPTACLES_SET]
    facts += [f"(openable {r.id})" for r in scene.receptacles if r.cls in c.OPENABLE_CLASS_SET]
    facts += [f"(atLocation agent1 {scene.agent_location})"]
    for prop, pred in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                       ("Toggleable", "toggleable"), ("Sliceable", "sliceable")):
        facts += [f"({pred} {o.id})" for o in scene.objects if o.cls in c.VAL_ACTION_OBJECTS[prop]]
    facts += [f"(inReceptacle {o.id} {o.holder})" for o in scene.objects]
    facts += [f"(receptacleAtLocation {r.id} {r.location})" for r in scene.receptacles]
    facts += [f"(objectAtLocation {o.id} {o.location})" for o in scene.objects]
    lines += [f"        {f}" for f in facts]
    lines += ["        )", ""]
    goal = glib.gdict[scene.task_type]["pddl"].replace("#", "-")
    toggle = "DeskLamp" if scene.task_type == "look_at_obj_in_light" else ""
    goal = goal.format(obj=scene.obj_cls, recep=scene.recep_cls, toggle=toggle, mrecep="")
    return "\n".join(lines) + "\n" + goal


def _task_sentence(rng: random.Random, scene: _Scene) -> str:
    glib = _goal_library()
    template = rng.choice(glib.gdict[scene.task_type]["templates"])
    toggle = "desklamp" if scene.task_type == "look_at_obj_in_light" else ""
    return template.format(obj=scene.obj_cls.lower(), recep=scene.recep_cls.lower(), toggle=toggle, mrecep="")


# ------------------------------------------------------------------ walkthrough

def _plan(scene: _Scene) -> list[tuple[str, ...]]:
    """Symbolic walkthrough: ("goto", r) ("open", r) ("take", o, r) ("put", o, r) ("use", lamp)
    ("clean"|"heat"|"cool", o, r)."""
    c = _constants()
    plan: list[tuple[str, ...]] = []
    at: list[str | None] = [None]
    opened: set[str] = set()
    recep_by_id = {r.id: r for r in scene.receptacles}

    def go(r: _Thing) -> None:
        if at[0] != r.location:
            plan.append(("goto", r.id))
            at[0] = r.location
        if r.cls in c.OPENABLE_CLASS_SET and r.id not in opened:
            plan.append(("open", r.id))
            opened.add(r.id)

    def go_no_open(r: _Thing) -> None:  # appliances are used closed, as in the official walkthroughs
        if at[0] != r.location:
            plan.append(("goto", r.id))
            at[0] = r.location

    for target in scene.targets:
        src = recep_by_id[target.holder]  # type: ignore[index]
        go(src)
        plan.append(("take", target.id, src.id))
        if scene.appliance is not None:
            go_no_open(scene.appliance)
            plan.append((_VERB[scene.task_type], target.id, scene.appliance.id))
        if scene.task_type == "look_at_obj_in_light":
            assert scene.lamp is not None and scene.lamp_holder is not None
            go_no_open(scene.lamp_holder)
            plan.append(("use", scene.lamp.id))
        else:
            assert scene.goal_recep is not None
            go(scene.goal_recep)
            plan.append(("put", target.id, scene.goal_recep.id))
    return plan


def _commands(plan: list[tuple[str, ...]], names: dict[str, str]) -> list[str]:
    def n(ident: str) -> str:
        return names[ident.lower()]

    out = []
    for step in plan:
        kind = step[0]
        if kind == "goto":
            out.append(f"go to {n(step[1])}")
        elif kind == "open":
            out.append(f"open {n(step[1])}")
        elif kind == "take":
            out.append(f"take {n(step[1])} from {n(step[2])}")
        elif kind == "put":
            out.append(f"move {n(step[1])} to {n(step[2])}")
        elif kind == "use":
            out.append(f"use {n(step[1])}")
        else:  # clean / heat / cool
            out.append(f"{kind} {n(step[1])} with {n(step[2])}")
    return out


def _verify(gamefile: str, plan: list[tuple[str, ...]]) -> list[str] | None:
    """Names from the real engine -> walkthrough commands; replay them; the commands if the game is won
    exactly at the last one with every command admissible, else None."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    alfworld_memo.install()
    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
    env = textworld.start(gamefile, request_infos=infos, wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])
    try:
        state = env.reset()
        names = {k.lower(): v.name.strip() for k, v in state["_entity_infos"].items()}
        try:
            commands = _commands(plan, names)
        except KeyError:
            return None
        if state["won"]:
            return None
        for i, cmd in enumerate(commands):
            if cmd not in state["admissible_commands"]:
                return None
            state, _, _ = env.step(cmd)
            if state["feedback"].strip() == "Nothing happens.":
                return None
            if bool(state["won"]) != (i == len(commands) - 1):
                return None
        return commands
    finally:
        env.close()


# ------------------------------------------------------------------ public API

def generate_game(out_dir: str | os.PathLike, task_type: str, seed: int, index: int) -> GeneratedGame:
    """Generate, verify and write one game of `task_type`; deterministic in (seed, index)."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown ALFWorld task type {task_type!r}; expected one of {TASK_TYPES}")
    domain, grammar_template = alfworld_logic_files()
    out = Path(out_dir)
    for attempt in range(_MAX_TRIES):
        rng = random.Random(((seed * 1_000_003 + index) * 101 + attempt) * 7 + TASK_TYPES.index(task_type))
        scene = _sample_scene(rng, task_type)
        if scene is None:
            continue
        trial = f"trial_G{seed:06d}_{index:05d}"
        task_folder = f"{task_type}-{scene.obj_cls}-None-{scene.recep_cls}-{scene.scene_number}"
        task = _task_sentence(rng, scene)
        data = {
            "pddl_domain": domain,
            "grammar": grammar_template.replace("UNKNOWN GOAL", task),
            "pddl_problem": _problem_text(scene, f"plan_{trial}"),
            "solvable": False,
            "walkthrough": [],
        }
        game_dir = out / task_folder / trial
        game_dir.mkdir(parents=True, exist_ok=True)
        gamefile = game_dir / GAME_FILE
        fd, tmp = tempfile.mkstemp(dir=game_dir, suffix=".tw-pddl")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        try:
            commands = _verify(tmp, _plan(scene))
            if commands is None:
                continue
            data["solvable"], data["walkthrough"] = True, commands
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, gamefile)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if not any(game_dir.iterdir()):
                game_dir.rmdir()
                if not any(game_dir.parent.iterdir()):
                    game_dir.parent.rmdir()
        return GeneratedGame(task_type=task_type, folder=f"{task_folder}/{trial}", gamefile=str(gamefile),
                             walkthrough=commands, task=task)
    raise GenerationError(f"could not generate a solvable {task_type} game for seed={seed} index={index} "
                          f"in {_MAX_TRIES} attempts")


def generate_games(out_dir: str | os.PathLike, num: int, seed: int = 0,
                   task_types: list[str] | tuple[str, ...] | None = None) -> list[GeneratedGame]:
    """Generate `num` games cycling through `task_types` (default: all six), and a generation.json index.

    Game i has task type task_types[i % len(task_types)], so any num >= len(task_types) covers them all.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    types = list(task_types) if task_types else list(TASK_TYPES)
    unknown = [t for t in types if t not in TASK_TYPES]
    if unknown:
        raise ValueError(f"unknown ALFWorld task type(s) {unknown}; expected some of {TASK_TYPES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    games = [generate_game(out, types[i % len(types)], seed, i) for i in range(num)]
    index = {
        "generator": "rwml_jax.envs.alfworld_gen",
        "seed": seed,
        "num": num,
        "task_types": types,
        "games": [{"task_id": g.folder, "task_type": g.task_type, "task": g.task, "walkthrough": g.walkthrough}
                  for g in games],
    }
    with open(out / "generation.json", "w") as f:
        json.dump(index, f, indent=1)
    return games
