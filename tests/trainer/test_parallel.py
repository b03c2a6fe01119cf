"""trainer.parallelism=ddp|fsdp2 with 2 CPU processes (gloo): the same training as 1 process,
sharded DCP checkpoints that resume exactly and onto another number of processes, and a
process killed mid-checkpoint that leaves the previous checkpoint loadable.

Rollouts are greedy (temperature 0), so every process plays the same episodes a single
process would, whatever the split of tasks between processes; 3 tasks on 2 processes give
them different numbers of micro-batches (one episode each), which FSDP2 pads.
"""

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from float32_tolerances import trained_loss_tolerance, weights_tolerance
from trainer_helpers import tiny_config, tiny_overrides

from tcod_fast.errors import ConfigError
from tcod_fast.trainer import build, loop
from tcod_fast.trainer.checkpoint import load_latest_checkpoint
from tcod_fast.trainer.config import load_config
from tcod_fast.trainer.metrics_log import read_metrics

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)

STEPS = 4


def _extra(parallelism, algorithm="tcod_f2b", *more):
    extra = [
        f"curriculum.algorithm={algorithm}",
        f"trainer.parallelism={parallelism}",
        f"trainer.steps={STEPS}",
        "trainer.checkpoint_every=2",
        "trainer.micro_batch_tokens=1",  # one episode per micro-batch: 2 on one process, 1 on the other
        "rollout.tasks_per_step=3",
        "rollout.temperature=0",
        "rollout.teacher_temperature=0",
        "eval.num_tasks=2",
        "eval.temperature=0",
        "model.student_tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, seed: 1}",
        *more,
    ]
    if algorithm == "tcod_f2b":
        extra.append("loss.fused_linear=always")  # the LM head read by the fused op is FSDP2's gathered one
    return extra


def _losses(folder):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(folder, "metrics.jsonl"), kind="train")}


def _assert_trains_alike(got_folder, expected_folder, vocab_size, updates_per_step=1):
    """Per-step losses and exported weights of two runs that do the same arithmetic in other
    summation orders (other processes, FSDP2 vs DDP), within float32's bounds for the sums
    each value went through (tests/float32_tolerances.py)."""
    records = read_metrics(os.path.join(expected_folder, "metrics.jsonl"), kind="train")
    got, expected = _losses(got_folder), {r["step"]: r["loss"] for r in records}
    assert sorted(got) == sorted(expected)
    tokens = max(int(r["trained_tokens"]) for r in records)
    for step, loss in expected.items():
        updates = (step + 1) * updates_per_step
        assert got[step] == pytest.approx(loss, **trained_loss_tolerance(vocab_size, tokens, updates)), step
    expected_params = _final_params(expected_folder)
    largest = max(float(p.abs().max()) for p in expected_params.values())
    lr = max(r["lr"] for r in records)
    atol = weights_tolerance(tokens, len(records) * updates_per_step, lr, largest)
    _assert_close_params(_final_params(got_folder), expected_params, atol=atol)


