"""Checkpoints: atomic writes survive a crash mid-write; resume continues bit for bit."""

import json
import os

import pytest
import torch
from trainer_helpers import tiny_config

from tcod_fast.errors import TcodFastWarning, UserError
from tcod_fast.trainer import checkpoint as ckpt
from tcod_fast.trainer import loop
from tcod_fast.trainer.metrics_log import read_metrics


def test_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    ckpt.save_checkpoint(folder, 1, {"step": 1, "weights": torch.arange(4.0)})
    good = (folder / "step_00000001.pt").read_bytes()

    real_save = torch.save

    def crash_half_way(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.seek(0)
        handle.truncate(10)  # a torn file...
        raise KeyboardInterrupt("simulated crash while writing")  # ...and the process dies

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, 2, {"step": 2, "weights": torch.zeros(4)})
    monkeypatch.setattr(torch, "save", real_save)

    # the final name of the crashed write never appeared, the old one is intact and 'latest' points at it
    assert not (folder / "step_00000002.pt").exists()
    assert (folder / "step_00000001.pt").read_bytes() == good
    latest = ckpt.latest_checkpoint(folder)
    assert latest.name == "step_00000001.pt"
    state = ckpt.load_checkpoint(latest)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp-")]  # the temp file was removed

    # the next save works and cleans up old checkpoints beyond keep
    ckpt.save_checkpoint(folder, 3, {"step": 3}, keep=1)
    assert sorted(p for p in os.listdir(folder) if p.endswith(".pt")) == ["step_00000003.pt"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(folder))["step"] == 3


def test_a_torn_latest_pointer_falls_back_to_the_newest_file(tmp_path):
    folder = tmp_path / "checkpoints"
    ckpt.save_checkpoint(folder, 4, {"step": 4})
    (folder / "latest").write_text("step_99999999.pt\n")  # points at a file that never landed
    assert ckpt.latest_checkpoint(folder).name == "step_00000004.pt"


def _losses(folder):
    return [r["loss"] for r in read_metrics(folder / "metrics.jsonl", kind="train")]


@pytest.mark.parametrize("algorithm", ["tcod_f2b", "guided_opd"])
def test_resume_continues_exactly(tmp_path, toy_tokenizer, algorithm):
    """N steps straight == k steps, a fresh process state, resume, N - k steps: bitwise."""
    extra = [f"curriculum.algorithm={algorithm}", "trainer.steps=4", "trainer.checkpoint_every=2", "eval.num_tasks=0", "trainer.lr_schedule=cosine"]
    straight = loop.train(tiny_config(tmp_path / "straight", *extra), tokenizer=toy_tokenizer)

    interrupted_dir = tmp_path / "interrupted"
    loop.train(tiny_config(interrupted_dir, *extra), tokenizer=toy_tokenizer, stop_after_step=3)
    # the job died after step 3's log line but before its checkpoint: keep only step 2's
    folder = interrupted_dir / "checkpoints"
    for path in folder.glob("step_*.pt"):
        if path.name != "step_00000002.pt":
            path.unlink()
    (folder / "latest").write_text("step_00000002.pt\n")
    assert len(_losses(interrupted_dir)) == 3

    torch.manual_seed(999)  # a new process would start from other RNG states
    resumed = loop.train(tiny_config(interrupted_dir, *extra), tokenizer=toy_tokenizer, resume=True)

    assert _losses(interrupted_dir) == _losses(tmp_path / "straight")  # bitwise, steps 0..3, no duplicates
    assert [r["step"] for r in read_metrics(interrupted_dir / "metrics.jsonl", kind="train")] == [0, 1, 2, 3]
    for (name, a), (_, b) in zip(straight.student.named_parameters(), resumed.student.named_parameters()):
        assert torch.equal(a, b), name
    assert straight.sampler.state_dict() == resumed.sampler.state_dict()
    assert straight.scheduler.state_dict()["last_epoch"] == resumed.scheduler.state_dict()["last_epoch"] == 4


def test_resume_without_checkpoint_says_where_it_looked(tmp_path, toy_tokenizer):
    with pytest.raises(UserError, match="resuming needs a run folder with a checkpoint, got .*empty'?, which does not exist"):
        loop.train(tiny_config(tmp_path / "empty"), tokenizer=toy_tokenizer, resume=True)
    assert not (tmp_path / "empty").exists()  # refused before anything was written


def test_a_corrupt_newest_checkpoint_and_a_torn_metrics_line_fall_back(tmp_path, toy_tokenizer):
    extra = ["trainer.steps=3", "trainer.checkpoint_every=1", "eval.num_tasks=0"]
    straight = loop.train(tiny_config(tmp_path / "straight", *extra), tokenizer=toy_tokenizer)

    run_dir = tmp_path / "damaged"
    loop.train(tiny_config(run_dir, *extra), tokenizer=toy_tokenizer, stop_after_step=2)
    newest = run_dir / "checkpoints" / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a copy cut short
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 2, "kind": "tr')  # the line a kill cut in half
    with pytest.warns(TcodFastWarning) as warned:
        resumed = loop.train(tiny_config(run_dir, *extra), tokenizer=toy_tokenizer, resume=True)
    messages = " ".join(str(w.message) for w in warned)
    assert "step_00000002.pt" in messages and "resuming from step_00000001.pt" in messages
    assert "not a JSON record" in messages

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]  # no torn line, no duplicate
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    for (name, a), (_, b) in zip(straight.student.named_parameters(), resumed.student.named_parameters()):
        assert torch.equal(a, b), name


