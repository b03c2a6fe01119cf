"""Tiny, fast trainer configs on the pure-Python toy env with random-init tiny models."""

from tcod_fast.trainer.config import load_config


def tiny_overrides(output_dir, *extra):
    return [
        f"trainer.output_dir={output_dir}",
        "trainer.steps=2",
        "trainer.num_threads=1",
        "trainer.micro_batch_tokens=4096",
        "trainer.lr=1e-3",
        "env.kwargs={max_rooms: 2, max_steps: 6}",
        "env.num_train_tasks=8",
        "rollout.tasks_per_step=2",
        "rollout.max_new_tokens=6",
        "curriculum.max_turns=4",
        "curriculum.eta=1",
        "curriculum.b2f_default_expert_len=6",
        "eval.num_tasks=2",
        "logging.progress=false",
        "model.student_tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, seed: 1}",
        "model.teacher_tiny={hidden_size: 48, intermediate_size: 96, num_hidden_layers: 1, seed: 2}",
        *extra,
    ]


def tiny_config(output_dir, *extra):
    return load_config(None, tiny_overrides(output_dir, *extra))


def build_toy_tokenizer():
    from tcod_fast.trainer import build

    config = tiny_config("/tmp/unused")
    return build.build_tokenizer(config, build.build_prompter(config.env))
