"""Room layouts for generated ALFWorld tasks, read from the ``alfworld`` wheel.

The wheel carries no games, but it does carry AI2-THOR's room data under
``alfworld/gen/layouts``: for each of the 120 floor plans, the receptacles with their
ids and the agent pose in front of each (``FloorPlanN-openable.json``) and the object
classes present (``FloorPlanN-objects.json``). Generated tasks are built on these rooms
so that they have ALFWorld's real receptacles, counts and names ("drawer 3",
"sinkbasin 1"), and the seen/unseen split follows ALFWorld's own: the "unseen" rooms
are the floor plans ALFRED holds out for testing (``TEST_SCENE_NUMBERS``: 1-6, 201-206,
301-306, 401-406), the "seen" rooms are the training ones.

Everything here imports ``alfworld`` lazily: callers only reach it when generating.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache

#: Room type of each floor-plan range, as in ALFRED.
ROOM_TYPE_BY_HUNDREDS = {0: "Kitchen", 2: "LivingRoom", 3: "Bedroom", 4: "Bathroom"}

#: Generator split -> which of ALFRED's scene lists it draws rooms from.
SCENE_SPLITS = ("seen", "unseen")


@dataclass(frozen=True)
class ReceptacleSpec:
    """One receptacle of a room.

    Attributes:
        thor_id: AI2-THOR's id, e.g. ``"Drawer|+01.63|+00.18|-01.21"`` or
            ``"Sink|+00.71|+00.82|-00.77|SinkBasin"``.
        receptacle_class: the ALFRED class, e.g. ``"Drawer"``, ``"SinkBasin"``.
        pose: the agent pose facing it, ``(x, z, rotation, horizon)``.
    """

    thor_id: str
    receptacle_class: str
    pose: tuple[float, float, int, int]


@dataclass(frozen=True)
class RoomLayout:
    """One AI2-THOR floor plan: its receptacles and the object classes it holds."""

    scene_num: int
    room_type: str
    receptacles: tuple[ReceptacleSpec, ...]
    object_classes: tuple[str, ...]

    @property
    def floor_plan(self) -> str:
        return f"FloorPlan{self.scene_num}"

    def receptacle_classes(self) -> set[str]:
        return {r.receptacle_class for r in self.receptacles}


def _alfworld_layouts_dir() -> str:
    try:
        import alfworld.gen
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "generating ALFWorld tasks needs the `alfworld` package (pip install alfworld==0.4.2)"
        ) from error
    return os.path.join(os.path.dirname(alfworld.gen.__file__), "layouts")


def scene_numbers(split: str) -> list[int]:
    """ALFRED's floor-plan numbers for ``split`` (``"seen"`` or ``"unseen"``)."""
    from alfworld.gen import constants

    if split == "seen":
        return sorted(constants.TRAIN_SCENE_NUMBERS)
    if split == "unseen":
        return sorted(constants.TEST_SCENE_NUMBERS)
    raise ValueError(f"split must be one of {SCENE_SPLITS}, got {split!r}")


def _receptacle_class(thor_id: str) -> str:
    # Basins carry their class as a last field: "Sink|x|y|z|SinkBasin".
    parts = thor_id.split("|")
    return parts[-1] if len(parts) > 4 else parts[0]


@cache
def load_room(scene_num: int) -> RoomLayout:
    """Read floor plan ``scene_num`` from the wheel's layout files."""
    from alfworld.gen import constants

    layouts = _alfworld_layouts_dir()
    with open(os.path.join(layouts, f"FloorPlan{scene_num}-openable.json")) as f:
        poses = json.load(f)
    with open(os.path.join(layouts, f"FloorPlan{scene_num}-objects.json")) as f:
        object_classes = json.load(f)
    known_receptacles = set(constants.RECEPTACLES)
    receptacles = []
    for thor_id, pose in sorted(poses.items()):
        receptacle_class = _receptacle_class(thor_id)
        if receptacle_class not in known_receptacles:
            continue
        x, z, rotation, horizon = pose
        receptacles.append(ReceptacleSpec(thor_id, receptacle_class, (float(x), float(z), int(rotation), int(horizon))))
    return RoomLayout(
        scene_num=scene_num,
        room_type=ROOM_TYPE_BY_HUNDREDS[scene_num // 100],
        receptacles=tuple(receptacles),
        object_classes=tuple(sorted(set(object_classes))),
    )


def rooms_for_split(split: str) -> list[RoomLayout]:
    """Every room of ``split`` that has layout files in the wheel."""
    layouts = _alfworld_layouts_dir()
    return [
        load_room(num)
        for num in scene_numbers(split)
        if os.path.exists(os.path.join(layouts, f"FloorPlan{num}-openable.json"))
    ]
