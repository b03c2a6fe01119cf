"""WebShop: the paper's reward on hand-worked purchases, the shop's pages and actions, the generated
catalogue (its expert wins every goal of every split), and WebShop's own data files."""

import dataclasses
import itertools
import json

import pytest

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'tcod-fast[envs]')")

from tcod_fast.envs import SPLITS, Env, make_env  # noqa: E402
from tcod_fast.envs.webshop import (  # noqa: E402
    WebShopConfig,
    WebShopEnv,
    generate_catalogue,
    load_webshop_data,
    parse_webshop_action,
    purchase_reward,
    token_set_ratio,
    type_match,
)
from tcod_fast.envs.webshop.catalogue import KINDS, UNSEEN_KINDS, missing_webshop_files  # noqa: E402
from tcod_fast.envs.webshop.reward import FUZZY_MATCH_THRESHOLD  # noqa: E402

SKIN_CARE = "Beauty & Personal Care › Skin Care › Face Moisturizers"
GOAL = {
    "name": "Aldora Face Cream, Dry Skin",  # content words: aldora face cream dry skin
    "query": "face moisturizer",
    "product_category": SKIN_CARE,
    "attributes": ["dry skin", "fragrance free"],
    "goal_options": ["regular"],
    "price_upper": 30.0,
}
PRODUCT = {
    "title": "Brevik Face Cream, Dry Skin",
    "query": "face moisturizer",
    "product_category": SKIN_CARE,
    "attributes": ["dry skin", "fragrance free"],
    "features": ["Dry skin."],
    "description": "A cream.",
}


def _product(**changes):
    return {**PRODUCT, **changes}


# ------------------------------------------------------------------ the reward, by hand


def test_token_set_ratio_ignores_order_repeats_and_subsets():
    assert token_set_ratio("Fragrance-Free", "free fragrance") == 100
    assert token_set_ratio("x-large", "large") == 100  # a subset of words is a full match, as in WebShop
    # no shared word: difflib's ratio of "navy" and "black" is 2 * 1 / 9
    assert token_set_ratio("navy", "black") == 22
    # shared "liter": "liter" against "liter half" is 2 * 5 / 15
    assert token_set_ratio("half liter", "one liter") < FUZZY_MATCH_THRESHOLD
    assert token_set_ratio("", "red") == 0


def test_a_perfect_purchase_earns_one_and_each_missing_term_costs_a_share():
    full = purchase_reward(PRODUCT, GOAL, 20.0, {"size": "regular"})
    assert (full.attribute_matches, full.option_matches, full.price_ok, full.r_type) == (2, 1, True, 1.0)
    assert full.reward == 1.0 and full.score == 100.0
    # 2 attributes + 1 option + the price = 4 terms, each a quarter
    assert purchase_reward(PRODUCT, GOAL, 20.0, {}).reward == 0.75  # the option not chosen
    assert purchase_reward(PRODUCT, GOAL, 20.0, {"size": "travel"}).reward == 0.75  # the wrong option
    over = purchase_reward(PRODUCT, GOAL, 30.01, {"size": "regular"})
    assert not over.price_ok and over.reward == 0.75
    assert purchase_reward(PRODUCT, GOAL, 30.0, {"size": "regular"}).price_ok  # "lower than" includes the bound
    no_attribute = _product(attributes=["dry skin"])
    assert purchase_reward(no_attribute, GOAL, 20.0, {"size": "regular"}).reward == 0.75
    assert purchase_reward(_product(attributes=[], features=[]), GOAL, 40.0, {}).reward == pytest.approx(0.25)  # "dry skin" in the title


def test_attributes_match_fuzzily_or_through_the_texts():
    fuzzy = _product(attributes=["Dry-Skin", "free of fragrance"], features=[])
    # "free of fragrance" has every word of "fragrance free" plus one: token-set ratio 100
    assert purchase_reward(fuzzy, GOAL, 20.0, {"size": "regular"}).attribute_matches == 2
    for where in ({"features": ["Fragrance free formula."]}, {"description": "Fragrance free and light."}):
        product = _product(attributes=["dry skin"], **where)
        assert purchase_reward(product, GOAL, 20.0, {"size": "regular"}).attribute_matches == 2, where


