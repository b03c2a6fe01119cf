"""TRL's distillation trainers with tcod-fast's fused, exact divergence.

``FusedDistillationTrainer`` is ``trl.DistillationTrainer`` (same arguments, same
``DistillationConfig``) whose loss comes from :func:`tcod_fast.fused_linear_turn_kl`: the
student's and teacher's last hidden states and LM heads go in, the generalised JSD comes out
with TRL's semantics (``beta = 0`` forward KL(teacher || student), ``beta = 1`` reverse
KL(student || teacher), else ``beta KL(q || m) + (1 - beta) KL(p || m)`` with
``m = (1 - beta) p + beta q``; each model's logits through its own logit map (Gemma 2's
``final_logit_softcapping``, a ``logit_scale``), then divided by ``temperature``; reduced as
``sum / num_items_in_batch``, or the mean over trained tokens without it). No
``tokens x vocab`` tensor is allocated.

Multi-turn: TRL marks tool/environment tokens with ``tool_mask = 0``. Each run of trained
(agent) tokens in a completion is one turn, numbered from 0 (:func:`turn_ids_from_loss_mask`);
a batch may also carry explicit completion-aligned ``turn_ids`` (``-1`` = not trained). Only
agent tokens are trained, the mean KL of each turn is logged as ``turn_kl/<k>`` through TRL's
metrics, and ``turn_window=(lo, hi)`` (or a callable ``global_step -> (lo, hi)``, e.g. a
:class:`tcod_fast.integrations.curriculum.TurnCurriculum` F2B depth) trains only turns
``lo <= k < hi``.

``FusedServerDistillationTrainer`` is ``trl.experimental.server_distillation.
ServerDistillationTrainer`` with its top-k (+ tail bucket) divergences computed by
:func:`tcod_fast.fused_topk_turn_kl`.

Usage::

    from tcod_fast.integrations.trl import FusedDistillationTrainer
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                       train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from trl import DistillationTrainer

from tcod_fast.errors import UserError
from tcod_fast.ops.fused_linear_turn_kl import fused_linear_turn_kl
from tcod_fast.ops.topk_turn_kl import fused_topk_turn_kl

__all__ = ["FusedDistillationTrainer", "FusedServerDistillationTrainer", "turn_ids_from_loss_mask"]

TurnWindow = tuple[int, int] | Callable[[int], tuple[int, int]] | None


def turn_ids_from_loss_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Turn ids of completion tokens from their loss mask.

    Args:
        loss_mask: ``(B, C)`` 0/1 (or bool): 1 where a token is the agent's and is trained
            (TRL's ``completion_mask * tool_mask``).

    Returns:
        ``(B, C)`` int64: each maximal run of 1s is one turn, numbered ``0, 1, ...`` from the
        left of its row; ``-1`` where the mask is 0.
    """
    keep = loss_mask.bool()
    previous = torch.zeros_like(keep)
    previous[:, 1:] = keep[:, :-1]
    turn = torch.cumsum((keep & ~previous).to(torch.int64), dim=1) - 1
    return torch.where(keep, turn, torch.full_like(turn, -1))


