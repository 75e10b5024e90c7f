"""envs/retry.py: the one retry rule of the server-backed environments."""

import pytest

from sdar_cli.envs.retry import with_retries


class Flaky(Exception):
    pass


def test_retries_until_success_and_reports_each_failure():
    calls, heard = [], []

    def call():
        calls.append(1)
        if len(calls) < 3:
            raise Flaky(f"try {len(calls)}")
        return "ok"

    assert with_retries(call, retries=2, backoff=0.0, retry_on=(Flaky,), on_failure=lambda a, e: heard.append((a, str(e)))) == "ok"
    assert heard == [(0, "try 1"), (1, "try 2")]


def test_the_last_error_is_raised_after_retries_plus_one_tries():
    calls = []

    def call():
        calls.append(1)
        raise Flaky(f"try {len(calls)}")

    with pytest.raises(Flaky, match="try 3"):
        with_retries(call, retries=2, backoff=0.0, retry_on=(Flaky,))
    assert len(calls) == 3


def test_other_errors_are_not_retried():
    calls = []

    def call():
        calls.append(1)
        raise KeyError("permanent")

    with pytest.raises(KeyError):
        with_retries(call, retries=5, backoff=0.0, retry_on=(Flaky,))
    assert len(calls) == 1
