"""A teacher behind an OpenAI-compatible completions server (vLLM's ``api_server``).

:class:`ServedTeacher` does the two things the trainer asks of a teacher that is not in its
process, both through ``POST {server_url}/v1/completions`` with token-id prompts (never
text, so there is no re-tokenisation drift):

* it plays turns: :meth:`ServedTeacher.generate` implements the
  :class:`~tcod_fast.rollout.generation.Generator` protocol (teacher-played B2F prefixes,
  Guided-OPD's teacher turns, F2B's teacher completion), returning the exact sampled ids;
* it scores tokens: :meth:`ServedTeacher.score` returns, for every position of every
  sequence, the teacher's log-prob of the token that is there and the teacher's top-K
  ``{id: log-prob}`` map (``echo`` + ``prompt_logprobs``), the inputs of the ``sampled``
  estimator and of ``fused_topk_turn_kl``.

Requests run concurrently (``max_concurrency`` threads) with a time-out each; a failed
request (refused connection, time-out, HTTP error, malformed JSON) is retried with
exponential back-off, then raises :class:`TeacherServerError`, one line naming the URL and
the request. The HTTP client is the standard library's (no extra dependency).

Prompt log-probs are those of the teacher's raw distribution: servers ignore the sampling
temperature for them.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tcod_fast.errors import UserError
from tcod_fast.rollout.generation import GenerationOutput, SamplingParams, _eos_ids, truncate_at_stop
from tcod_fast.server_requests import ServerRequestSettings

__all__ = ["ServedTeacher", "TeacherScores", "TeacherServerError", "parse_token_key"]


class TeacherServerError(UserError):
    """The teacher server could not answer a request after every retry."""


def parse_token_key(key) -> int:
    """A token id from a server's token key: ``"token_id:42"`` (``return_tokens_as_token_ids``),
    ``"42"`` or ``42``."""
    if isinstance(key, int):
        return key
    text = str(key)
    if text.startswith("token_id:"):
        text = text[len("token_id:") :]
    return int(text)


def _logprob_value(value) -> float:
    # vLLM answers a bare float; other servers a {"logprob": x, ...} record.
    if isinstance(value, dict):
        value = value["logprob"]
    return float(value)


@dataclass
class TeacherScores:
    """The teacher's log-probs on one sequence of ``L`` tokens.

    Attributes:
        token_logprobs: ``(L,)`` float32, ``log q(x_i | x_<i)``; position 0 (no context) is 0.
        topk_ids: ``(L, K)`` int64 top-K ids per position, ``-1`` padding (position 0 all -1).
        topk_logprobs: ``(L, K)`` float32 log-probs of ``topk_ids`` (0 at padding).
    """

    token_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor


@dataclass
class ServedTeacher(ServerRequestSettings):
    """Client of a teacher served by an OpenAI-compatible server.

    Attributes:
        server_url: base URL, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added).
        tokenizer: the tokenizer whose ids the server's model uses (decoding, eos).
        model, top_k, max_concurrency, timeout_s, retries, backoff_s: keyword-only, see
            :class:`ServerRequestSettings`.
        eos_token_ids: ids that end a response; default ``(tokenizer.eos_token_id,)``.
        context_limit: prompt + response limit of the served model; ``None`` reads
            ``max_model_len`` from ``/v1/models`` (vLLM's) when first needed.
    """

    server_url: str
    tokenizer: object
    eos_token_ids: tuple[int, ...] | None = None
    context_limit: int | None = None
    _models_read: bool = field(init=False, repr=False, default=False)
    _eos: tuple[int, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self.server_url = self.server_url.rstrip("/")
        if self.server_url.endswith("/v1"):
            self.server_url = self.server_url[: -len("/v1")]
        self._eos = _eos_ids(self.tokenizer, self.eos_token_ids)

    # ----------------------------------------------------------------------------- HTTP
    def _request(self, path: str, payload: dict | None, description: str) -> dict:
        """One JSON request with retries; ``payload=None`` is a GET."""
        url = f"{self.server_url}{path}"
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        attempts = self.retries + 1
        problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, data=data, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = response.read()
                answer = json.loads(body)
                if not isinstance(answer, dict):
                    raise ValueError(f"expected a JSON object, got {type(answer).__name__}")
                return answer
            except urllib.error.HTTPError as error:
                detail = error.read()[:200].decode(errors="replace").replace("\n", " ")
                problem = f"HTTP {error.code}: {detail}"
            except urllib.error.URLError as error:
                problem = f"{type(error.reason).__name__}: {error.reason}"
            except (TimeoutError, ConnectionError, OSError) as error:
                problem = f"{type(error).__name__}: {error}"
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                problem = f"malformed JSON: {error}"
        raise TeacherServerError(
            f"teacher server {self.server_url} failed {description} after {attempts} attempt(s): {problem}"
        )

    def _read_models(self) -> None:
        answer = self._request("/v1/models", None, "GET /v1/models")
        try:
            served = answer["data"][0] if self.model is None else next(m for m in answer["data"] if m["id"] == self.model)
            self.model = str(served["id"])
        except (KeyError, IndexError, TypeError, StopIteration) as error:
            raise TeacherServerError(
                f"teacher server {self.server_url} answered GET /v1/models without the model "
                f"{self.model or '(any)'}: {error!r}"
            ) from None
        if self.context_limit is None and served.get("max_model_len") is not None:
            self.context_limit = int(served["max_model_len"])
        self._models_read = True

    def model_name(self) -> str:
        """The served model's name (``model``, else the first of ``/v1/models``)."""
        if self.model is None:
            self._read_models()
        return self.model

    @property
    def max_context_tokens(self) -> int | None:
        """Prompt + response limit of the served model (``None``: the server does not say)."""
        if self.context_limit is None and not self._models_read:
            self._read_models()
        return self.context_limit

    def _completions(self, payloads: list[dict], what: str) -> list[dict]:
        model = self.model_name()
        descriptions = [
            f"POST /v1/completions ({what} {i + 1}/{len(payloads)}, {len(p['prompt'])} prompt tokens)"
            for i, p in enumerate(payloads)
        ]
        jobs = [({"model": model, **payload}, description) for payload, description in zip(payloads, descriptions)]
        if len(jobs) == 1 or self.max_concurrency <= 1:
            return [self._request("/v1/completions", p, d) for p, d in jobs]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self._request("/v1/completions", *job), jobs))

    def _malformed(self, description: str, error: Exception) -> TeacherServerError:
        return TeacherServerError(
            f"teacher server {self.server_url} answered {description} with an unexpected body: {error!r}"
        )

    # ----------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        """Sample one response per prompt on the server (same contract as
        :meth:`~tcod_fast.rollout.generation.HFGenerator.generate`). Prompt ``i`` is seeded
        with ``params.prompt_seeds[i]``, else ``params.seed + i`` when a seed is given."""
        if not prompts:
            return []
        params.check_prompt_seeds(len(prompts))
        payloads = []
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty; generation needs at least one token")
            payload = {
                "prompt": [int(t) for t in prompt],
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "logprobs": 0,
                "return_tokens_as_token_ids": True,
                "skip_special_tokens": False,
                "include_stop_str_in_output": True,
                "stop_token_ids": list(self._eos),
            }
            if params.top_k > 0:
                payload["top_k"] = params.top_k
            if params.stop_strings:
                payload["stop"] = list(params.stop_strings)
            seed = params.seed_of_prompt(index)
            if seed is not None:
                payload["seed"] = seed
            payloads.append(payload)
        answers = self._completions(payloads, "generate")
        results = []
        for index, answer in enumerate(answers):
            try:
                tokens = [parse_token_key(t) for t in answer["choices"][0]["logprobs"]["tokens"]]
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise self._malformed(f"generate request {index + 1}", error) from None
            kept, reason = truncate_at_stop(tokens, self.tokenizer, self._eos, params.stop_strings)
            results.append(
                GenerationOutput(
                    token_ids=kept, text=self.tokenizer.decode(kept, skip_special_tokens=False), finish_reason=reason
                )
            )
        return results

    # -------------------------------------------------------------------------- scoring
    def score(self, sequences: Sequence[Sequence[int]]) -> list[TeacherScores]:
        """The teacher's log-probs of every token of every sequence, and its top-K maps.

        Args:
            sequences: token-id lists (no padding), each at least one token.

        Returns:
            one :class:`TeacherScores` per sequence, ``K = top_k``.
        """
        payloads = [
            {
                "prompt": [int(t) for t in sequence],
                "max_tokens": 1,
                "temperature": 0.0,
                "echo": True,
                "prompt_logprobs": self.top_k,
                "return_tokens_as_token_ids": True,
            }
            for sequence in sequences
        ]
        answers = self._completions(payloads, "score")
        results = []
        for index, (sequence, answer) in enumerate(zip(sequences, answers)):
            try:
                results.append(self._parse_scores(sequence, answer["choices"][0]["prompt_logprobs"]))
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise self._malformed(f"score request {index + 1}", error) from None
        return results

    def _parse_scores(self, sequence: Sequence[int], positions: list) -> TeacherScores:
        length = len(sequence)
        if len(positions) != length:
            raise ValueError(f"{len(positions)} prompt_logprobs entries for {length} tokens")
        token_logprobs = torch.zeros(length, dtype=torch.float32)
        topk_ids = torch.full((length, self.top_k), -1, dtype=torch.int64)
        topk_logprobs = torch.zeros((length, self.top_k), dtype=torch.float32)
        for position, entry in enumerate(positions):
            if position == 0 or entry is None:
                continue
            mapping = {parse_token_key(key): _logprob_value(value) for key, value in entry.items()}
            token = int(sequence[position])
            if token not in mapping:
                raise ValueError(f"position {position} lacks the log-prob of its own token {token}")
            token_logprobs[position] = mapping[token]
            # The server adds the actual token to its top-K: keep the K most likely.
            best = sorted(mapping.items(), key=lambda item: item[1], reverse=True)[: self.top_k]
            topk_ids[position, : len(best)] = torch.tensor([i for i, _ in best], dtype=torch.int64)
            topk_logprobs[position, : len(best)] = torch.tensor([v for _, v in best], dtype=torch.float32)
        return TeacherScores(token_logprobs=token_logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
