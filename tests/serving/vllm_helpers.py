"""A real vLLM OpenAI-compatible server on 127.0.0.1 for the tests, and tiny models vLLM accepts.

vLLM's attention needs a head dimension of 32, 64, 80, ...: the tiny models here have
``hidden_size / num_attention_heads = 32``. On CPU the KV cache is sized from host memory
(``--gpu-memory-utilization``), so it is kept small.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tcod_fast.rollout import vllm_unavailable_reason

VLLM_SKIP_REASON = vllm_unavailable_reason()
MEMORY_FRACTION = 0.05
MAX_MODEL_LEN = 1024
TINY_VLLM_MODEL = "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 1024, seed: %d}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_tiny_model(folder: Path, tokenizer, seed: int) -> Path:
    """A random-init tiny Llama (head dim 32) and ``tokenizer`` saved to ``folder``."""
    from tcod_fast.trainer.build import build_model
    from tcod_fast.tiny_models import TinyModelConfig

    model = build_model(
        None,
        TinyModelConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=MAX_MODEL_LEN, seed=seed,
        ),
        tokenizer,
    )
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving ``model_dir``; ``url`` once ready."""

    def __init__(
        self, model_dir: Path, log_path: Path, *, memory_fraction: float = MEMORY_FRACTION, startup_timeout_s: float = 900.0
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--gpu-memory-utilization", str(memory_fraction),
            "--max-model-len", str(MAX_MODEL_LEN), "--max-logprobs", "64", "--enforce-eager",
        ]
        self._log = open(log_path, "w")
        # A process group of its own: stop() ends the server and its engine process together.
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the vLLM server did not start; its log:\n{log_path.read_text()[-3000:]}")
                time.sleep(1.0)

    def stop(self) -> None:
        import os
        import signal

        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self._log.close()

    def kill(self) -> None:
        """End the server at once (SIGKILL to its process group), as a crash would."""
        import os
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@contextmanager
def running_server(model_dir: Path, log_path: Path):
    server = VLLMServer(model_dir, log_path)
    try:
        yield server
    finally:
        server.stop()
