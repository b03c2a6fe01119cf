"""The settings of requests to a teacher's OpenAI-compatible server, shared by the trainer's
``teacher`` config section and the client, :class:`~tcod_fast.rollout.served_teacher.ServedTeacher`.

Kept apart from the client so that reading a config does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["ServerRequestSettings"]


@dataclass(kw_only=True)
class ServerRequestSettings:
    """How a client talks to the teacher's server (keyword-only fields).

    Attributes:
        model: the served model's name; ``None`` asks ``/v1/models`` once (the server's
            first model).
        top_k: teacher log-probs per position in the client's top-K maps, the inputs of the
            ``topk`` estimator (the server's ``prompt_logprobs``; vLLM caps it with
            ``--max-logprobs``, default 20).
        max_concurrency: requests in flight at once.
        timeout_s: time-out of one request, in seconds.
        retries: retries of a failed request (refused, timed out, HTTP error, malformed JSON).
        backoff_s: wait before the first retry, doubled for each next one.
    """

    model: str | None = None
    top_k: int = 20
    max_concurrency: int = 8
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 1.0

    def request_settings(self) -> dict:
        """These settings as keyword arguments, e.g. for the client's constructor."""
        return {f.name: getattr(self, f.name) for f in fields(ServerRequestSettings)}
