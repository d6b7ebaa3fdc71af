"""The one exception type a user is meant to read.

A `MaestroError` says what is wrong and what to do about it, in one line, and never carries
a secret. The CLI prints it without a traceback; Dagster shows it as the step's failure.
"""

from __future__ import annotations


class MaestroError(Exception):
    """A problem the user can fix: `problem` says what is wrong, `hint` what to do."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem.rstrip(".")
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}. {self.hint}" if self.hint else f"{self.problem}."


class TransientError(MaestroError):
    """A problem that may pass by itself: a database restarting or failing over, a store
    that stopped answering. Dagster steps retry it under their RetryPolicy (a configuration
    problem, any other MaestroError, fails at once); the CLI reports it like any other."""
