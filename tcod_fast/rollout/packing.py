"""Turn trajectories into the tensors the loss consumes (docs/turns.md#packing-trajectories-into-batches).

Two packing modes decide what a *sequence* is:

* ``"append"`` (append-only): one sequence per trajectory, the whole episode
  (``Trajectory.token_ids``/``turn_ids``). One forward pass per trajectory, O(L).
* ``"window"`` (windowed history): one sequence per turn, the turn's windowed prompt
  (turn id -1) followed by its response (turn id ``k`` for the student, -1 otherwise).
  Rows of turns with nothing to train are dropped unless asked for.

Both modes train exactly the same tokens: the student's responses, each under its own
turn id (:func:`trained_tokens_by_turn` checks it). ``PackingConfig.trained_players``
switches the trained replies to the expert's or teacher's for supervised fine-tuning.

Two layouts decide how sequences become rows:

* ``"padded"``: one sequence per row, right-padded to the longest; ``attention_mask``
  is ``(R, T)`` with 1 on real tokens; positions count from 0 in each row.
* ``"packed"``: sequences are laid end to end in rows of at most ``max_row_tokens``
  tokens (first-fit in the given order, no sequence split); ``attention_mask`` is
  ``None`` and ``position_ids`` restart at 0 at every sequence start. Hugging Face
  transformers >= 5 turns restarting position ids into a block-diagonal causal mask when
  the model is called with ``attention_mask=None, position_ids=..., use_cache=False``;
  :func:`block_causal_mask` builds the same mask explicitly for other backends.

**Alignment.** ``logits[r, t]`` (the model output at input position ``t``) predicts the
token at ``t + 1``. So the batch carries, aligned with the logits:

* ``target_ids[r, t] = input_ids[r, t + 1]`` within the same sequence;
* ``target_turn_ids[r, t] = turn_ids[r, t + 1]`` within the same sequence;

and at the last position of every sequence and on padding, ``target_ids = pad_token_id``
and ``target_turn_ids = -1`` (nothing is predicted across a sequence boundary). Feed
``fused_turn_kl(student_logits, teacher_logits, batch.target_turn_ids,
target_ids=batch.target_ids, ...)``.

**Rows are not trajectories** except in the append mode with the padded layout. The
kernel's per-sequence options index rows: a per-sequence ``turn_window`` tensor, the
``seq_mean_token_mean``/``turn_mean`` reductions, per-(sequence, turn) statistics and
``(B, num_turns)`` turn weights. For windowed or packed batches, mask windows with
:func:`apply_turn_windows`, map per-trajectory turn weights to rows with
``weights[batch.sequence_trajectory_index]`` (padded layout), and regroup per-token values
by trajectory with :func:`sum_by_trajectory_turn`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tcod_fast.rollout.trajectory import NOT_TRAINED, PLAYER_STUDENT, Trajectory

__all__ = [
    "PACKING_MODES",
    "LAYOUTS",
    "PackingConfig",
    "TrainingSequence",
    "PackedBatch",
    "trajectory_sequences",
    "collate_sequences",
    "pack_trajectories",
    "apply_turn_windows",
    "block_causal_mask",
    "trained_tokens_by_turn",
    "sum_by_trajectory_turn",
]

PACKING_MODES = ("append", "window")
LAYOUTS = ("padded", "packed")


@dataclass
class PackingConfig:
    """How to turn trajectories into a batch.

    Attributes:
        mode: ``"append"`` or ``"window"``; ``None`` uses each trajectory's
            ``context_mode`` (the context it was sampled from), which must then agree.
        layout: ``"padded"`` or ``"packed"``.
        pad_token_id: id written at padding and as target of the last position.
        max_row_tokens: packed layout row capacity; ``None`` = the longest sequence.
        pad_to_multiple_of: round the row length up to a multiple of this.
        include_untrained_rows: window mode: keep rows of turns with nothing to train
            (useful only for teacher-side statistics).
        trained_players: whose replies carry their turn id. ``("student",)`` (the
            default) is on-policy distillation; ``("expert",)`` or ``("teacher",)``
            gives supervised fine-tuning on demonstrations.
    """

    mode: str | None = None
    layout: str = "padded"
    pad_token_id: int = 0
    max_row_tokens: int | None = None
    pad_to_multiple_of: int = 1
    include_untrained_rows: bool = False
    trained_players: tuple[str, ...] = (PLAYER_STUDENT,)


@dataclass
class TrainingSequence:
    """One sequence of a batch, before collation.

    ``turn_ids`` is aligned with ``token_ids`` (input alignment, not shifted).
    ``turn_index`` is the turn of a window-mode row, ``-1`` for an append-mode sequence.
    """

    token_ids: list[int]
    turn_ids: list[int]
    trajectory_index: int
    turn_index: int = -1


@dataclass
class PackedBatch:
    """Collated tensors; ``R`` rows of ``T`` tokens, ``S`` sequences.

    Attributes:
        input_ids: ``(R, T)`` int64, padding = ``pad_token_id``.
        attention_mask: ``(R, T)`` int64 (1 = real token) for the padded layout; ``None``
            for the packed layout (see module docstring).
        position_ids: ``(R, T)`` int64, restarting at 0 at each sequence start.
        turn_ids: ``(R, T)`` int64, turn id of each *input* token, -1 on padding.
        target_ids: ``(R, T)`` int64, the next token (what ``logits[r, t]`` predicts).
        target_turn_ids: ``(R, T)`` int64, turn id of the next token, -1 where there is
            no next token in the same sequence.
        sequence_ids: ``(R, T)`` int64, index of the sequence each token belongs to
            (into the ``sequence_*`` tensors), -1 on padding.
        sequence_trajectory_index: ``(S,)`` int64, trajectory of each sequence.
        sequence_turn_index: ``(S,)`` int64, turn of each window-mode sequence, -1 in
            append mode.
        sequence_lengths: ``(S,)`` int64.
        mode, layout: how the batch was built.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    turn_ids: torch.Tensor
    target_ids: torch.Tensor
    target_turn_ids: torch.Tensor
    sequence_ids: torch.Tensor
    sequence_trajectory_index: torch.Tensor
    sequence_turn_index: torch.Tensor
    sequence_lengths: torch.Tensor
    mode: str
    layout: str

    @property
    def num_trained_tokens(self) -> int:
        return int((self.target_turn_ids >= 0).sum())

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face causal LM forward on this batch."""
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "use_cache": False,
        }
        inputs["attention_mask"] = self.attention_mask
        return inputs

    def to(self, device) -> PackedBatch:
        """Copy every tensor to ``device``."""
        moved = {}
        for name, value in vars(self).items():
            moved[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**moved)


def _resolve_mode(trajectories: Sequence[Trajectory], mode: str | None) -> str:
    if mode is not None:
        if mode not in PACKING_MODES:
            raise ValueError(f"packing mode must be one of {PACKING_MODES}, got {mode!r}")
        return mode
    modes = {traj.context_mode for traj in trajectories}
    if len(modes) != 1:
        raise ValueError(
            f"PackingConfig.mode is None and the trajectories mix context modes {sorted(modes)}; "
            "give the mode explicitly"
        )
    resolved = modes.pop()
    if resolved not in PACKING_MODES:
        raise ValueError(
            f"trajectory context_mode must be one of {PACKING_MODES}, got {resolved!r}"
        )
    return resolved


def trajectory_sequences(
    trajectories: Sequence[Trajectory],
    mode: str,
    *,
    include_untrained_rows: bool = False,
    trained_players: tuple[str, ...] = (PLAYER_STUDENT,),
) -> list[TrainingSequence]:
    """Cut trajectories into training sequences for packing ``mode``.

    ``"append"``: one sequence per trajectory (empty trajectories are skipped).
    ``"window"``: one sequence per turn: ``window_prompt_token_ids + response_token_ids``;
    turns not played by ``trained_players`` are skipped unless ``include_untrained_rows``.
    """
    trained_players = tuple(trained_players)
    if mode not in PACKING_MODES:
        raise ValueError(f"packing mode must be one of {PACKING_MODES}, got {mode!r}")
    sequences: list[TrainingSequence] = []
    for trajectory_index, traj in enumerate(trajectories):
        if mode == "append":
            if traj.token_ids:
                turn_ids = (
                    traj.turn_ids
                    if trained_players == (PLAYER_STUDENT,)
                    else traj.turn_ids_for(trained_players)
                )
                sequences.append(
                    TrainingSequence(list(traj.token_ids), list(turn_ids), trajectory_index)
                )
            continue
        for turn in traj.turns:
            trained = turn.player in trained_players
            if not trained and not include_untrained_rows:
                continue
            response_turn_id = turn.turn_index if trained else NOT_TRAINED
            prompt = list(turn.window_prompt_token_ids)
            response = list(turn.response_token_ids)
            sequences.append(
                TrainingSequence(
                    prompt + response,
                    [NOT_TRAINED] * len(prompt) + [response_turn_id] * len(response),
                    trajectory_index,
                    turn.turn_index,
                )
            )
    return sequences


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _assign_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit: each sequence goes to the first row with room, in the given order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        for row_index, free in enumerate(room):
            if length <= free:
                rows[row_index].append(index)
                room[row_index] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return rows


def collate_sequences(
    sequences: Sequence[TrainingSequence],
    *,
    layout: str = "padded",
    pad_token_id: int = 0,
    max_row_tokens: int | None = None,
    pad_to_multiple_of: int = 1,
    mode: str = "append",
) -> PackedBatch:
    """Collate sequences into a :class:`PackedBatch` (see the module docstring).

    Raises ``ValueError`` for an unknown layout, no sequences, or (packed) a sequence
    longer than ``max_row_tokens``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not sequences:
        raise ValueError("no sequences to collate (no trajectory has a trainable sequence)")
    lengths = [len(seq.token_ids) for seq in sequences]
    for seq in sequences:
        if len(seq.turn_ids) != len(seq.token_ids):
            raise ValueError(
                f"sequence of trajectory {seq.trajectory_index} has {len(seq.token_ids)} tokens "
                f"but {len(seq.turn_ids)} turn ids"
            )
    if layout == "padded":
        rows = [[index] for index in range(len(sequences))]
        row_length = max(lengths)
    else:
        capacity = max_row_tokens if max_row_tokens is not None else max(lengths)
        if max(lengths) > capacity:
            raise ValueError(
                f"a sequence has {max(lengths)} tokens but max_row_tokens is {capacity}"
            )
        rows = _assign_rows(lengths, capacity)
        row_length = max(sum(lengths[i] for i in row) for row in rows)
    row_length = _round_up(row_length, max(1, pad_to_multiple_of))

    shape = (len(rows), row_length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.int64)
    position_ids = torch.zeros(shape, dtype=torch.int64)
    turn_ids = torch.full(shape, NOT_TRAINED, dtype=torch.int64)
    target_ids = torch.full(shape, pad_token_id, dtype=torch.int64)
    target_turn_ids = torch.full(shape, NOT_TRAINED, dtype=torch.int64)
    sequence_ids = torch.full(shape, -1, dtype=torch.int64)
    for row_index, row in enumerate(rows):
        offset = 0
        for seq_index in row:
            seq = sequences[seq_index]
            length = lengths[seq_index]
            span = slice(offset, offset + length)
            tokens = torch.tensor(seq.token_ids, dtype=torch.int64)
            turns = torch.tensor(seq.turn_ids, dtype=torch.int64)
            input_ids[row_index, span] = tokens
            turn_ids[row_index, span] = turns
            position_ids[row_index, span] = torch.arange(length)
            sequence_ids[row_index, span] = seq_index
            # logits at position t predict token t+1 of the same sequence; the last
            # position of a sequence predicts nothing.
            target_ids[row_index, offset : offset + length - 1] = tokens[1:]
            target_turn_ids[row_index, offset : offset + length - 1] = turns[1:]
            offset += length
        # Padding in a packed row gets its own restarting positions, so the model's
        # packed-sequence detection treats it as a separate (ignored) sequence.
        if layout == "packed" and offset < row_length:
            position_ids[row_index, offset:] = torch.arange(row_length - offset)
    attention_mask = (sequence_ids >= 0).to(torch.int64) if layout == "padded" else None
    if layout == "padded":
        # Keep positions of right padding increasing: harmless (masked) and avoids a
        # spurious "new sequence" at the padding for backends that inspect positions.
        for row_index, length in enumerate(lengths):
            position_ids[row_index, length:] = torch.arange(length, row_length)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        turn_ids=turn_ids,
        target_ids=target_ids,
        target_turn_ids=target_turn_ids,
        sequence_ids=sequence_ids,
        sequence_trajectory_index=torch.tensor(
            [seq.trajectory_index for seq in sequences], dtype=torch.int64
        ),
        sequence_turn_index=torch.tensor([seq.turn_index for seq in sequences], dtype=torch.int64),
        sequence_lengths=torch.tensor(lengths, dtype=torch.int64),
        mode=mode,
        layout=layout,
    )