def test_the_type_factor_takes_each_of_its_four_values():
    other = {"query": "hair extensions", "product_category": "Beauty & Personal Care › Hair Care › Hair Extensions"}
    # a shared query, two shared category levels or over a fifth of the title's words: 1
    assert type_match(_product(title="Brevik Face Cream"), GOAL) == 1.0  # 2 of 5 words
    assert type_match(_product(title="Brevik Night Cream"), GOAL) == 1.0  # 1 of 5, but the same query
    assert type_match(_product(title="Brevik Night Cream", query="x", product_category=SKIN_CARE), GOAL) == 1.0
    # none of them, with a fifth of the words shared (0.2 is not over 0.2): 0.5
    half = _product(title="Brevik Night Cream", **other)
    assert type_match(half, GOAL) == 0.5
    assert purchase_reward(half, GOAL, 20.0, {"size": "regular"}).reward == 0.5
    # under a tenth of the goal title's words: 0.1, whatever else matches
    long_goal = {**GOAL, "name": "Aldora Face Cream Dry Skin Night Formula Jar Vitamin Aloe Shea"}  # 11 words
    assert type_match(_product(title="Brevik Shea Wallet"), long_goal) == 0.1
    # no word shared: 0, and so is the reward
    assert type_match(_product(title="Galvo Leather Wallet"), GOAL) == 0.0
    assert purchase_reward(_product(title="Galvo Leather Wallet"), GOAL, 20.0, {"size": "regular"}).reward == 0.0


# ------------------------------------------------------------------ the shop


@pytest.fixture(scope="module")
def env():
    return make_env("webshop")


def test_the_expert_wins_every_generated_goal_of_every_split(env):
    assert isinstance(env, Env)
    for split in SPLITS:
        tasks = env.list_tasks(split)
        assert len(tasks) == WebShopConfig().num_tasks[split]
        for task in tasks:
            env.reset(task)
            actions = env.expert_actions()
            assert actions[0].startswith("search[") and actions[-1] == "click[buy now]"
            for action in actions:
                step = env.step(action)
            assert step.done and step.won and step.reward == 1.0 and step.info["score"] == 100.0, (task, actions)


def test_unseen_goals_are_on_held_out_kinds():
    catalogue = generate_catalogue(seed=3, products_per_kind=5, goals_per_split={s: 30 for s in SPLITS})
    unseen_categories = {KINDS[i].category for i in UNSEEN_KINDS}
    assert {p.product_category for p in catalogue.products} == {kind.category for kind in KINDS}  # the shop sells all
    for split, goals in catalogue.goals.items():
        held_out = {goal.product_category in unseen_categories for goal in goals}
        assert held_out == {split == "valid_unseen"}, split


def test_generated_goals_can_be_met_and_their_pools_never_blur():
    catalogue = generate_catalogue(seed=0, products_per_kind=6, goals_per_split={"train": 40})
    for goal in catalogue.goals["train"]:
        product = catalogue.by_asin[goal.asin]
        chosen = {name: value for name, value in zip(product.options, goal.goal_options)}
        assert purchase_reward(product.as_dict(), goal.as_dict(), product.price, chosen).reward == 1.0
        assert goal.instruction.endswith(f"price lower than {goal.price_upper:.2f} dollars")
    # Two values of one option, or two attributes of one kind, never count as the same.
    for kind in KINDS:
        for pool in (kind.attributes, *kind.options.values()):
            for a, b in itertools.combinations(pool, 2):
                assert token_set_ratio(a, b) <= FUZZY_MATCH_THRESHOLD, (kind.query, a, b)


def test_episodes_are_the_same_under_a_seed_and_differ_across_seeds():
    def play(seed):
        shop = WebShopEnv(WebShopConfig(seed=seed, products_per_kind=5, num_tasks={"train": 3}))
        first = shop.reset("webshop/train/2")
        return [first.observation] + [shop.step(a).observation for a in shop.expert_actions()]

    assert play(1) == play(1)
    assert play(1) != play(2)


