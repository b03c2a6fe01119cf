"""The few lines a finished training run prints: its final evaluation per split, its last
training step, and where its files are (every number is in ``metrics.jsonl``)."""

from __future__ import annotations

__all__ = ["train_summary"]


def train_summary(run, seconds: float) -> str:
    """A few lines for the end of ``train``: the final evaluation per split, the last step,
    and where the files are (every number is in metrics.jsonl)."""
    config, folder = run.config, run.output_dir
    train_records = [r for r in run.state.history if r.get("kind") == "train"]
    final = run.state.last_eval or {}
    lines = [f"{config.logging.run_name or config.algorithm}: {run.state.next_step}/{config.trainer.steps} steps in {seconds:.0f} s"]
    splits = [split for split in ("seen", "unseen") if f"success_{split}" in final]
    if splits:
        rows = [
            ("success rate", "success_{}", "{:.3f}"),
            ("turns per episode", "turns_{}", "{:.2f}"),
            ("KL per token", "kl_{}/trajectory_mean", "{:.4f}"),
        ]
        lines.append(f"{'final evaluation (step ' + str(final.get('step', run.state.next_step)) + ')':<28}" + "".join(f"{s:>10}" for s in splits))
        for label, key, fmt in rows:
            values = [final.get(key.format(split)) for split in splits]
            if any(isinstance(v, (int, float)) for v in values):
                cells = "".join(f"{fmt.format(v) if isinstance(v, (int, float)) else '-':>10}" for v in values)
                lines.append(f"  {label:<26}{cells}")
        start = next((r for r in run.state.history if r.get("kind") == "eval" and r.get("step") == 0), None)
        if start is not None and start is not final:  # eval.at_start: where the student began
            cells = "".join(f"{start.get(f'success_{split}', float('nan')):>10.3f}" for split in splits)
            lines.append(f"  {'success before training':<26}{cells}")
    if train_records:
        last = train_records[-1]
        parts = [f"loss {last.get('loss', float('nan')):.4f}", f"KL {last.get('kl/trajectory_mean', float('nan')):.4f}"]
        parts.append(f"success {last.get('success', float('nan')):.2f}")
        lines.append(f"last training step ({last['step']}): " + ", ".join(parts))
    lines.append(f"metrics: {folder / 'metrics.jsonl'}   student: {folder / 'final'}   plots: {folder}/*.png")
    return "\n".join(lines)
