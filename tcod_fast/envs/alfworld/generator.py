"""Generator of ALFWorld-format tasks, each validated on the real TextWorld engine.

``alfworld==0.4.2`` ships the engine, the PDDL domain (``alfred.pddl``) and the text
grammar (``alfred.twl2``) but no games, and its downloader needs GitHub. This module
writes games in ALFWorld's own on-disk format so that ``alfworld``'s ``AlfredTWEnv``
(``dataset.data_path = DIR``) and :class:`tcod_fast.envs.alfworld.AlfWorldEnv` load them
like the released data:

* ``DIR/<task_type>-<Object>-None-<Parent>-<scene>-<index>/game.tw-pddl``: JSON with
  ``pddl_domain`` (the wheel's domain, verbatim), ``grammar`` (the wheel's grammar with the
  task sentence in place of ``UNKNOWN GOAL``), ``pddl_problem``, ``solvable: true`` and
  ``walkthrough`` (the validated expert actions, which TextWorld's PDDL backend reads);
* ``.../traj_data.json``: ``task_type``, ``pddl_params`` (``object_target``,
  ``parent_target``, ``toggle_target``, ``mrecep_target``, ``object_sliced``) and ``scene``,
  which is what ALFWorld's handcoded expert and ``AlfredTWEnv`` read.

A task is one of ALFWorld's six types, set in a real AI2-THOR room (see
:mod:`tcod_fast.envs.alfworld.scenes`), with the room's object classes placed at random
in receptacles that can hold them. The goal is ALFRED's own PDDL goal for the type
(``alfworld.gen.goal_library``). Before a task is kept it is loaded in TextWorld's PDDL
engine and ALFWorld's handcoded expert plays it to a win (with its tracking of placements
corrected, :func:`~tcod_fast.envs.alfworld.engine.track_moves_as_puts`, without which it
loses ``pick_two_obj_and_place`` tasks unless chance helps; Fast Downward's plan is the
fallback); tasks the engine cannot load (an unsolvable problem fails inside the
translator, e.g. ``KeyError: 'val1'``) or the experts cannot win are discarded and
resampled.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tcod_fast.envs.alfworld.engine import (
    EXPERT_HANDCODED,
    EXPERT_PLANNER,
    EnginePool,
    alfworld_domain_and_grammar,
    run_handcoded_expert,
    run_planner,
)
from tcod_fast.envs.alfworld.scenes import SCENE_SPLITS, RoomLayout, rooms_for_split

#: ALFWorld's six task types, in the order of ``alfworld``'s ``TASK_TYPES`` ids 1..6.
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

#: The appliance receptacle a state-change task needs, and its PDDL receptacle type.
APPLIANCE_BY_TASK_TYPE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}

#: Which ALFRED affordance list an object must be in for each state-change task.
AFFORDANCE_BY_TASK_TYPE = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}

#: Lamps sit on these surfaces (ALFRED's receptacle lists never name lamps, but the
#: look-at goal needs the lamp inside a receptacle the agent can walk to).
LAMP_SURFACES = ("Desk", "SideTable", "Dresser", "Shelf", "CoffeeTable", "TVStand", "DiningTable", "Ottoman")


@dataclass
class TaskGenConfig:
    """How many tasks to make and from what.

    Attributes:
        n_tasks: number of validated tasks to write.
        seed: seed of the sampler (the same config writes the same tasks).
        split: ``"seen"`` (ALFRED's training rooms) or ``"unseen"`` (its held-out rooms).
        task_types: which of :data:`TASK_TYPES` to make; tasks cycle through them in order
            so every type gets ``n_tasks / len(task_types)`` tasks (rounded).
        max_instances_per_class: each object class of the room is placed 1..this many
            times (the target class of a pick-two task at least twice).
        max_receptacles: rooms with more receptacles are skipped (bigger rooms mean longer
            episodes and slower engine steps) unless no smaller room can host the task
            type, in which case the smallest rooms that can are used; None keeps all.
        expert_max_steps: the handcoded expert gives up after this many steps.
        expert_types: experts tried in order to validate a task: ``"handcoded"``
            (ALFWorld's heuristic agent) and/or ``"planner"`` (Fast Downward).
        max_attempts_per_task: resampling budget per task before giving up with an error.
    """

    n_tasks: int = 12
    seed: int = 0
    split: str = "seen"
    task_types: tuple[str, ...] = TASK_TYPES
    max_instances_per_class: int = 2
    max_receptacles: int | None = 30
    expert_max_steps: int = 150
    expert_types: tuple[str, ...] = (EXPERT_HANDCODED, EXPERT_PLANNER)
    max_attempts_per_task: int = 30

    def __post_init__(self) -> None:
        if self.split not in SCENE_SPLITS:
            raise ValueError(f"split must be one of {SCENE_SPLITS}, got {self.split!r}")
        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown or not self.task_types:
            raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}, got {self.task_types!r}")
        bad_experts = [e for e in self.expert_types if e not in (EXPERT_HANDCODED, EXPERT_PLANNER)]
        if bad_experts or not self.expert_types:
            raise ValueError(
                f"expert_types must be a non-empty subset of ('handcoded', 'planner'), got {self.expert_types!r}"
            )
        if self.n_tasks < 0:
            raise ValueError(f"n_tasks must be >= 0, got {self.n_tasks}")
        if self.max_instances_per_class < 1:
            raise ValueError(f"max_instances_per_class must be >= 1, got {self.max_instances_per_class}")


@dataclass
class SampledTask:
    """A task before validation: the room, the goal and where every object starts.

    Attributes:
        task_type: one of :data:`TASK_TYPES`.
        room: the floor plan it is set in.
        object_target: ALFRED object class to manipulate, e.g. ``"Mug"``.
        parent_target: receptacle class to put it in (``""`` for look-at tasks).
        toggle_target: lamp class to look under (``""`` unless look-at).
        placements: ``(object thor id, receptacle thor id)`` for every object.
        task_text: the goal sentence shown to the agent.
    """

    task_type: str
    room: RoomLayout
    object_target: str
    parent_target: str
    toggle_target: str
    placements: list[tuple[str, str]]
    task_text: str


@dataclass
class GeneratedTask:
    """A validated task written to disk."""

    task_dir: str
    task_type: str
    scene_num: int
    object_target: str
    parent_target: str
    toggle_target: str
    task_text: str
    expert_type: str
    attempts: int = 1
    walkthrough: list[str] = field(default_factory=list)


def _constants():
    from alfworld.gen import constants

    return constants


def mangle_thor_id(thor_id: str) -> str:
    """AI2-THOR id -> PDDL name, the way ALFWorld's games spell them (the engine's
    demangler turns them back into "drawer 3" etc.)."""
    out = thor_id
    for char, word in (("|", "_bar_"), ("-", "_minus_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        out = out.replace(char, word)
    return out


def _location_id(pose: tuple[float, float, int, int], used: set[str]) -> str:
    x, z, rotation, horizon = pose
    base = [round(x / 0.25), round(z / 0.25), (rotation // 90) % 4, horizon]
    while True:
        name = mangle_thor_id("loc|" + "|".join(str(v) for v in base))
        if name not in used:
            used.add(name)
            return name
        # Two receptacles seen from one pose: give each its own location so that every
        # "go to <receptacle>" lands in front of exactly one receptacle.
        base[3] += 1


def _coords(thor_id: str) -> tuple[float, float, float]:
    parts = thor_id.split("|")
    return float(parts[1]), float(parts[2]), float(parts[3])


def _object_thor_id(object_class: str, receptacle_thor_id: str, used: set[str]) -> str:
    x, y, z = _coords(receptacle_thor_id)
    step = 0
    while True:
        candidate = f"{object_class}|{x + 0.01 * (step % 50):+06.2f}|{y + 0.01 * (step // 50 + 1):+06.2f}|{z:+06.2f}"
        if candidate not in used:
            used.add(candidate)
            return candidate
        step += 1


def _receptacles_for_object(room: RoomLayout, object_class: str) -> list[str]:
    """Thor ids of the room's receptacles that ALFRED allows ``object_class`` in."""
    valid = _constants().VAL_RECEPTACLE_OBJECTS
    return [r.thor_id for r in room.receptacles if object_class in valid.get(r.receptacle_class, ())]


def _pickupable_classes(room: RoomLayout) -> list[str]:
    constants = _constants()
    movable = set(constants.MOVABLE_RECEPTACLES)
    static_receptacles = set(constants.RECEPTACLES) - movable
    return [
        c
        for c in room.object_classes
        if c in constants.OBJECTS and c not in static_receptacles and _receptacles_for_object(room, c)
    ]


def _lamp_classes(room: RoomLayout) -> list[str]:
    surfaces = [r for r in room.receptacles if r.receptacle_class in LAMP_SURFACES]
    if not surfaces:
        return []
    return [c for c in room.object_classes if c in _constants().VAL_ACTION_OBJECTS["Toggleable"]]


def _room_allows(room: RoomLayout, task_type: str, max_receptacles: int | None) -> bool:
    constants = _constants()
    if max_receptacles is not None and len(room.receptacles) > max_receptacles:
        return False
    if room.room_type not in constants.GOALS_VALID[task_type]:
        return False
    appliance = APPLIANCE_BY_TASK_TYPE.get(task_type)
    if appliance and appliance not in room.receptacle_classes():
        return False
    return task_type != "look_at_obj_in_light" or bool(_lamp_classes(room))


def _task_text(task_type: str, object_target: str, parent_target: str, toggle_target: str, rng: random.Random) -> str:
    from alfworld.gen import goal_library

    template = rng.choice(goal_library.gdict[task_type]["templates"])
    return template.format(
        obj=object_target.lower(), recep=parent_target.lower(), toggle=toggle_target.lower(), mrecep=""
    )


def sample_task(
    task_type: str, rooms: Sequence[RoomLayout], rng: random.Random, config: TaskGenConfig
) -> SampledTask | None:
    """Draw one task of ``task_type`` in one of ``rooms``; None if the draw is not usable."""
    constants = _constants()
    candidates = [room for room in rooms if _room_allows(room, task_type, config.max_receptacles)]
    if not candidates:
        # The size cap is soft: a type no small room can host (heat and cool need a
        # kitchen, and the held-out kitchens are big) uses the smallest rooms that can.
        hosts = sorted(
            (room for room in rooms if _room_allows(room, task_type, None)), key=lambda r: len(r.receptacles)
        )
        if not hosts:
            raise ValueError(f"no room of this split can host a {task_type!r} task")
        candidates = [room for room in hosts if len(room.receptacles) == len(hosts[0].receptacles)]
    room = rng.choice(candidates)
    pickupable = _pickupable_classes(room)
    movable = set(constants.MOVABLE_RECEPTACLES)
    static_classes = sorted(room.receptacle_classes() - movable)

    affordance = AFFORDANCE_BY_TASK_TYPE.get(task_type)
    objects = [c for c in pickupable if "Sliced" not in c]
    if affordance:
        objects = [c for c in objects if c in constants.VAL_ACTION_OBJECTS[affordance]]
    if task_type == "look_at_obj_in_light":
        objects = [c for c in objects if c not in constants.VAL_ACTION_OBJECTS["Toggleable"]]
    if not objects:
        return None
    object_target = rng.choice(objects)

    parent_target = ""
    toggle_target = ""
    if task_type == "look_at_obj_in_light":
        toggle_target = rng.choice(_lamp_classes(room))
        if not _receptacles_for_object(room, object_target):
            return None
    else:
        appliance = APPLIANCE_BY_TASK_TYPE.get(task_type)
        valid = constants.VAL_RECEPTACLE_OBJECTS
        parents = [
            p
            for p in static_classes
            if object_target in valid.get(p, ())
            and p != appliance
            # The target must start somewhere other than a receptacle of the goal's class.
            and any(
                r.receptacle_class != p and object_target in valid.get(r.receptacle_class, ()) for r in room.receptacles
            )
        ]
        if not parents:
            return None
        parent_target = rng.choice(parents)

    placements: list[tuple[str, str]] = []
    used_ids: set[str] = set()
    for object_class in pickupable:
        allowed = _receptacles_for_object(room, object_class)
        count = rng.randint(1, config.max_instances_per_class)
        if object_class == object_target:
            # The goal's object never starts inside a receptacle of the goal's class,
            # so no task is won before the agent acts.
            by_id = {r.thor_id: r.receptacle_class for r in room.receptacles}
            allowed = [a for a in allowed if by_id[a] != parent_target]
            if task_type == "pick_two_obj_and_place":
                count = max(2, count)
        for _ in range(count):
            receptacle = rng.choice(allowed)
            placements.append((_object_thor_id(object_class, receptacle, used_ids), receptacle))
    # Lamps stand in every room that has them, not only in look-at tasks.
    surfaces = [r.thor_id for r in room.receptacles if r.receptacle_class in LAMP_SURFACES]
    for lamp_class in _lamp_classes(room):
        receptacle = rng.choice(surfaces)
        placements.append((_object_thor_id(lamp_class, receptacle, used_ids), receptacle))

    task_text = _task_text(task_type, object_target, parent_target, toggle_target, rng)
    return SampledTask(task_type, room, object_target, parent_target, toggle_target, placements, task_text)


def build_pddl_problem(task: SampledTask, problem_name: str, rng: random.Random) -> str:
    """The PDDL problem of ``task`` for ALFWorld's ``alfred`` domain, with ALFRED's goal."""
    from alfworld.gen import goal_library

    constants = _constants()
    affordances = constants.VAL_ACTION_OBJECTS
    valid = constants.VAL_RECEPTACLE_OBJECTS
    openable_classes = set(constants.OPENABLE_CLASS_LIST)
    movable = set(constants.MOVABLE_RECEPTACLES)
    # Only the types this problem uses are declared (the translator's time grows with
    # them). A PDDL name has one type: static receptacle classes are rtypes, everything
    # else (movable receptacles such as Mug or Bowl included) is an otype. The domain
    # names a few types as constants (sink basin, microwave, fridge, knives), so those
    # are always declared.
    placed_classes = {object_id.split("|")[0] for object_id, _ in task.placements}
    all_rtypes = sorted(task.room.receptacle_classes() | {"SinkBasin", "Microwave", "Fridge"})
    all_otypes = sorted((placed_classes | {"Knife", "ButterKnife"}) - set(all_rtypes))

    used_locations: set[str] = set()
    receptacle_location = {r.thor_id: _location_id(r.pose, used_locations) for r in task.room.receptacles}
    while True:
        start = mangle_thor_id(
            f"loc|{rng.randint(-20, 20)}|{rng.randint(-20, 20)}|{rng.randint(0, 3)}|{rng.choice((0, 30))}"
        )
        if start not in used_locations:
            used_locations.add(start)
            break

    objects_block = ["agent1 - agent"]
    objects_block += [f"{name}Type - otype" for name in all_otypes]
    objects_block += [f"{name}Type - rtype" for name in all_rtypes]
    objects_block += [f"{mangle_thor_id(o)} - object" for o, _ in task.placements]
    objects_block += [f"{mangle_thor_id(r.thor_id)} - receptacle" for r in task.room.receptacles]
    objects_block += [f"{loc} - location" for loc in sorted(used_locations)]

    init = [f"(atLocation agent1 {start})"]
    for r in task.room.receptacles:
        name = mangle_thor_id(r.thor_id)
        init.append(f"(receptacleType {name} {r.receptacle_class}Type)")
        init.append(f"(receptacleAtLocation {name} {receptacle_location[r.thor_id]})")
        if r.receptacle_class in openable_classes:
            init.append(f"(openable {name})")
    for rtype in sorted(task.room.receptacle_classes()):
        for otype in sorted(set(valid.get(rtype, ())) & set(all_otypes)):
            init.append(f"(canContain {rtype}Type {otype}Type)")
    toggleable = affordances["Toggleable"]
    for object_id, receptacle_id in task.placements:
        name = mangle_thor_id(object_id)
        object_class = object_id.split("|")[0]
        init.append(f"(objectType {name} {object_class}Type)")
        init.append(f"(inReceptacle {name} {mangle_thor_id(receptacle_id)})")
        init.append(f"(objectAtLocation {name} {receptacle_location[receptacle_id]})")
        if object_class not in toggleable:
            init.append(f"(pickupable {name})")
        if object_class in movable:
            init.append(f"(isReceptacleObject {name})")
        for affordance, predicate in (
            ("Cleanable", "cleanable"),
            ("Heatable", "heatable"),
            ("Coolable", "coolable"),
            ("Toggleable", "toggleable"),
            ("Sliceable", "sliceable"),
        ):
            if object_class in affordances[affordance]:
                init.append(f"({predicate} {name})")

    goal = goal_library.gdict[task.task_type]["pddl"].replace("#", "-")
    goal = goal.format(obj=task.object_target, recep=task.parent_target, toggle=task.toggle_target, mrecep="")
    indent = "\n        "
    return (
        f"(define (problem {problem_name})\n(:domain alfred)\n(:objects{indent}"
        + indent.join(objects_block)
        + "\n)\n(:init"
        + indent
        + indent.join(init)
        + "\n)\n"
        + goal
    )


def build_traj_data(task: SampledTask, task_id: str, split: str) -> dict:
    """The ``traj_data.json`` content ALFWorld's expert and loaders read."""
    return {
        "task_id": task_id,
        "task_type": task.task_type,
        "pddl_params": {
            "object_target": task.object_target,
            "parent_target": task.parent_target,
            "toggle_target": task.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "scene": {"floor_plan": task.room.floor_plan, "scene_num": task.room.scene_num},
        "split": split,
        "task_desc": task.task_text,
        "generator": "tcod_fast.envs.alfworld",
    }


def grammar_with_task(grammar: str, task_text: str) -> str:
    """The grammar with the task sentence where ALFWorld puts it."""
    if "UNKNOWN GOAL" not in grammar:
        raise ValueError("expected the ALFWorld grammar to contain the placeholder 'UNKNOWN GOAL'")
    return grammar.replace("UNKNOWN GOAL", task_text)


def _task_dir_name(task: SampledTask, index: int) -> str:
    target = task.toggle_target if task.task_type == "look_at_obj_in_light" else task.parent_target
    return f"{task.task_type}-{task.object_target}-None-{target}-{task.room.scene_num}-{index:05d}"


def _write_task(
    directory: str,
    task: SampledTask,
    problem: str,
    traj_data: dict,
    domain: str,
    grammar: str,
    walkthrough: list[str] | None,
) -> str:
    os.makedirs(directory, exist_ok=True)
    game = {
        "pddl_domain": domain,
        "grammar": grammar_with_task(grammar, task.task_text),
        "pddl_problem": problem,
        "solvable": True,
    }
    if walkthrough is not None:
        game["walkthrough"] = walkthrough
    game_file = os.path.join(directory, "game.tw-pddl")
    with open(game_file, "w") as f:
        json.dump(game, f)
    with open(os.path.join(directory, "traj_data.json"), "w") as f:
        json.dump(traj_data, f, indent=2)
    return game_file


def validate_task(pool: EnginePool, game_file: str, config: TaskGenConfig, seed: int) -> tuple[str, list[str]] | None:
    """Win ``game_file`` on the engine with the configured experts, in order.

    Returns ``(expert_type, actions)`` for the first expert that plays the game to a win
    (every action played on the real engine), or None if none does.
    """
    for expert_type in config.expert_types:
        if expert_type == EXPERT_HANDCODED:
            actions = run_handcoded_expert(pool, game_file, config.expert_max_steps, seed)
        else:
            actions = run_planner(pool, game_file)
        if actions:
            return expert_type, actions
    return None


def make_one_task(out_dir: str, index: int, config: TaskGenConfig, scratch_dir: str, pool: EnginePool) -> GeneratedTask:
    """Draw, validate and write task number ``index`` of ``config``.

    The task's draws come from its own generator seeded by ``(split, seed, index)``, so a
    task does not depend on how many draws the others needed (and tasks can be made in
    any order or in parallel). Each draw is written under ``scratch_dir``, validated on
    the engine (:func:`validate_task`) and written into ``out_dir`` only if an expert
    wins it; otherwise it is redrawn, up to ``config.max_attempts_per_task`` times.

    Raises:
        RuntimeError: no draw could be validated within the attempt budget.
    """
    domain, grammar = alfworld_domain_and_grammar()
    rooms = rooms_for_split(config.split)
    task_type = config.task_types[index % len(config.task_types)]
    rng = random.Random(f"tcod-alfworld/{config.split}/{config.seed}/{index}")
    for attempt in range(1, config.max_attempts_per_task + 1):
        task = sample_task(task_type, rooms, rng, config)
        if task is None:
            continue
        name = _task_dir_name(task, index)
        traj = build_traj_data(task, f"{config.split}/{config.seed}/{index}", config.split)
        problem = build_pddl_problem(task, f"tcod_{config.split}_{config.seed}_{index}", rng)
        game_file = _write_task(
            os.path.join(scratch_dir, f"{name}-try{attempt}"), task, problem, traj, domain, grammar, None
        )
        result = validate_task(pool, game_file, config, seed=rng.randrange(2**31))
        if result is None:
            continue
        expert_type, walkthrough = result
        traj["expert_type"] = expert_type
        final_dir = os.path.join(out_dir, name)
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        _write_task(final_dir, task, problem, traj, domain, grammar, walkthrough)
        return GeneratedTask(
            task_dir=final_dir,
            task_type=task_type,
            scene_num=task.room.scene_num,
            object_target=task.object_target,
            parent_target=task.parent_target,
            toggle_target=task.toggle_target,
            task_text=task.task_text,
            expert_type=expert_type,
            attempts=attempt,
            walkthrough=walkthrough,
        )
    raise RuntimeError(
        f"could not make a solvable {task_type!r} task in {config.max_attempts_per_task} attempts "
        f"(split={config.split!r}, seed={config.seed}, task index {index})"
    )


def _make_tasks_in_worker(out_dir: str, indices: list[int], config: TaskGenConfig) -> list[GeneratedTask]:
    pool = EnginePool()
    try:
        with tempfile.TemporaryDirectory(prefix="alfworld-gen-") as scratch:
            return [make_one_task(out_dir, index, config, scratch, pool) for index in indices]
    finally:
        pool.close()


def generate_tasks(out_dir: str, config: TaskGenConfig, progress: bool = True, workers: int = 1) -> list[GeneratedTask]:
    """Write ``config.n_tasks`` validated ALFWorld tasks under ``out_dir``, one folder each.

    Tasks cycle through ``config.task_types`` (task ``i`` has type ``task_types[i % k]``);
    see :func:`make_one_task` for how each is drawn and validated.

    Args:
        out_dir: created if missing; task folders are written directly inside it.
        config: what to generate.
        progress: show a tqdm progress bar.
        workers: processes validating tasks in parallel (each loads its own engine).

    Returns:
        The tasks, in index order.

    Raises:
        RuntimeError: a task could not be validated within the attempt budget.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(total=config.n_tasks, desc=f"alfworld tasks ({config.split})", disable=not progress)
    generated: list[GeneratedTask] = []
    try:
        if workers == 1:
            pool = EnginePool()
            try:
                with tempfile.TemporaryDirectory(prefix="alfworld-gen-") as scratch:
                    for index in range(config.n_tasks):
                        generated.append(make_one_task(out_dir, index, config, scratch, pool))
                        bar.update(1)
            finally:
                pool.close()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            chunks = [[i] for i in range(config.n_tasks)]
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
                futures = [executor.submit(_make_tasks_in_worker, out_dir, chunk, config) for chunk in chunks]
                for future in as_completed(futures):
                    generated.extend(future.result())
                    bar.update(1)
            generated.sort(key=lambda t: t.task_dir)
    finally:
        bar.close()
    return generated


def _parse_task_types(values: Sequence[str] | None) -> tuple[str, ...]:
    if not values:
        return TASK_TYPES
    names: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item.isdigit():
                # alfworld's configs number the types 1..6 in this order.
                number = int(item)
                if not 1 <= number <= len(TASK_TYPES):
                    raise ValueError(f"task type id must be in 1..{len(TASK_TYPES)}, got {number}")
                names.append(TASK_TYPES[number - 1])
            elif item in TASK_TYPES:
                names.append(item)
            else:
                raise ValueError(f"unknown task type {item!r}; expected one of {TASK_TYPES} or 1..6")
    return tuple(dict.fromkeys(names))


def cli_make_tasks(argv: list[str] | None = None) -> int:
    """``tcod-fast envs make-alfworld-tasks --out DIR --n N --seed S [--split seen|unseen]
    [--task-types ...]``: write N validated ALFWorld tasks under DIR. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="tcod-fast envs make-alfworld-tasks",
        description="Generate ALFWorld-format tasks (game.tw-pddl + traj_data.json), each won by "
        "ALFWorld's expert on the real TextWorld engine before it is kept.",
    )
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per task)")
    parser.add_argument("--n", type=int, required=True, help="number of tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split",
        choices=SCENE_SPLITS,
        default="seen",
        help="seen: ALFRED's training rooms; unseen: its held-out rooms",
    )
    parser.add_argument(
        "--task-types",
        nargs="*",
        default=None,
        help=f"task type names or alfworld ids 1..6 (default: all six: {', '.join(TASK_TYPES)})",
    )
    parser.add_argument(
        "--max-receptacles",
        type=int,
        default=TaskGenConfig.max_receptacles,
        help="prefer rooms with at most this many receptacles (smaller rooms play faster)",
    )
    parser.add_argument(
        "--max-instances-per-class",
        type=int,
        default=TaskGenConfig.max_instances_per_class,
        help="each object class of the room is placed 1..this many times",
    )
    parser.add_argument(
        "--experts",
        default=",".join(TaskGenConfig.expert_types),
        help="experts tried in order to win each task: handcoded (ALFWorld's heuristic agent, "
        "human-like exploring walkthroughs) and/or planner (Fast Downward, short optimal plans; faster)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes validating tasks in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        task_types = _parse_task_types(args.task_types)
        config = TaskGenConfig(
            n_tasks=args.n,
            seed=args.seed,
            split=args.split,
            task_types=task_types,
            max_receptacles=args.max_receptacles,
            max_instances_per_class=args.max_instances_per_class,
            expert_types=tuple(e.strip() for e in args.experts.split(",") if e.strip()),
        )
    except ValueError as error:
        parser.error(str(error))
    generated = generate_tasks(args.out, config, progress=not args.quiet, workers=args.workers)
    summary = {}
    for task in generated:
        summary[task.task_type] = summary.get(task.task_type, 0) + 1
    with open(os.path.join(args.out, "tasks.json"), "w") as f:
        json.dump([asdict(t) | {"task_dir": os.path.relpath(t.task_dir, args.out)} for t in generated], f, indent=1)
    print(
        f"wrote {len(generated)} ALFWorld tasks to {args.out}: "
        + ", ".join(f"{k}={v}" for k, v in sorted(summary.items()))
    )
    return 0