def test_pages_buttons_and_paging(env):
    first = env.reset("webshop/train/0")
    instruction = first.task_text
    assert first.observation == f"WebShop [SEP] Instruction: [SEP] {instruction} [SEP] Search"
    assert first.admissible_actions == ["search[<your query>]"]
    results = env.step("search[cream]")
    assert f"[SEP] {instruction} [SEP] Back to Search [SEP] Page 1 (Total results: " in results.observation
    assert "< Prev" not in results.observation and "Next >" in results.observation
    clicks = [a for a in results.admissible_actions if a.startswith("click[b0")]
    assert len(clicks) == 10 and results.admissible_actions[:2] == ["click[back to search]", "click[next >]"]
    page_two = env.step("click[Next >]")  # buttons are matched in any case
    assert "Page 2 " in page_two.observation and "click[< prev]" in page_two.admissible_actions
    assert env.step("click[< prev]").admissible_actions == results.admissible_actions
    item = env.step(clicks[0])
    for button in ("click[< prev]", "click[description]", "click[features]", "click[reviews]", "click[buy now]"):
        assert button in item.admissible_actions
    assert "Price: $" in item.observation and item.observation.endswith("Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
    reviews = env.step("click[reviews]")
    assert "/5: " in reviews.observation and reviews.admissible_actions == ["click[back to search]", "click[< prev]"]
    assert env.step("click[< prev]").observation == item.observation
    assert env.step("click[back to search]").observation == first.observation


def test_malformed_actions_change_nothing_and_say_why(env):
    start = env.reset("webshop/valid_seen/1")
    for action, reason in [
        ("buy the cheapest one", "'buy the cheapest one' is neither search[<query>] nor click[<button>]"),
        ("click[buy now]", "there is no 'buy now' button on this page"),
        ("search[]", "search[...] needs a query"),
    ]:
        step = env.step(action)
        assert step.info["invalid_action"] and not step.done and step.reward == 0.0
        assert step.observation == f"Invalid action: {reason}. [SEP] {start.observation}"
        assert step.admissible_actions == start.admissible_actions
    env.step("search[tea]")
    wrong_page = env.step("search[shoes]")
    assert "works on the search page only" in wrong_page.observation and wrong_page.info["invalid_action"]
    assert parse_webshop_action("  Click[ Next  > ] ") == ("click", "next >")
    assert parse_webshop_action("search[Red Shoes]") == ("search", "Red Shoes")
    assert parse_webshop_action("open door") is None


def test_buying_without_the_options_costs_their_share(env):
    env.reset("webshop/train/3")
    actions = env.expert_actions()
    item_click = next(i for i, a in enumerate(actions) if a.startswith("click[b0"))
    for action in actions[: item_click + 1]:
        env.step(action)
    bought = env.step("click[buy now]")
    terms = bought.info["reward_terms"]
    assert bought.done and not bought.won
    assert terms["option_matches"] == 0 and terms["num_options"] >= 1 and terms["r_type"] == 1.0
    expected = (terms["attribute_matches"] + terms["price_ok"]) / (terms["num_attributes"] + terms["num_options"] + 1)
    assert bought.reward == pytest.approx(expected) and bought.info["score"] == pytest.approx(100 * expected)
    assert env.step("search[x]").observation == "The episode is over."


def test_the_step_limit_ends_an_episode_unbought():
    shop = WebShopEnv(WebShopConfig(products_per_kind=2, num_tasks={"train": 1}, max_steps=3))
    shop.reset("webshop/train/0")
    steps = [shop.step(action) for action in ("look around", "search[tea]", "click[back to search]")]
    assert [s.done for s in steps] == [False, False, True] and steps[-1].info["truncated"] and steps[-1].reward == 0.0


def test_bad_task_ids_and_settings_are_one_line():
    shop = WebShopEnv(WebShopConfig(products_per_kind=2, num_tasks={"train": 1}))
    with pytest.raises(ValueError, match="look like 'webshop/<split>/<index>'"):
        shop.reset("train/0")
    with pytest.raises(ValueError, match="has 1 goals"):
        shop.reset("webshop/train/1")
    with pytest.raises(ValueError, match="num_tasks keys must be among"):
        WebShopConfig(num_tasks={"test": 3})


# ------------------------------------------------------------------ WebShop's own files


def _write_webshop_files(folder, human=True):
    products = [
        {
            "asin": "B09ABC1234", "name": "Lumen Wireless Headphones with Mic",
            "full_description": "Over-ear headphones with a long battery life.",
            "small_description": ["Noise cancelling", "40 hour battery"], "pricing": "$45.99",
            "customization_options": {"Color": [{"value": "Black", "image": None}, {"value": "Navy/White", "image": None}]},
            "product_category": "Electronics › Headphones › Over-Ear Headphones", "query": "Wireless Headphones",
            "category": "electronics", "images": [""],
        },
        {
            "asin": "B07XYZ9876", "name": "Cozy Memory Foam Pillow", "full_description": "A pillow.",
            "small_description": "Washable cover", "pricing": "$19.00 to $29.00", "customization_options": {},
            "product_category": "Home & Kitchen › Bedding › Pillows", "query": "memory foam pillow",
            "category": "garden", "images": [""],
        },
        {"asin": "nan", "name": "broken row"},
    ]
    attributes = {
        "B09ABC1234": {"attributes": ["noise cancelling", "long battery life"],
                       "instruction": "i want noise cancelling headphones", "instruction_attributes": ["noise cancelling"]},
        "B07XYZ9876": {"attributes": ["washable cover"],
                       "instruction": "i want a pillow with a washable cover", "instruction_attributes": ["washable cover"]},
    }
    (folder / "items_shuffle_1000.json").write_text(json.dumps(products))
    (folder / "items_ins_v2_1000.json").write_text(json.dumps(attributes))
    if human:
        human_goals = {"B09ABC1234": [{"asin": "B09ABC1234", "instruction": "i need navy white wireless headphones.",
                                       "instruction_attributes": ["noise cancelling"],
                                       "instruction_options": ["navy | white"]}] * 8}
        (folder / "items_human_ins.json").write_text(json.dumps(human_goals))


def test_webshops_own_files_are_read_in_its_format(tmp_path):
    _write_webshop_files(tmp_path)
    catalogue = load_webshop_data(str(tmp_path), seed=0)
    assert [p.asin for p in catalogue.products] == ["B09ABC1234", "B07XYZ9876"]  # "nan" is skipped
    headphones, pillow = catalogue.products
    assert headphones.options == {"color": ("black", "navy | white")} and headphones.price == 45.99
    assert headphones.query == "wireless headphones" and headphones.features == ("Noise cancelling", "40 hour battery")
    assert 19.0 <= pillow.price <= 29.0 and pillow.features == ("Washable cover",)
    goals = [g for split in SPLITS for g in catalogue.goals[split]]
    assert len(goals) == 8 and {len(catalogue.goals[s]) for s in ("valid_seen", "valid_unseen")} == {2}
    goal = goals[0]
    assert goal.instruction.startswith("i need navy white wireless headphones, and price lower than ")
    assert goal.goal_options == ("navy | white",) and goal.attributes == ("noise cancelling",) and goal.price_upper > 45.99
    # Played through the environment, the expert buys it with its option.
    shop = make_env("webshop", data_path=str(tmp_path))
    shop.reset("webshop/train/0")
    assert shop.expert_actions()[-2:] == ["click[navy | white]", "click[buy now]"]
    for action in shop.expert_actions():
        step = shop.step(action)
    assert step.won


def test_without_human_goals_the_synthetic_ones_are_used(tmp_path):
    _write_webshop_files(tmp_path, human=False)
    catalogue = load_webshop_data(str(tmp_path), seed=0)
    texts = sorted(g.instruction.split(",")[0] for split in SPLITS for g in catalogue.goals[split])
    assert texts == ["i want a pillow with a washable cover", "i want noise cancelling headphones"]


def test_a_missing_data_file_is_one_line(tmp_path):
    from tcod_fast.envs import check_env_settings

    (tmp_path / "items_shuffle.json").write_text("[]")
    problem = missing_webshop_files(str(tmp_path))
    assert problem.startswith("env.kwargs.data_path must hold WebShop's items_ins_v2*.json") and "\n" not in problem
    with pytest.raises(ValueError, match="items_ins_v2"):
        check_env_settings("webshop", {"data_path": str(tmp_path)})
    with pytest.raises(ValueError, match="which is not a folder"):
        check_env_settings("webshop", {"data_path": str(tmp_path / "nowhere")})
    check_env_settings("webshop", {})  # the generated catalogue needs no file
    assert dataclasses.fields(WebShopConfig)[0].name == "data_path"