def _final_params(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "final"), local_files_only=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_close_params(got, expected, atol):
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join_group(rank, world_size, port, *, create=True):
    """torchrun's environment for this process; with ``create``, the process group too (the
    test's own, which the trainer uses and leaves to it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if create:
        torch.distributed.init_process_group("gloo")


def _fsdp2_worker(rank, world_size, port, root):
    _join_group(rank, world_size, port)
    tokenizer = build.load_tokenizer(os.path.join(root, "tokenizer"))
    extra = _extra("fsdp2")
    padding = 0
    # 4 steps straight
    run = loop.train(tiny_config(os.path.join(root, "two"), *extra), tokenizer=tokenizer)
    assert loop.parallel.is_sharded(run.student) and loop.parallel.is_sharded(run.teacher)
    padding += sum(r.get("padding_micro_batches", 0) for r in run.state.history)
    # 2 steps, then a resume for 2 more (a fresh RNG state, as in a new process)
    loop.train(tiny_config(os.path.join(root, "split"), *extra), tokenizer=tokenizer, stop_after_step=2)
    if rank == 0:
        shutil.copytree(os.path.join(root, "split"), os.path.join(root, "split_for_one"))
    torch.manual_seed(1000 + rank)
    loop.train(tiny_config(os.path.join(root, "split"), *extra), tokenizer=tokenizer, resume=True)
    # resume a checkpoint written by one process
    loop.train(tiny_config(os.path.join(root, "one"), *extra), tokenizer=tokenizer, resume=True)
    with open(os.path.join(root, f"padding{rank}.json"), "w") as handle:
        json.dump(padding, handle)
    torch.distributed.destroy_process_group()


def _spawn(worker, root):
    mp.spawn(worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)


def test_fsdp2_matches_one_process_and_resumes_exactly_on_any_world_size(tmp_path, toy_tokenizer):
    toy_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    extra = _extra("fsdp2")
    # one process (no process group: a plain model, sharded DCP checkpoints)
    loop.train(tiny_config(tmp_path / "ref", *extra), tokenizer=toy_tokenizer)
    loop.train(tiny_config(tmp_path / "one", *extra), tokenizer=toy_tokenizer, stop_after_step=2)
    assert (tmp_path / "ref" / "checkpoints" / "step_00000004.dcp" / ".metadata").is_file()

    _spawn(_fsdp2_worker, tmp_path)

    vocab_size = len(toy_tokenizer)
    assert sorted(_losses(tmp_path / "ref")) == list(range(STEPS))
    assert sum(json.loads((tmp_path / f"padding{r}.json").read_text()) for r in (0, 1)) > 0  # counts were uneven
    # 2 processes vs 1: the same training up to the order of float32 sums
    _assert_trains_alike(tmp_path / "two", tmp_path / "ref", vocab_size)
    # 2 + resume 2 on 2 processes == 4 straight, bitwise
    assert _losses(tmp_path / "split") == _losses(tmp_path / "two")
    _assert_close_params(_final_params(tmp_path / "split"), _final_params(tmp_path / "two"), atol=0)
    # 1 -> 2 processes
    _assert_trains_alike(tmp_path / "one", tmp_path / "ref", vocab_size)
    # 2 -> 1 process
    torch.manual_seed(999)
    loop.train(tiny_config(tmp_path / "split_for_one", *extra), tokenizer=toy_tokenizer, resume=True)
    _assert_trains_alike(tmp_path / "split_for_one", tmp_path / "ref", vocab_size)


DDP_EXTRA = ("curriculum.episodes_per_task=2", "trainer.steps=2")


def _ddp_worker(rank, world_size, port, root):
    _join_group(rank, world_size, port)
    tokenizer = build.load_tokenizer(os.path.join(root, "tokenizer"))
    loop.train(tiny_config(os.path.join(root, "two"), *_extra("ddp", "atod", *DDP_EXTRA)), tokenizer=tokenizer)
    torch.distributed.destroy_process_group()


def test_ddp_matches_one_process(tmp_path, toy_tokenizer):
    """GRPO groups split across processes, PPO and the full-vocabulary KL; replicated models."""
    toy_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    loop.train(tiny_config(tmp_path / "ref", *_extra("ddp", "atod", *DDP_EXTRA)), tokenizer=toy_tokenizer)
    _spawn(_ddp_worker, tmp_path)
    assert sorted(_losses(tmp_path / "ref")) == [0, 1]
    _assert_trains_alike(tmp_path / "two", tmp_path / "ref", len(toy_tokenizer))


SEVERAL_UPDATES = (*DDP_EXTRA, "trainer.updates_per_step=2")


def _several_updates_worker(rank, world_size, port, root):
    _join_group(rank, world_size, port)
    tokenizer = build.load_tokenizer(os.path.join(root, "tokenizer"))
    for parallelism in ("ddp", "fsdp2"):
        extra = _extra(parallelism, "atod", *SEVERAL_UPDATES)
        loop.train(tiny_config(os.path.join(root, parallelism), *extra), tokenizer=tokenizer)
    # bfloat16 compute over float32 master weights, and a teacher kept whole on every process
    extra = _extra("fsdp2", "atod", *SEVERAL_UPDATES, "trainer.fsdp_param_dtype=bfloat16", "trainer.fsdp_teacher=whole")
    run = loop.train(tiny_config(os.path.join(root, "fsdp2_bf16"), *extra), tokenizer=tokenizer)
    assert loop.parallel.is_sharded(run.student) and not loop.parallel.is_sharded(run.teacher)
    torch.distributed.destroy_process_group()


def test_fsdp2_trains_like_ddp_with_several_ppo_updates_per_step(tmp_path, toy_tokenizer):
    """Two PPO updates per step: the rollout policy's log-probs are computed mini-batch by
    mini-batch before any update, and FSDP2 pads those passes as well as the training ones
    (the processes hold 4 and 2 episodes). FSDP2 then trains as DDP does on the same two
    processes, and so, within bfloat16's precision, does FSDP2 computing in bfloat16 with a whole teacher."""
    toy_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    _spawn(_several_updates_worker, tmp_path)
    ddp = _losses(tmp_path / "ddp")
    assert sorted(ddp) == [0, 1]
    _assert_trains_alike(tmp_path / "fsdp2", tmp_path / "ddp", len(toy_tokenizer), updates_per_step=2)
    # bfloat16 compute: the same training within bfloat16's precision, float32 weights exported
    # (measured: losses within 5%, weights within 0.008)
    assert _losses(tmp_path / "fsdp2_bf16") == pytest.approx(ddp, rel=0.15)
    bf16_params = _final_params(tmp_path / "fsdp2_bf16")
    assert {p.dtype for p in bf16_params.values()} == {torch.float32}
    _assert_close_params(bf16_params, _final_params(tmp_path / "ddp"), atol=0.03)


