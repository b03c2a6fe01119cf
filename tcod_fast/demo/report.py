"""The demo's claims in words and its ``results.md``: paired comparisons read from their
intervals (:func:`compare`), the verdicts computed from the numbers (:func:`verdicts`), and
the table of results (:func:`results_table`)."""

from __future__ import annotations

from tcod_fast.demo.settings import TEACHERS, parse_variant
from tcod_fast.demo.stats import paired_difference

__all__ = ["compare", "results_table", "verdicts"]


def _interval(entry: dict) -> str:
    lo, hi = entry["kl_escalation_slope_ci95"]
    return f"{entry['kl_escalation_slope']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _display_name(variant: str) -> str:
    """``tcod_f2b@sampled`` -> ``TCOD-F2B (sampled)``."""
    algorithm, _, how = variant.partition("@")
    names = {"opd": "OPD", "guided_opd": "Guided-OPD", "grpo": "GRPO", "atod": "ATOD", "sod": "SOD"}
    name = names.get(algorithm, algorithm.upper().replace("_", "-"))
    return f"{name} ({how.replace('_', ' ')})" if how else name


def _diff_text(entry: dict) -> str:
    parts = []
    for split in ("seen", "unseen"):
        lo, hi = entry[f"success_{split}_diff_ci95"]
        parts.append(f"{split} {entry[f'success_{split}_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    return ", ".join(parts)


def compare(entry: dict) -> str:
    """``beats``, ``loses to``, ``ties with`` or ``is mixed against`` the baseline of a
    paired difference: on each split the 95% interval lies above 0, below 0, or contains it."""
    signs = []
    for split in ("seen", "unseen"):
        lo, hi = entry[f"success_{split}_diff_ci95"]
        signs.append(1 if lo > 0 else -1 if hi < 0 else 0)
    if 1 in signs and -1 in signs:
        return "is mixed against"
    if 1 in signs:
        return "beats"
    if -1 in signs:
        return "loses to"
    return "ties with"


def verdicts(headline: dict, runs: list[dict] | None = None) -> list[str]:
    """The demo's claims in words, each computed from the headline numbers (and, given the
    runs, the paired comparisons of formulations)."""
    lines = []
    robust, narrow = headline.get("robust", {}), headline.get("narrow", {})
    init = headline["student_init"]
    teacher = headline["teacher"]["robust"]
    if "opd" in robust:
        opd = robust["opd"]
        for split in ("seen", "unseen"):
            gain = opd[f"success_{split}"] - init[f"success_{split}"]
            share = opd[f"success_{split}"] / teacher[f"success_{split}"] if teacher[f"success_{split}"] else float("nan")
            lines.append(
                f"OPD from the robust teacher, {split} tasks: success {init[f'success_{split}']:.2f} before -> "
                f"{opd[f'success_{split}']:.2f} after (gain {gain:+.2f}; {share:.0%} of the teacher's "
                f"{teacher[f'success_{split}']:.2f})."
            )
        last_two = opd.get("last_two_evals")
        if last_two:
            agree = all(v["agree"] for v in last_two.values())
            detail = "; ".join(
                f"{split} {v['previous']:.2f} at step {v['steps'][0]} and {v['last']:.2f} at step {v['steps'][1]} "
                f"(seed std {v['seed_std']:.2f}, one task {v.get('one_task', 0.0):.2f})"
                for split, v in last_two.items()
            )
            state = "agree within their seed spread or one task (converged)" if agree else "differ by more than their seed spread and one task (still moving)"
            lines.append(f"OPD from the robust teacher: its last two evaluations {state}: {detail}.")
    for teacher_name, entries in (("robust", robust), ("narrow", narrow)):
        for algorithm, entry in entries.items():
            if "vs_opd" not in entry:
                continue
            versus = entry["vs_opd"]
            lines.append(
                f"{_display_name(algorithm)} {compare(versus)} {_display_name(versus['opd'])} under the {teacher_name} "
                f"teacher (success difference paired by seed, 95% interval: {_diff_text(versus)})."
            )
    if runs:
        for teacher_name, entries in (("robust", robust), ("narrow", narrow)):
            for algorithm in entries:
                if "@" in algorithm or f"{algorithm}@sampled" not in entries:
                    continue
                mine = [r for r in runs if r["teacher"] == teacher_name and r["algorithm"] == f"{algorithm}@sampled"]
                theirs = [r for r in runs if r["teacher"] == teacher_name and r["algorithm"] == algorithm]
                difference = paired_difference(mine, theirs)
                if difference:
                    lines.append(
                        f"{_display_name(algorithm)} in the papers' sampled-token formulation {compare(difference)} the "
                        f"full-vocabulary one under the {teacher_name} teacher ({_diff_text(difference)})."
                    )
    if "opd" in narrow:
        opd = narrow["opd"]
        lo, hi = opd["kl_escalation_slope_ci95"]
        if lo > 0:
            state = "shows KL escalation: the slope's 95% interval lies above 0"
        elif hi < 0:
            state = "shows KL falling with the turn index: the slope's 95% interval lies below 0"
        else:
            state = "shows no significant KL escalation: the slope's 95% interval contains 0"
        lines.append(f"OPD under the narrow teacher {state} (slope per turn {_interval(opd)}).")
    for teacher_name, entries in (("robust", robust), ("narrow", narrow)):
        for algorithm, entry in entries.items():
            baseline = entries.get(parse_variant(algorithm).opd_baseline)
            if not algorithm.startswith(("tcod_f2b", "tcod_b2f")) or baseline is None:
                continue
            opd_lo, opd_hi = baseline["kl_escalation_slope_ci95"]
            lo, hi = entry["kl_escalation_slope_ci95"]
            if hi < opd_lo:
                state = "flatter than OPD (its slope interval lies below OPD's)"
            elif lo > opd_hi:
                state = "steeper than OPD (its slope interval lies above OPD's)"
            else:
                state = "not distinguishable from OPD (the slope intervals overlap)"
            lines.append(
                f"{_display_name(algorithm)}'s KL escalation under the {teacher_name} teacher is {state}: "
                f"{_interval(entry)} vs OPD {_interval(baseline)}."
            )
    return lines


_DIVERGENCE_NAMES = {
    "reverse_kl": "reverse KL(student || teacher)",
    "forward_kl": "forward KL(teacher || student)",
    "jsd": "generalised Jensen-Shannon divergence",
}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_table(results: dict) -> str:
    """``results.md``: the table of means over seeds, then the verdicts."""
    headline, setup = results["headline"], results["setup"]
    settings = setup["settings"]
    algorithms = settings.get("algorithms", {})
    lines = [
        "# Built-in demo: distillation in the key-and-door game",
        "",
        f"Means over {headline['seeds']} seeds ({', '.join(map(str, setup['seeds']))}), +- the standard deviation "
        "over seeds. vs OPD: the success difference to OPD in the same formulation under the same teacher, paired by "
        "seed (the same student start), with its 95% t-interval; the slope's interval is the 95% t-interval over seeds.",
        "",
        "| teacher | run | formulation | lr x updates | success seen | success unseen | vs OPD, seen | vs OPD, unseen "
        "| final KL (seen) | KL escalation slope per turn [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for teacher in TEACHERS:
        lines.append(
            f"| {teacher} | the teacher itself | | | {_fmt(headline['teacher'][teacher]['success_seen'])} | "
            f"{_fmt(headline['teacher'][teacher]['success_unseen'])} | | | | |"
        )
    init = headline["student_init"]
    lines.append(
        f"| - | student before distillation | | | {_fmt(init['success_seen'])} +- {_fmt(init['success_seen_std'])} | "
        f"{_fmt(init['success_unseen'])} +- {_fmt(init['success_unseen_std'])} | | | {_fmt(init['final_kl'], 3)} (vs robust) | |"
    )
    for teacher in TEACHERS:
        for algorithm, entry in headline.get(teacher, {}).items():
            point = algorithms.get(algorithm, {})
            budget = f"{point['lr']:g} x {point['updates_per_step']}" if point else ""
            versus = entry.get("vs_opd")
            diffs = [
                f"{versus[f'success_{s}_diff']:+.2f} [{versus[f'success_{s}_diff_ci95'][0]:+.2f}, {versus[f'success_{s}_diff_ci95'][1]:+.2f}]"
                if versus else ""
                for s in ("seen", "unseen")
            ]  # fmt: skip
            lines.append(
                f"| {teacher} | {algorithm} | {entry.get('formulation') or '-'} | {budget} | "
                f"{_fmt(entry['success_seen'])} +- {_fmt(entry['success_seen_std'])} | "
                f"{_fmt(entry['success_unseen'])} +- {_fmt(entry['success_unseen_std'])} | {diffs[0]} | {diffs[1]} | "
                f"{_fmt(entry['final_kl'], 3)} | {_interval(entry)} |"
            )
    lines += ["", "## Verdicts", ""] + [f"- {line}" for line in results["verdicts"]]
    grid = settings.get("grid", {})
    lines += [
        "",
        "## How it was measured",
        "",
        f"Training: every run has the same budget, {settings['steps']} steps of {settings['episodes_per_step']} episodes "
        f"(GRPO groups of {settings['grpo_group_size']} for the algorithms that have them), AdamW with a "
        f"{settings['lr_schedule']} schedule after {settings['warmup_steps']} warm-up steps; the learning rate and the "
        f"updates per step are each variant's best point of one grid shared by all, "
        f"{', '.join(f'{lr:g} x {u}' for lr, u in grid.get('points', []))} (chosen by final success on the seen split "
        f"with student seeds {grid.get('tuning_seeds')}, which are not the seeds reported here; {grid.get('source')}). "
        f"Curricula reach full depth by step {settings['eta'] * (settings['max_turns'] - 1)} (eta = {settings['eta']}). "
        f"Full-vocabulary formulation: the exact {_DIVERGENCE_NAMES[settings['divergence']]} on the student's tokens "
        f"through the fused op, rollouts at temperature {settings['rollout_temperature']}. Sampled formulation (the "
        "papers'): the advantage log q(a) - log p(a) of each sampled token in a PPO clipped surrogate, rollouts at "
        f"temperature {settings['policy_gradient_rollout_temperature']} (as GRPO's), so that the policy gradient is "
        "taken for the policy that sampled.",
        "",
        "Success: the share of held-out tasks won by the student playing every turn at temperature 0.4 "
        f"({settings['eval_tasks']} seen and {settings['eval_tasks']} unseen tasks per run at the end; evaluations "
        f"every {settings['eval_every']} steps on the first {settings['interim_eval_tasks']} of each). "
        "KL: the exact full-vocabulary reverse KL(student || teacher) per student token on the student's own "
        "evaluation episodes (seen tasks), against the run's own teacher; the slope is the least-squares slope of "
        "the per-(episode, turn) mean KL against the turn index. Later turns exist only in longer episodes, so "
        "the slope mixes the turn index with the kind of episode that lasts that long.",
        "",
        f"Teacher {setup['parameters']['teacher']} parameters, student {setup['parameters']['student']}, "
        f"vocabulary {setup['vocab_size']} tokens. {setup['cpu']}, {setup['workers']} worker processes of "
        f"{setup['threads']} thread; {setup['wall_seconds']:.0f} s in all. Commit {setup['commit']}; "
        f"torch {setup['versions']['torch']}, transformers {setup['versions']['transformers']}.",
        "",
    ]
    return "\n".join(lines)