def pack_trajectories(
    trajectories: Sequence[Trajectory], config: PackingConfig | None = None
) -> PackedBatch:
    """Trajectories -> :class:`PackedBatch` following ``config`` (default
    :class:`PackingConfig`: the trajectories' own mode, padded layout)."""
    config = config or PackingConfig()
    mode = _resolve_mode(trajectories, config.mode)
    sequences = trajectory_sequences(
        trajectories,
        mode,
        include_untrained_rows=config.include_untrained_rows,
        trained_players=config.trained_players,
    )
    return collate_sequences(
        sequences,
        layout=config.layout,
        pad_token_id=config.pad_token_id,
        max_row_tokens=config.max_row_tokens,
        pad_to_multiple_of=config.pad_to_multiple_of,
        mode=mode,
    )


def apply_turn_windows(batch: PackedBatch, turn_windows: torch.Tensor) -> torch.Tensor:
    """``target_turn_ids`` with tokens outside their trajectory's turn window set to -1.

    Args:
        batch: a collated batch.
        turn_windows: ``(num_trajectories, 2)`` int64, ``[lo, hi)`` per trajectory (for
            example ``tcod_fast.curriculum.turn_windows_tensor(plans)``).

    Returns:
        ``(R, T)`` int64. Works for both layouts, unlike a per-row window, because a
        packed row may hold several trajectories.
    """
    if turn_windows.ndim != 2 or turn_windows.shape[1] != 2:
        raise ValueError(
            f"turn_windows must have shape (num_trajectories, 2), got {tuple(turn_windows.shape)}"
        )
    max_index = (
        int(batch.sequence_trajectory_index.max())
        if batch.sequence_trajectory_index.numel()
        else -1
    )
    if max_index >= turn_windows.shape[0]:
        raise ValueError(
            f"batch refers to trajectory {max_index} but turn_windows has "
            f"{turn_windows.shape[0]} rows"
        )
    windows = turn_windows.to(batch.target_turn_ids.device, torch.int64)
    trajectory_of_token = batch.sequence_trajectory_index.to(windows.device)[
        batch.sequence_ids.clamp(min=0)
    ]
    lo = windows[trajectory_of_token, 0]
    hi = windows[trajectory_of_token, 1]
    turn = batch.target_turn_ids
    keep = (turn >= 0) & (turn >= lo) & (turn < hi) & (batch.sequence_ids >= 0)
    return torch.where(keep, turn, torch.full_like(turn, NOT_TRAINED))


