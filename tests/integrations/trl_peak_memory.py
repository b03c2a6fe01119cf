"""Peak memory of one distillation step (loss + backward) of one TRL trainer, in this process.

``python trl_peak_memory.py fused|trl`` prints one JSON line: the peak resident memory of the
step above what the process held before it (MiB), the loss, and the shapes. Run each trainer in
its own process so the peaks do not share an allocator.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

VOCAB = 32768
BATCH, PROMPT, COMPLETION = 2, 8, 512  # 1024 completion tokens: one float32 tokens x vocab tensor is 128 MiB


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(which: str) -> None:
    import torch
    from trl import DistillationTrainer
    from trl_helpers import make_trainer, random_batch, tiny_pair, tiny_tokenizer

    from tcod_fast.integrations.trl import FusedDistillationTrainer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    student, teacher = tiny_pair(tokenizer, vocab_size=VOCAB)
    trainer_class = FusedDistillationTrainer if which == "fused" else DistillationTrainer
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(trainer_class, tokenizer, student, teacher, out)
    inputs = random_batch(VOCAB, batch=BATCH, prompt_len=PROMPT, completion_len=COMPLETION)
    # Warm-up on a short batch so one-time allocations (kernels, buffers) are not counted.
    trainer._compute_loss(student, random_batch(VOCAB, batch=3, completion_len=8), None)[0].backward()
    student.zero_grad(set_to_none=False)
    # Reset the kernel's high-water mark (VmHWM) to the current resident size.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _rss_mib("VmRSS:")
    loss, _, count = trainer._compute_loss(student, inputs, None)
    loss.backward()
    peak = _rss_mib("VmHWM:")
    print(json.dumps({
        "trainer": which, "step_peak_mib": round(peak - before, 1), "loss": float(loss), "tokens": int(count),
        "vocab": VOCAB, "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
