"""One retry rule for the environments that talk to a server (Search-R1 retrieval, WebShop)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def with_retries(
    call: Callable[[], T],
    retries: int,
    backoff: float,
    retry_on: tuple[type[BaseException], ...],
    on_failure: Callable[[int, BaseException], None] | None = None,
) -> T:
    """`call()`, tried up to `retries + 1` times; before try k (k >= 1) it sleeps `backoff * 2**(k - 1)` s.

    Only errors of the `retry_on` types are retried (any other propagates at once); `on_failure(attempt,
    error)` hears of each failed try (attempt counts from 0). When every try failed, the last error is raised.
    """
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            return call()
        except retry_on as err:
            if on_failure is not None:
                on_failure(attempt, err)
            if attempt == retries:
                raise
    raise AssertionError("unreachable: the loop returns or raises")
