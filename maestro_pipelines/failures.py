"""How user-fixable problems fail a Dagster step: at once, with the one-line message.

A `MaestroError` (bad config, unknown tenant, nothing to roll back) will not go away by
retrying, so the step fails without using its RetryPolicy; network errors still retry.
"""

import functools
import inspect

import dagster as dg

from maestro_pipelines.errors import MaestroError


def fail_fast_on_user_errors(fn):
    """Decorate an asset/op body (under `@dg.asset`/`@dg.op`): MaestroError -> non-retried Failure."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except MaestroError as exc:
                raise dg.Failure(description=str(exc), allow_retries=False) from None

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MaestroError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None

    return wrapper
