"""Errors and warnings that are about what the user asked for, not about the code.

The ``tcod-fast`` command prints a :class:`UserError` as one line, ``tcod-fast <command>:
<message>``, and exits with code 2; any other exception is a bug and keeps its traceback.
A message names the setting, what was expected and what was received::

    trainer.max_grad_norm must be >= 0 (0 or null: no clipping), got -1.0

:class:`ConfigError` is a :class:`UserError` raised while reading or checking a config; it
is also a ``ValueError`` and a ``TypeError`` so code that caught those before still does.
"""

from __future__ import annotations

__all__ = ["ConfigError", "TcodFastWarning", "UserError"]


class UserError(ValueError):
    """A request that cannot be carried out as given (a bad value, a missing folder...)."""


class ConfigError(UserError, TypeError):
    """A config that cannot be read, or holds a key or value outside what it accepts."""


class TcodFastWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one
    ``tcod-fast <command>: warning: ...`` line)."""
