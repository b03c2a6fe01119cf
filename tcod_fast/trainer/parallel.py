"""Multi-process training modes: ``trainer.parallelism = "ddp" | "fsdp2"`` under ``torchrun``.

``ddp`` (the default)
    Every process holds the whole student (and teacher). Gradients are summed across
    processes once per optimiser update by :func:`~tcod_fast.trainer.distributed.all_reduce_gradients`
    (one flat all-reduce: DDP's maths). PyTorch's ``DistributedDataParallel`` wrapper is
    not used because every forward would have to go through the wrapper (the fused-linear
    loss runs the base model and reads the LM head itself; rollouts call the model token by
    token) and its per-backward hooks need the same number of backward passes on every
    process, which token-budget micro-batches do not give.

``fsdp2``
    PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): the student is sharded per
    decoder layer, then as a whole (embeddings, final norm, LM head in the root group), with
    an optional mixed-precision policy (``trainer.fsdp_param_dtype``). FSDP2 reduce-scatters
    the gradients itself (a sum: the losses are already divided by the global token count),
    so no hand-written all-reduce remains in this mode. The teacher is sharded the same way
    for forward only (``trainer.fsdp_teacher = "shard"``) or kept whole on every process
    (``"whole"``, fastest when it fits).

Uneven micro-batch counts (FSDP2). Micro-batches are cut by a token budget, so processes
may run different numbers of forward/backward passes in an update; with FSDP2 every
forward all-gathers parameters and every backward reduce-scatters gradients, so unequal
counts would leave one process waiting forever. Before a pass over its micro-batches,
:func:`pad_micro_batches` all-reduces the largest count (one integer) and each process
first runs the missing passes as *zero-weight micro-batches*: a one-token forward (student
and sharded teacher) whose loss is multiplied by 0, so the gradient it adds is exactly zero
and the collectives line up.
``set_requires_gradient_sync(False)`` alone would not do: it skips the gradient
reduce-scatter but not the forward all-gathers, and it keeps unsharded gradients in memory
until the last micro-batch, which is what FSDP is used to avoid. Padding costs one
one-token pass per missing micro-batch.

Fused-linear loss with a sharded LM head: the LM head sits in the root FSDP group, which
FSDP2 keeps gathered from the forward until the end of the backward (its ``reshard after
forward`` is off for the root). The fused op therefore receives the whole ``(V, H)`` weight,
gathered once per micro-batch, and its chunks run over tokens exactly as on one process.
The alternative, giving each process its shard of the vocabulary and combining partial
log-sum-exps, needs every process to see the *same* tokens (tensor parallelism); here each
process holds different episodes, so it would all-gather every process's hidden states and
compute logits for all of them. Gathering the head costs ``V x H`` parameters of memory per
process during the micro-batch (62.5 MiB for a 32000 x 512 head), the same as the
non-fused path, and keeps the loss's numerics those of a single process. Measured:
benchmarks/results/parallel_memory_cpu.json (2 processes, 59M-parameter student: peak
1453 MiB per process under fsdp2 against 1798 MiB under ddp, the gathered head included).

Rollouts and evaluation: each process plays its share of episodes. Generation runs a
different number of forward passes on each process, so under FSDP2 :func:`gathered_for_generation`
all-gathers the whole model once before the episodes (and reshards after): during a
rollout each process holds the full student (and a sharded teacher, gathered the same way).

On one process (no ``torchrun``) ``fsdp2`` trains the plain model and writes the same
sharded checkpoints (:mod:`tcod_fast.trainer.sharded_checkpoint`), so the run can continue
on more processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tcod_fast.trainer.distributed import DistContext, all_reduce_gradients

__all__ = [
    "PARALLELISMS",
    "decoder_layers",
    "export_state_dict",
    "gathered_for_generation",
    "is_sharded",
    "pad_micro_batches",
    "prepare_student",
    "prepare_teacher",
    "sharded_hidden_states",
    "synchronise_gradients",
    "to_float",
]

PARALLELISMS = ("ddp", "fsdp2")


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` was sharded with ``fully_shard`` (FSDP2)."""
    return isinstance(model, FSDPModule)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (``model.base_model.layers``)."""
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"FSDP2 sharding needs a decoder with .base_model.layers, got {type(model).__name__}")
    return list(layers)


def _mixed_precision(param_dtype: str):
    if param_dtype == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _shard(model: torch.nn.Module, param_dtype: str) -> torch.nn.Module:
    policy = _mixed_precision(param_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def prepare_student(student: torch.nn.Module, parallelism: str, context: DistContext, *, param_dtype: str = "float32"):
    """The student as this process trains it: unchanged for ``ddp`` or a single process;
    sharded per decoder layer under ``fsdp2``, its gradients reduce-scattered as a sum."""
    if parallelism != "fsdp2" or not context.enabled:
        return student
    _shard(student, param_dtype)
    # Each process's loss is already divided by the global token count: sum, do not average.
    # (plain SUM collectives: gloo has no pre-multiplied sum). Both setters act on one
    # module's parameter group: set them on every sharded module.
    for module in _fsdp_modules(student):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return student


def prepare_teacher(teacher: torch.nn.Module | None, parallelism: str, context: DistContext, *, mode: str = "shard"):
    """The teacher: sharded for forward only under ``fsdp2`` with ``mode="shard"``, else whole.

    A sharded teacher's decoder layers are gathered layer by layer in every forward; its
    root group (embeddings, final norm, LM head) stays gathered after the first forward,
    since the loss reads its LM head in every micro-batch."""
    if teacher is None or parallelism != "fsdp2" or not context.enabled or mode != "shard":
        return teacher
    return _shard(teacher, "float32")


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_for_generation(*models: torch.nn.Module | None) -> Iterator[None]:
    """All-gather every FSDP2-sharded model of ``models`` for the duration of the block, so
    that processes can run different numbers of forward passes (token-by-token generation).
    Every process must enter the block (the gather is collective). Others are untouched."""
    sharded = [m for m in models if is_sharded(m)]
    for model in sharded:
        for module in _fsdp_modules(model):
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
    try:
        yield
    finally:
        for model in sharded:
            for module in _fsdp_modules(model):
                module.reshard()
                # decoder layers free their gathered weights after each forward; the root
                # keeps them for the backward (FSDP2's own default for a root module)
                module.set_reshard_after_forward(module is not model, recurse=False)


def sharded_hidden_states(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Last hidden states ``(B, T, H)`` of an FSDP2-sharded causal LM, run through its root
    forward (so FSDP gathers the root group, LM head included, and registers its backward
    hooks). Only the last position's logits are computed; they join the graph with weight 0
    so the root's pre-backward hook fires."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        captured["hidden"] = output.last_hidden_state

    handle = model.base_model.register_forward_hook(keep)
    try:
        output = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    if torch.is_grad_enabled() and output.logits.requires_grad:
        hidden = hidden + 0.0 * output.logits.sum()
    return hidden


def pad_micro_batches(run: Any, count: int, *, with_grad: bool) -> int:
    """Run the zero-weight micro-batches that bring this process's pass to as many
    micro-batches as the busiest process's (FSDP2 only; see the module docstring). Call it
    before the pass; ``count``: the micro-batches this process is about to run. Returns how
    many padding passes it ran."""
    if not is_sharded(run.student):
        return 0
    largest = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    missing = int(largest[0]) - count
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    tokens = torch.full((1, 1), int(pad_id), dtype=torch.long, device=run.device)
    for _ in range(missing):
        with torch.enable_grad() if with_grad else torch.no_grad():
            student_logits = run.student(input_ids=tokens).logits
            if is_sharded(run.teacher):
                with torch.no_grad():
                    run.teacher(input_ids=tokens)
            if with_grad:
                (0.0 * student_logits.sum()).backward()
    return missing


def synchronise_gradients(student: torch.nn.Module, context: DistContext) -> None:
    """Make every process hold the gradient of the global loss before the optimiser step:
    a flat all-reduce for replicated students; nothing under FSDP2 (it reduce-scattered
    them in the backward)."""
    if not is_sharded(student):
        all_reduce_gradients(student, context)


def to_float(value: torch.Tensor) -> float:
    """A scalar tensor or DTensor (e.g. a gradient norm over sharded gradients) as a float."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def export_state_dict(student: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The student's full state dict on CPU, gathered to rank 0 (``None`` elsewhere) for a
    sharded student; ``None`` for a replicated one (save it as it is). Collective under FSDP2."""
    if not is_sharded(student):
        return None
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if dist.get_rank() == 0 else None


def plain_copy(student: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) model of ``student``'s class holding ``state_dict``, for
    ``save_pretrained``. Built on the meta device, so it costs only ``state_dict``'s memory."""
    plain_class = next(c for c in type(student).__mro__[1:] if c is not FSDPModule and issubclass(c, torch.nn.Module))
    with torch.device("meta"):
        plain = plain_class(student.config)
    plain.load_state_dict(state_dict, assign=True)
    if getattr(student.config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = student.generation_config
    return plain
