"""Tiny, fast trainer configs on the pure-Python toy env with random-init tiny models."""

from tcod_fast.tiny_settings import TINY_ENV_OVERRIDES, TINY_TRAIN_OVERRIDES
from tcod_fast.trainer.config import load_config


def tiny_overrides(output_dir, *extra):
    """The CLI's tiny settings on the toy game's smallest layout, without its cap on the tasks
    the vocabulary is built from."""
    shared = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith("env.vocab_tasks_per_split=")]
    return [f"trainer.output_dir={output_dir}", *shared, *TINY_ENV_OVERRIDES["toy"], *extra]


def tiny_config(output_dir, *extra):
    return load_config(None, tiny_overrides(output_dir, *extra))


def build_toy_tokenizer():
    from tcod_fast.trainer import build

    config = tiny_config("/tmp/unused")
    return build.build_tokenizer(config, build.build_prompter(config.env))