def _train_and_die_in_second_checkpoint(folder, tokenizer_dir):
    """Train with a checkpoint every step; SIGKILL this process while DCP writes the second."""
    import torch.distributed.checkpoint as dcp

    tokenizer = build.load_tokenizer(tokenizer_dir)
    real_save, calls = dcp.save, []

    def save_then_die(state, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            real_save(state, **kwargs)  # the shards are on disk, the checkpoint is not committed
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(state, **kwargs)

    dcp.save = save_then_die
    extra = [*_extra("fsdp2"), "trainer.checkpoint_every=1", "eval.num_tasks=0", "rollout.tasks_per_step=1"]
    loop.train(tiny_config(folder, *extra), tokenizer=tokenizer)


def test_parallelism_is_checked_by_name():
    with pytest.raises(ConfigError, match="trainer.parallelism must be one of ddp, fsdp2, got 'zero3'"):
        tiny_config("/tmp/unused", "trainer.parallelism=zero3")


def test_a_process_killed_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path, toy_tokenizer):
    toy_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    folder = tmp_path / "run"
    # a fresh interpreter (spawn): SIGKILL must not take the test runner with it
    process = multiprocessing.get_context("spawn").Process(
        target=_train_and_die_in_second_checkpoint, args=(str(folder), str(tmp_path / "tokenizer"))
    )
    process.start()
    process.join(timeout=600)
    if process.exitcode is None:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL
    checkpoints = folder / "checkpoints"
    assert [p.name for p in checkpoints.glob("step_*")] == ["step_00000001.dcp"]
    assert [p.name for p in checkpoints.glob(".tmp-*")] == [".tmp-step_00000002.dcp"]  # the torn write
    path, state = load_latest_checkpoint(checkpoints)
    assert path.name == "step_00000001.dcp" and state["step"] == 1
    # resuming loads it and trains on; the torn folder is cleaned by the next save
    extra = [*_extra("fsdp2"), "trainer.checkpoint_every=1", "eval.num_tasks=0", "rollout.tasks_per_step=1", "trainer.steps=2"]
    run = loop.train(tiny_config(folder, *extra), tokenizer=toy_tokenizer, resume=True)
    assert run.state.next_step == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001.dcp", "step_00000002.dcp"]


class _StopHere(Exception):
    pass


def _exit_paths_worker(rank, world_size, ports, root):
    """``train`` destroys the process group it created on each way out; a group the caller
    created stays the caller's. Each group meets on a port of its own: a store that was just
    closed on one port can still be reached by the other process for a moment."""
    _join_group(rank, world_size, ports[0], create=False)  # as under torchrun: train creates the group
    tokenizer = build.load_tokenizer(os.path.join(root, "tokenizer"))
    extra = (*_extra("ddp", "opd"), "trainer.steps=2", "eval.num_tasks=0")
    alive = {}
    loop.train(tiny_config(os.path.join(root, "normal"), *extra), tokenizer=tokenizer)
    alive["normal end"] = torch.distributed.is_initialized()
    real_rollout = loop.rollout
    for name, raised, port in (("error", _StopHere("stop"), ports[1]), ("interrupt", KeyboardInterrupt(), ports[2])):
        os.environ["MASTER_PORT"] = str(port)

        def rollout_then_stop(run, step, raised=raised):
            if step == 1:
                raise raised
            return real_rollout(run, step)

        loop.rollout = rollout_then_stop
        try:
            loop.train(tiny_config(os.path.join(root, name), *extra), tokenizer=tokenizer)
        except (_StopHere, KeyboardInterrupt):
            alive[name] = torch.distributed.is_initialized()
        finally:
            loop.rollout = real_rollout
    os.environ["MASTER_PORT"] = str(ports[3])
    torch.distributed.init_process_group("gloo")  # the caller's own group
    loop.train(tiny_config(os.path.join(root, "callers"), *extra), tokenizer=tokenizer)
    alive["caller's group after train"] = torch.distributed.is_initialized()
    torch.distributed.destroy_process_group()
    with open(os.path.join(root, f"alive{rank}.json"), "w") as handle:
        json.dump(alive, handle)


