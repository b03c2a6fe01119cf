"""The built-in demo: on-policy distillation that makes students win, over several seeds,
and the papers' KL-escalation claim tested on the runs.

``tcod-fast demo [--out DIR] [--quick | --full] [--seed N]`` runs on CPU with nothing
downloaded:

1. **game and tokenizer**: the key-and-door game (:mod:`tcod_fast.envs.toy`), whose
   observations state everything the right next action depends on, and a word-level
   tokenizer learnt in code from the texts of every split;
2. **two teachers**, both small Llama models trained here:

   * *narrow*: supervised on the expert's own episodes only -- good on the expert's path,
     never shown a state off it;
   * *robust*: the narrow teacher continued with DAgger-style rounds: it plays training
     tasks itself, with a share of turns played by a random admissible action, every
     visited state is labelled with the environment's current-state expert, and it is
     fitted to everything collected so far;

3. **student starts**: one smaller model per seed, warm-started by a brief supervised pass
   on a few expert episodes (the papers distil into pretrained students that can already
   act a little); every algorithm of that seed starts from it;
4. **student runs**: each algorithm x teacher x seed distils for the same number of steps
   (the full-vocabulary forward KL(teacher || student) through the fused op for the OPD
   family; GRPO is the teacher-free baseline), with evaluations along the way;
5. **evaluation** at full depth on held-out seen and unseen tasks (temperature 0.4):
   success, and the exact reverse KL(student || teacher) per student token at each turn
   index of the student's own episodes, with its least-squares slope (the escalation
   slope);
6. **outputs** in ``--out``: ``results.json``, ``results.md`` (table and verdicts computed
   from the numbers), ``metrics.jsonl`` (every record labelled with what it evaluates),
   PNG plots, the models, and one folder per run.

Runs are spread over ``workers`` processes (one torch thread each). Every random draw is
seeded from ``--seed`` (the base seed; the student seeds are ``seed, seed + 1, ...``), so
the same command on the same machine gives the same numbers whatever the scheduling.

Modules: :mod:`~tcod_fast.demo.settings` (run kinds, the tuned grid, presets),
:mod:`~tcod_fast.demo.configs` (the run config of every job), :mod:`~tcod_fast.demo.jobs`
(the jobs and their process pool), :mod:`~tcod_fast.demo.experiment` (the demo from start to
end), :mod:`~tcod_fast.demo.stats` (intervals and paired differences over seeds),
:mod:`~tcod_fast.demo.report` (verdicts and ``results.md``) and
:mod:`~tcod_fast.demo.figures` (the plots).
"""

from tcod_fast.demo.configs import base_config, run_config
from tcod_fast.demo.experiment import run_demo
from tcod_fast.demo.report import results_table, verdicts
from tcod_fast.demo.settings import DemoSettings, Variant, demo_settings, parse_variant

__all__ = [
    "DemoSettings",
    "Variant",
    "base_config",
    "demo_settings",
    "parse_variant",
    "results_table",
    "run_config",
    "run_demo",
    "verdicts",
]
