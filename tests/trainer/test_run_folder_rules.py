"""What train() itself guarantees about a run folder, for any caller (not only the CLI): a
folder holding a run is refused without resume, TensorBoard logs are cut back on resume as
metrics.jsonl is, a model folder whose vocabulary is too small is one clear error, and the
slow start-up work (the vocabulary's expert episodes) shows progress."""

import json

import pytest
import torch
from trainer_helpers import build_toy_tokenizer, tiny_config

from tcod_fast.cli import main
from tcod_fast.errors import UserError
from tcod_fast.trainer import build, loop
from tcod_fast.trainer.metrics_log import read_metrics


def test_train_refuses_a_folder_that_holds_a_run(tmp_path, toy_tokenizer):
    run_dir = tmp_path / "run"
    loop.train(tiny_config(run_dir, "trainer.steps=1", "eval.num_tasks=0"), tokenizer=toy_tokenizer)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"trainer.output_dir must be a new run folder \(train\(\.\.\., resume=True\).*"
                                        r"which holds config.yaml, metrics.jsonl, checkpoints/, final/"):
        loop.train(tiny_config(run_dir, "trainer.steps=1", "eval.num_tasks=0"), tokenizer=toy_tokenizer)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # A folder with other things in it (not a run) is fine.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("mine")
    loop.train(tiny_config(other, "trainer.steps=1", "eval.num_tasks=0"), tokenizer=toy_tokenizer)
    assert (other / "README.txt").read_text() == "mine" and (other / "final").is_dir()


def test_tensorboard_is_cut_back_on_resume_like_metrics(tmp_path, toy_tokenizer):
    pytest.importorskip("tensorboard", reason="TensorBoard logging needs the tensorboard package (extra [tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ["trainer.steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=2", "logging.tensorboard=true"]
    run_dir = tmp_path / "run"
    loop.train(tiny_config(run_dir, *extra), tokenizer=toy_tokenizer, stop_after_step=3)
    # Killed after step 2's record but before its checkpoint: the run resumes at step 2,
    # so step 2 is logged twice unless the first copy is dropped.
    (run_dir / "checkpoints" / "step_00000003.pt").unlink()
    (run_dir / "checkpoints" / "latest").unlink()
    loop.train(tiny_config(run_dir, *extra), tokenizer=toy_tokenizer, resume=True)

    events = EventAccumulator(str(run_dir / "tensorboard"))  # purge_orphaned_data=True, as TensorBoard shows it
    events.Reload()
    train = read_metrics(run_dir / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [0, 1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    evals = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in evals] == [2, 4]
    assert [e.step for e in events.Scalars("eval/success_seen")] == [2, 4]  # the kept eval at 2 is written again


def _save_model_with_vocab(folder, vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))


def test_a_teacher_with_a_smaller_vocabulary_is_one_line(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    _save_model_with_vocab(teacher, 40)
    run_dir = tmp_path / "runs" / "refused"
    args = []
    for item in tiny_config_overrides(run_dir, f"model.teacher_path={teacher}"):
        args += ["--set", item]
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("tcod-fast train: ") and "warning:" not in line]
    assert f"the model at {teacher} must cover the run's tokenizer" in line and "got vocab_size 40" in line, line
    assert not (tmp_path / "runs").exists()


def tiny_config_overrides(run_dir, *extra):
    from trainer_helpers import tiny_overrides

    return tiny_overrides(run_dir, *extra)


def test_vocabulary_building_shows_progress(capsys):
    config = tiny_config("/tmp/unused", "logging.progress=true")
    tokenizer = build.build_tokenizer(config, build.build_prompter(config.env))
    bar = capsys.readouterr().err
    per_split = config.env.vocab_tasks_per_split
    assert "vocabulary from toy expert episodes" in bar, bar
    total = sum(min(len(t), per_split or len(t)) for t in build.env_task_splits(config.env).values())
    assert f"{total}/{total}" in bar, bar
    # The same vocabulary as without the bar.
    assert json.dumps(tokenizer.get_vocab(), sort_keys=True) == json.dumps(build_toy_tokenizer().get_vocab(), sort_keys=True)