def block_causal_mask(batch: PackedBatch) -> torch.Tensor:
    """Explicit ``(R, 1, T, T)`` bool attention mask (True = may attend).

    Token ``t`` attends to ``s <= t`` of the same sequence; padding attends only to
    itself (so no softmax row is empty). Equivalent to what the padded layout's 2D mask
    or the packed layout's restarting positions give inside transformers.
    """
    seq = batch.sequence_ids
    rows, length = seq.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
    same_sequence = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
    eye = torch.eye(length, dtype=torch.bool, device=seq.device).expand(rows, length, length)
    return ((same_sequence & causal) | eye)[:, None]


def sum_by_trajectory_turn(
    values: torch.Tensor,
    batch: PackedBatch,
    *,
    num_trajectories: int | None = None,
    num_turns: int | None = None,
    target_turn_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(trajectory, turn) sums and token counts of per-token ``values``.

    The kernel's own per-(sequence, turn) statistics index *rows*; a row is a trajectory
    only in the append mode with the padded layout. This regroups per-token values (for
    example ``fused_turn_kl(..., reduction="none")``) by trajectory whatever the mode and
    layout, which T-DUR/SOD and the KL-by-turn curve need.

    Args:
        values: ``(R, T)`` float, aligned with the logits (like ``target_turn_ids``).
        batch: the batch the values were computed on.
        num_trajectories: rows of the result; default ``max trajectory index + 1``.
        num_turns: columns of the result; default ``max turn id + 1``.
        target_turn_ids: ``(R, T)`` turn ids to group by (default
            ``batch.target_turn_ids``; pass :func:`apply_turn_windows` output to restrict).

    Returns:
        ``(sums, counts)``, each ``(num_trajectories, num_turns)``; sums in ``values``'
        dtype (float32 at least), counts int64.
    """
    turn_ids = batch.target_turn_ids if target_turn_ids is None else target_turn_ids
    if values.shape != turn_ids.shape:
        raise ValueError(
            f"values has shape {tuple(values.shape)} but the batch has {tuple(turn_ids.shape)}"
        )
    kept = turn_ids >= 0
    trajectory_of_sequence = batch.sequence_trajectory_index.to(values.device)
    trajectories = trajectory_of_sequence[batch.sequence_ids.clamp(min=0).to(values.device)][kept]
    turns = turn_ids.to(values.device)[kept]
    if num_trajectories is None:
        num_trajectories = (
            int(trajectory_of_sequence.max()) + 1 if trajectory_of_sequence.numel() else 0
        )
    if num_turns is None:
        num_turns = int(turns.max()) + 1 if turns.numel() else 0
    flat_index = trajectories * num_turns + turns
    dtype = torch.promote_types(values.dtype, torch.float32)
    sums = torch.zeros(num_trajectories * num_turns, dtype=dtype, device=values.device)
    sums.index_add_(0, flat_index, values[kept].to(dtype))
    counts = torch.zeros(num_trajectories * num_turns, dtype=torch.int64, device=values.device)
    counts.index_add_(0, flat_index, torch.ones_like(flat_index))
    return sums.view(num_trajectories, num_turns), counts.view(num_trajectories, num_turns)


def trained_tokens_by_turn(batch: PackedBatch) -> dict[tuple[int, int], list[int]]:
    """Trained target tokens grouped by ``(trajectory_index, turn_id)``, in order.

    Two batches train the same tokens iff these dicts are equal; the append and window
    modes of the same trajectories must give equal dicts.
    """
    grouped: dict[tuple[int, int], list[int]] = {}
    trained = batch.target_turn_ids >= 0
    rows, cols = trained.nonzero(as_tuple=True)
    for row, col in zip(rows.tolist(), cols.tolist()):
        sequence = int(batch.sequence_ids[row, col])
        key = (int(batch.sequence_trajectory_index[sequence]), int(batch.target_turn_ids[row, col]))
        grouped.setdefault(key, []).append(int(batch.target_ids[row, col]))
    return grouped
