"""Build environments by name: ``make_env("twx-coin")``, ``make_env("scienceworld")``...

Names:

* ``toy`` -- :class:`tcod_fast.envs.toy.KeyDoorEnv` (pure Python, no engine needed);
* ``twx-<game>`` -- :class:`tcod_fast.envs.textworld_express.TextWorldExpressEnv` for one
  TextWorld-Express game (``twx-coin``, ``twx-cookingworld``, ``twx-twc``...);
* ``scienceworld`` -- :class:`tcod_fast.envs.scienceworld.ScienceWorldEnv`;
* ``alfworld`` -- ``tcod_fast.envs.alfworld.AlfWorldEnv``.

The engines are imported only when their adapter is built, so a missing engine only
matters when used.
WebShop is not offered: its product data cannot be obtained offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tcod_fast.envs.alfworld import AlfWorldEnv
from tcod_fast.envs.base import Env
from tcod_fast.envs.scienceworld import make_scienceworld_env
from tcod_fast.envs.textworld_express import make_textworld_express_env
from tcod_fast.envs.toy import make_key_door_env

ENV_NAMES = ("toy", "twx-<game>", "scienceworld", "alfworld")


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the environment called ``name``; ``kwargs`` go to its config dataclass.

    Args:
        name: ``"toy"``, ``"twx-<game>"``, ``"scienceworld"`` or ``"alfworld"``.
        **kwargs: fields of the adapter's config (``KeyDoorConfig``,
            ``TextWorldExpressConfig``, ``ScienceWorldConfig``, ALFWorld's config).
    """
    if name == "toy":
        return make_key_door_env(**kwargs)
    if name.startswith("twx-"):
        return make_textworld_express_env(game=name[len("twx-") :], **kwargs)
    if name == "scienceworld":
        return make_scienceworld_env(**kwargs)
    if name == "alfworld":
        return AlfWorldEnv(**kwargs)
    if name == "webshop":
        raise ValueError("WebShop cannot run offline (its product data is only on Google Drive); use another env")
    raise ValueError(f"unknown env {name!r}; expected one of {ENV_NAMES}")


@dataclass
class EnvSpec:
    """A picklable recipe for an env: calling it runs ``make_env(name, **kwargs)``.

    Pass it to :class:`tcod_fast.envs.pool.EnvPool` as the env factory.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> Env:
        return make_env(self.name, **self.kwargs)
