"""Two CPU processes (gloo) take the same optimiser step as one process on the same episodes."""

import os
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp
from float32_tolerances import gradient_tolerance, kl_tolerance
from trainer_helpers import tiny_config

from tcod_fast.trainer import build, loop
from tcod_fast.trainer.setup import setup_run

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)


def _gradient_of_step(run, batch):
    """Run loss -> update on ``batch``; return the (all-reduced) gradients and the metrics."""
    advantages = loop.compute_advantages(run, batch, loop.score(run, batch))
    captured = {}
    original_update = loop.update

    def update_and_capture(run_):
        from tcod_fast.trainer.distributed import all_reduce_gradients

        all_reduce_gradients(run_.student, run_.dist)
        captured["grads"] = {n: p.grad.clone() for n, p in run_.student.named_parameters() if p.grad is not None}
        run_.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": 0.0, "lr": 0.0}

    loop.update = update_and_capture
    try:
        metrics = loop.train_on_batch(run, batch, advantages)
    finally:
        loop.update = original_update
    return captured["grads"], metrics


def _worker(rank, world_size, port, folder, algorithm):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tokenizer = build.load_tokenizer(os.path.join(folder, "tokenizer"))
    config = tiny_config(os.path.join(folder, f"rank{rank}"), *_extra(algorithm))
    run = setup_run(config, tokenizer=tokenizer)
    assert run.dist.world_size == world_size and run.dist.rank == rank
    with open(os.path.join(folder, "batch.pkl"), "rb") as handle:
        full = pickle.load(handle)
    # this process's share, exactly as rollout() shards plans: whole GRPO groups per rank
    keep = [i for i, p in enumerate(full.plans) if p.task_index % world_size == rank]
    shard = loop.StepBatch(step=full.step, plans=[full.plans[i] for i in keep], trajectories=[full.trajectories[i] for i in keep])
    grads, metrics = _gradient_of_step(run, shard)
    torch.save({"grads": grads, "metrics": metrics}, os.path.join(folder, f"result{rank}.pt"))
    torch.distributed.destroy_process_group()


def _extra(algorithm):
    extra = [f"curriculum.algorithm={algorithm}", "rollout.tasks_per_step=4", "eval.num_tasks=0", "trainer.micro_batch_tokens=1500"]
    if algorithm in ("atod", "grpo"):
        extra.append("curriculum.episodes_per_task=2")
    return extra


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# atod covers the most: GRPO groups split across processes, T-DUR weights, PPO and the fused KL
@pytest.mark.parametrize("algorithm", ["atod"])
def test_two_gloo_processes_match_one_process(tmp_path, toy_tokenizer, algorithm):
    toy_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    single = setup_run(tiny_config(tmp_path / "single", *_extra(algorithm)), tokenizer=toy_tokenizer)
    batch = loop.rollout(single, 0)
    assert len({p.task_index for p in batch.plans}) == 4
    with open(tmp_path / "batch.pkl", "wb") as handle:
        pickle.dump(batch, handle)
    grads_single, metrics_single = _gradient_of_step(single, batch)

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), algorithm), nprocs=2, join=True)

    # the same sums in another order (per process, then gloo's all-reduce): float32's bounds
    tokens, vocab_size = int(metrics_single["trained_tokens"]), len(toy_tokenizer)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"result{rank}.pt", weights_only=True)
        assert result["metrics"]["trained_tokens"] == metrics_single["trained_tokens"]
        assert result["metrics"]["loss"] == pytest.approx(metrics_single["loss"], **kl_tolerance(vocab_size, tokens))
        assert result["metrics"]["kl_by_turn"] == pytest.approx(metrics_single["kl_by_turn"], **kl_tolerance(vocab_size, tokens))
        assert set(result["grads"]) == set(grads_single)
        for name, grad in grads_single.items():
            tolerance = gradient_tolerance(tokens + vocab_size, float(grad.abs().max()))
            torch.testing.assert_close(result["grads"][name], grad, **tolerance, msg=f"rank {rank} {name}")
