"""The one backoff rule: first, twice as long, ... at most ``most``; a success resets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpumesh.backoff import Backoff, backoff_delay


def test_waits_double_from_the_first_up_to_the_most_and_a_success_starts_again() -> None:
    backoff = Backoff(first=0.5, most=4.0)
    assert backoff.current == 0.5
    assert [backoff.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.succeeded()
    assert backoff.failed() == 0.5


def test_no_failure_no_wait() -> None:
    assert backoff_delay(0, 1.0, 60.0) == 0.0


@given(st.integers(1, 10_000), st.floats(0.01, 100), st.floats(0.01, 1000))
def test_a_wait_never_exceeds_the_most_and_never_shrinks(
    failures: int, first: float, most: float
) -> None:
    wait = backoff_delay(failures, first, most)
    assert wait <= most
    assert backoff_delay(failures + 1, first, most) >= wait