def _plain_head(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Under FSDP2 the head's weight is a DTensor: gather it once (as TRL does) so the op sees a plain tensor.
    weight, bias = head.weight, head.bias
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor()
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


def _logit_map(model: torch.nn.Module) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)`` of the map the model applies to its LM head's output, read from
    the config fields TRL reads (None for nothing): ``final_logit_softcapping``, and the first of
    ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` or ``logits_scaling`` (a divisor,
    except for HyperCLOVA X)."""
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            scale = float(value)
            break
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return (None if softcap is None else float(softcap)), (None if scale == 1.0 else scale)


class FusedDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` with the loss of :func:`tcod_fast.fused_linear_turn_kl`.

    Takes exactly ``DistillationTrainer``'s arguments, plus:

    Args:
        turn_window: ``None`` (train every agent turn), ``(lo, hi)`` (train turns
            ``lo <= k < hi``) or a callable ``global_step -> (lo, hi)`` evaluated at every
            loss computation (a curriculum: TCOD-F2B's ``(0, depth)``).
        backend: the op's backend (``"auto"``, ``"torch"``, ``"triton"``).

    ``_compute_loss(unwrapped_student, inputs, num_items_in_batch)`` keeps TRL's contract:
    ``inputs`` holds ``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``
    (optionally ``tool_mask`` and ``turn_ids``, both ``(B, C)`` over the completion), and it
    returns ``(loss, entropy_sum, n_valid)``: the scalar float32 loss, the summed student
    entropy over trained tokens (detached) and their count. Each model's own logit map (soft
    cap, logit scale; read from its config as TRL does) is applied to its logits before the
    temperature, as the op's ``softcap=`` and ``logit_scale=``.
    """

    def __init__(self, *args: Any, turn_window: TurnWindow = None, backend: str = "auto", **kwargs: Any) -> None:
        if turn_window is not None and not callable(turn_window):
            turn_window = tuple(int(v) for v in turn_window)
            if len(turn_window) != 2:
                raise UserError(f"turn_window must be (lo, hi) or a callable step -> (lo, hi), got {turn_window}")
        self.turn_window = turn_window
        self.fused_backend = backend
        self._pending_turn_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        super().__init__(*args, **kwargs)

    def current_turn_window(self) -> tuple[int, int] | None:
        """The turn window at the current global step (``None``: every turn)."""
        if callable(self.turn_window):
            return tuple(self.turn_window(int(self.state.global_step)))
        return self.turn_window

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        if "turn_ids" in inputs:
            turn_ids = torch.where(loss_mask.bool(), inputs["turn_ids"].to(torch.int64), -1)
        else:
            turn_ids = turn_ids_from_loss_mask(loss_mask)
        logits_to_keep = completion_ids.size(1)
        multimodal = {
            k: inputs[k]
            for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                      "token_type_ids", "mm_token_type_ids", "image_position_ids")
            if k in inputs
        }

        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal
        )
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher,
                input_ids, attention_mask, logits_to_keep, **multimodal,
            )
        student_weight, student_bias = _plain_head(unwrapped_student.get_output_embeddings())
        teacher_weight, teacher_bias = _plain_head(unwrapped_teacher.get_output_embeddings())
        (student_softcap, student_scale), (teacher_softcap, teacher_scale) = (
            _logit_map(unwrapped_student), _logit_map(unwrapped_teacher)
        )
        device = student_weight.device
        result = fused_linear_turn_kl(
            student_hidden.to(device),
            student_weight,
            teacher_hidden.to(device),
            teacher_weight,
            turn_ids.to(device),
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            turn_window=self.current_turn_window(),
            divergence="jsd",
            beta=float(self.beta),
            temperature=float(self.temperature),
            softcap=(student_softcap, teacher_softcap),
            logit_scale=(student_scale, teacher_scale),
            reduction="sum",
            return_stats=True,
            backend=self.fused_backend,
        )
        n_valid = result.token_kept.sum()
        if num_items_in_batch is None:
            loss = result.loss / n_valid.clamp(min=1)
        else:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(result.loss.device)
            loss = result.loss / num_items_in_batch
        self._pending_turn_stats.append(
            (result.turn_kl_sum.detach().sum(0), result.turn_token_count.detach().sum(0))
        )
        return loss, result.entropy.detach().sum(), n_valid

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # Logged here, after the wrapped forward returned, so no collective runs inside it (as TRL does for entropy).
        mode = "train" if self.model.training else "eval"
        for kl_sum, count in self._pending_turn_stats:
            num_turns = torch.tensor([kl_sum.numel()], device=kl_sum.device)
            width = int(self.accelerator.gather_for_metrics(num_turns).max())
            padded = torch.zeros(2, width, device=kl_sum.device)
            padded[0, : kl_sum.numel()] = kl_sum
            padded[1, : count.numel()] = count
            total = self.accelerator.gather_for_metrics(padded.unsqueeze(0)).sum(0)
            for turn in range(width):
                if total[1, turn] > 0:
                    self._metrics[mode][f"turn_kl/{turn}"].append(float(total[0, turn] / total[1, turn]))
        self._pending_turn_stats.clear()
        return out


def _server_trainer_class():
    from trl.experimental.server_distillation import ServerDistillationTrainer

    return ServerDistillationTrainer


class FusedServerDistillationTrainer(_server_trainer_class()):
    """``ServerDistillationTrainer`` with its sparse-teacher losses computed by
    :func:`tcod_fast.fused_topk_turn_kl` (one streaming pass, exact tail bucket).

    Same arguments and config. ``beta = 0``: forward KL over the teacher's top-k plus a tail
    bucket (``loss_add_tail``) or renormalised over the top-k; ``beta > 0``: TRL's top-1
    support (the teacher's top token and the sampled token) with the same tail handling. Both
    reduce to the mean over completion tokens, as TRL does. The student's log-probs are the
    ones TRL has already formed at its temperature, so the op runs at temperature 1 on them.
    """

    def _fused_sparse_loss(self, student_log_probs, ids, teacher_logprobs, labels, beta):
        return fused_topk_turn_kl(
            student_log_probs,
            ids,
            teacher_logprobs,
            torch.where(labels != -100, 0, -1),
            divergence="jsd",
            beta=float(beta),
            tail="bucket" if self.loss_add_tail else "renormalize",
            tail_eps=1e-7,  # TRL floors the teacher tail at 1 - exp(-1e-7)
            reduction="mean",
        )

    def _compute_server_forward_kl_loss(self, teacher_result, student_log_probs, labels):
        logprobs = teacher_result["topk_logprobs"]
        ids = torch.where(logprobs > float("-inf"), teacher_result["topk_token_ids"], -1)
        return self._fused_sparse_loss(student_log_probs, ids, logprobs, labels, 0.0)

    def _compute_sparse_top_1_divergence_loss(
        self, student_log_probs, teacher_top1_token_ids, teacher_top1_logprobs, reverse_token_ids,
        reverse_teacher_logprobs, labels, num_items_in_batch=None,
    ):
        if self.beta == 1:
            ids = reverse_token_ids.unsqueeze(-1)
            logprobs = reverse_teacher_logprobs.unsqueeze(-1)
        else:
            second = torch.where(reverse_token_ids == teacher_top1_token_ids, -1, reverse_token_ids)
            ids = torch.stack([teacher_top1_token_ids, second], dim=-1)
            logprobs = torch.stack([teacher_top1_logprobs, reverse_teacher_logprobs], dim=-1)
        return self._fused_sparse_loss(student_log_probs, ids, logprobs, labels, self.beta)