def test_train_destroys_the_process_group_it_created_on_every_exit(tmp_path, toy_tokenizer):
    toy_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    mp.spawn(_exit_paths_worker, args=(2, [_free_port() for _ in range(4)], str(tmp_path)), nprocs=2, join=True)
    expected = {"normal end": False, "error": False, "interrupt": False, "caller's group after train": True}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"alive{rank}.json").read_text()) == expected


@pytest.mark.slow
def test_the_readme_torchrun_command_exits_cleanly_under_load(tmp_path):
    """A few runs of tests/trainer/torchrun_exit_stress.py (run it with --runs 50 by hand):
    every process of the README's torchrun command exits with 0, none aborts at shutdown."""
    script = os.path.join(os.path.dirname(__file__), "torchrun_exit_stress.py")
    out = subprocess.run(
        [sys.executable, script, "--runs", "3", "--load", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


# Sampled rollouts at the default temperature and several updates per step: each episode
# samples from its own generators (seeded by the step and its index in the step) and the
# mini-batches are cut from the step's episode order, so the processes split the same work.
SAMPLED = ("trainer.steps=2", "trainer.updates_per_step=2", "rollout.tasks_per_step=3", "curriculum.episodes_per_task=3",
           "trainer.micro_batch_tokens=1", "eval.num_tasks=0",
           "model.student_tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, seed: 1}")


# Several environments, one teacher each (kept whole on every process under FSDP2).
SEVERAL_ENVS = (
    "env.num_train_tasks=null",
    "envs=[{name: toy, kwargs: {max_rooms: 2, max_steps: 6}, num_train_tasks: 8, weight: 2},"
    " {name: alchemy, kwargs: {max_ingredients: 2, max_steps: 8}, num_train_tasks: 8}]",
    "teachers=[{name: keys, envs: [toy]}, {name: brews, envs: [alchemy]}]",
)


def _sampled_config(folder, layout, *extra):
    if layout == "one_env":
        return tiny_config(folder, *SAMPLED, *extra)
    shared = [o for o in tiny_overrides(folder) if not o.startswith("env.kwargs=")]
    return load_config(None, [*shared, *SAMPLED, *SEVERAL_ENVS, *extra])


def _sampled_worker(rank, world_size, port, root):
    _join_group(rank, world_size, port)
    for layout in ("one_env", "several_envs"):
        tokenizer = build.load_tokenizer(os.path.join(root, layout, "tokenizer"))
        for parallelism in ("ddp", "fsdp2"):
            folder = os.path.join(root, layout, parallelism)
            extra = [f"trainer.parallelism={parallelism}"]
            if layout == "several_envs" and parallelism == "fsdp2":
                extra.append("trainer.fsdp_teacher=whole")
            loop.train(_sampled_config(folder, layout, *extra), tokenizer=tokenizer)
    torch.distributed.destroy_process_group()


def test_sampled_rollouts_with_several_updates_train_the_same_student_on_one_and_two_processes(tmp_path):
    """The default sampled rollouts, 2 updates per step: 1 process and 2 (ddp, fsdp2) export the
    same student within 1e-5, with one environment and with several (one teacher each)."""
    for layout in ("one_env", "several_envs"):
        config = _sampled_config(tmp_path / layout / "one", layout)
        tokenizer = build.build_tokenizer(config, build.build_run_prompter(config), max_tasks_per_split=8)
        tokenizer.save_pretrained(str(tmp_path / layout / "tokenizer"))
        loop.train(config, tokenizer=tokenizer)
    _spawn(_sampled_worker, tmp_path)
    for layout in ("one_env", "several_envs"):
        one = _final_params(tmp_path / layout / "one")
        records = read_metrics(os.path.join(tmp_path / layout / "one", "metrics.jsonl"), kind="train")
        assert all(r["trained_tokens"] > 0 for r in records)
        for parallelism in ("ddp", "fsdp2"):
            two = _final_params(tmp_path / layout / parallelism)
            largest = max(float((two[name] - one[name]).abs().max()) for name in one)
            assert largest <= 1e-5, (layout, parallelism, largest)
            assert _losses(tmp_path / layout / parallelism) == pytest.approx(_losses(tmp_path / layout / "one"), rel=1e-4)
