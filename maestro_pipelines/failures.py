"""How user-fixable problems fail a Dagster step: at once, with the one-line message.

A `MaestroError` (bad config, unknown tenant, nothing to roll back) will not go away by
retrying, so the step fails without using its RetryPolicy. A `TransientError` (a database
failing over, a store that stopped answering) and other exceptions (network errors) are
retried under the step's RetryPolicy, with the same one-line message.
"""

import functools
import inspect

import dagster as dg

from maestro_pipelines.errors import MaestroError, TransientError


def fail_fast_on_user_errors(fn):
    """Decorate an asset/op body (under `@dg.asset`/`@dg.op`): MaestroError -> non-retried Failure."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except MaestroError as exc:
                raise _as_failure(exc) from None

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MaestroError as exc:
            raise _as_failure(exc) from None

    return wrapper


def _as_failure(exc: MaestroError) -> dg.Failure:
    if isinstance(exc, TransientError):
        return dg.Failure(description=f"{exc} (transient: retried)", allow_retries=True)
    return dg.Failure(description=str(exc), allow_retries=False)
