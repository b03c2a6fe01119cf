"""Drop-in use of tcod-fast inside the trainers people already run.

* :mod:`tcod_fast.integrations.trl` -- ``FusedDistillationTrainer``, TRL's
  ``DistillationTrainer`` with its loss computed by :func:`tcod_fast.fused_linear_turn_kl`
  (needs the ``[trl]`` extra), and ``FusedServerDistillationTrainer`` for a teacher behind an
  inference server (:func:`tcod_fast.fused_topk_turn_kl`).
* :mod:`tcod_fast.integrations.verl` -- verl registrations: the distillation loss
  ``tcod_fused_kl``, the advantage estimator ``tcod_opd`` and the policy loss ``tcod_opd``
  (needs ``verl``, which lives in its own environment: see the README).
* :mod:`tcod_fast.integrations.curriculum` -- the TCOD-F2B/B2F, Guided-OPD and ATOD schedules
  as a small standalone API for one's own rollout code (needs nothing beyond the core).

Each module imports its library on import; this package imports none of them.
"""
