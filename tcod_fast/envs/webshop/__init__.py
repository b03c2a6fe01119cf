"""WebShop: a text-mode web shop with the WebShop paper's pages, actions and reward.

:class:`WebShopEnv` (:mod:`.env`) plays it on a generated catalogue or on WebShop's own data
files (:mod:`.catalogue`); :mod:`.reward` is the paper's reward. Search ranks products with
BM25 (:mod:`tcod_fast.envs.retrieval`, which needs ``bm25s``).
"""

from tcod_fast.envs.webshop.catalogue import Catalogue, Goal, Product, generate_catalogue, load_webshop_data
from tcod_fast.envs.webshop.env import WebShopConfig, WebShopEnv, make_webshop_env, parse_webshop_action
from tcod_fast.envs.webshop.reward import RewardBreakdown, purchase_reward, token_set_ratio, type_match

__all__ = [
    "Catalogue",
    "Goal",
    "Product",
    "RewardBreakdown",
    "WebShopConfig",
    "WebShopEnv",
    "generate_catalogue",
    "load_webshop_data",
    "make_webshop_env",
    "parse_webshop_action",
    "purchase_reward",
    "token_set_ratio",
    "type_match",
]