def test_a_larger_step_count_continues_a_finished_run(tmp_path, toy_tokenizer):
    extra = ["trainer.checkpoint_every=1", "eval.num_tasks=0"]
    straight = loop.train(tiny_config(tmp_path / "straight", "trainer.steps=4", *extra), tokenizer=toy_tokenizer)
    run_dir = tmp_path / "extended"
    loop.train(tiny_config(run_dir, "trainer.steps=2", *extra), tokenizer=toy_tokenizer)
    assert (run_dir / "final" / "config.json").is_file()
    resumed = loop.train(tiny_config(run_dir, "trainer.steps=4", *extra), tokenizer=toy_tokenizer, resume=True)
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", kind="train")] == [0, 1, 2, 3]
    for (name, a), (_, b) in zip(straight.student.named_parameters(), resumed.student.named_parameters()):
        assert torch.equal(a, b), name


def test_resuming_a_finished_run_changes_nothing(tmp_path, toy_tokenizer):
    run_dir = tmp_path / "done"
    extra = ["trainer.steps=2", "trainer.checkpoint_every=1", "eval.num_tasks=1", "logging.tensorboard=true"]
    first = loop.train(tiny_config(run_dir, *extra), tokenizer=toy_tokenizer)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}
    with pytest.warns(TcodFastWarning, match="finished at step 2 .*nothing to do"):
        again = loop.train(tiny_config(run_dir, *extra), tokenizer=toy_tokenizer, resume=True)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()} == files
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", kind="eval")] == [2]  # no second final eval
    assert again.state.next_step == 2 and again.state.last_eval["success_seen"] == first.state.last_eval["success_seen"]


def test_resume_refuses_another_curriculum_or_student(tmp_path, toy_tokenizer):
    run_dir = tmp_path / "run"
    extra = ["trainer.steps=1", "eval.num_tasks=0"]
    loop.train(tiny_config(run_dir, *extra), tokenizer=toy_tokenizer)
    for change, message in (
        ("curriculum.algorithm=tcod_b2f", "keeps curriculum.algorithm='opd'.*got 'tcod_b2f'"),
        ("curriculum.eta=3", "keeps curriculum.eta=1.0.*got 3.0"),
        ("model.student_tiny.num_hidden_layers=2", "keeps model.student_tiny.num_hidden_layers=1.*got 2"),
    ):
        with pytest.raises(UserError, match=message):
            loop.train(tiny_config(run_dir, "trainer.steps=3", *extra[1:], change), tokenizer=toy_tokenizer, resume=True)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", kind="train")] == [0]


def test_a_dcp_checkpoint_saved_again_at_its_step_is_replaced(tmp_path):
    """A resumed run that saves a step it had saved: the new DCP folder takes the name, the
    old one is gone, and nothing temporary is left beside them."""
    from tcod_fast.trainer.distributed import DistContext
    from tcod_fast.trainer.sharded_checkpoint import load_meta, load_sharded, save_sharded

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    save_sharded(tmp_path, 4, model, optimizer, {"saved": "first"}, DistContext())
    with torch.no_grad():
        model.weight.add_(1.0)
    final = save_sharded(tmp_path, 4, model, optimizer, {"saved": "second"}, DistContext())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", final.name]
    meta = load_meta(final)
    assert meta["saved"] == "second"
    fresh = torch.nn.Linear(5, 3)
    load_sharded(meta, fresh, torch.optim.AdamW(fresh.parameters()), DistContext())
    torch.testing.assert_close(fresh.weight, model.weight)


def test_a_crash_while_a_dcp_step_is_saved_again_resumes_from_that_step(tmp_path):
    """Killed between moving the old step-4 folder aside and renaming the new one onto its
    name: resuming reads step 4 (not step 2), and the next save puts it back under its name."""
    from tcod_fast.trainer.distributed import DistContext
    from tcod_fast.trainer.sharded_checkpoint import save_sharded

    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    save_sharded(tmp_path, 2, model, optimizer, {"step": 2}, DistContext())
    step_4 = save_sharded(tmp_path, 4, model, optimizer, {"step": 4}, DistContext())
    # the state save_sharded leaves when the process dies between its two renames
    os.replace(step_4, tmp_path / f".tmp-{step_4.name}.replaced")
    (tmp_path / f".tmp-{step_4.name}").mkdir()

    path, state = ckpt.load_latest_checkpoint(tmp_path)
    assert state["step"] == 4 and state["sharded_path"] == str(path)
    save_sharded(tmp_path, 6, model, optimizer, {"step": 6}, DistContext(), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_4.name, "step_00000006.dcp"]
