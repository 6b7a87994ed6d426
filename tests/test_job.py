"""guard.pool.job: a request's steps and the pool's line, without processes."""

from __future__ import annotations

import threading

import pytest

from guard.errors import SessionClosed, WorkerFailed
from guard.pool.job import STEPS, Job, Line, Step


def job(deadline: float | None = None) -> Job:
    """A job with no arrays."""
    return Job({}, deadline, 2)


def job_at(step: Step) -> Job:
    """A new job brought to `step` by its own moves."""
    made = job()
    path = {
        Step.WAITING: [],
        Step.PLACED: [Step.PLACED],
        Step.SENT: [Step.PLACED, Step.SENT],
        Step.SETTLED: [Step.SETTLED],
    }[step]
    for move in path:
        assert made.to(move)
    return made


@pytest.mark.parametrize(
    ("here", "there"),
    [(here, there) for here, moves in STEPS.items() for there in sorted(moves, key=str)],
    ids=str,
)
def test_every_move_in_steps_is_made(here: Step, there: Step) -> None:
    """Each move in STEPS is allowed; a job back in line has no place any more."""
    made = job_at(here)
    assert made.to(there) and made.step is there
    if there is Step.WAITING:
        assert (made.slot, made.child, made.lane, made.shm) == (None, None, -1, None)


@pytest.mark.parametrize(
    ("here", "there"),
    [(h, t) for h in Step if h is not Step.SETTLED for t in Step if t not in STEPS[h]],
    ids=str,
)
def test_a_move_not_in_steps_raises(here: Step, there: Step) -> None:
    """Every other move raises AssertionError naming it; a settled job refuses every move."""
    made = job_at(here)
    with pytest.raises(AssertionError, match=f"job: no move {here} -> {there}"):
        made.to(there)
    settled = job_at(Step.SETTLED)
    assert [settled.to(s) for s in Step] == [False] * len(Step)


def test_the_outcome_reaches_its_waiter_and_its_listener() -> None:
    """A waiter gets the outputs delivered, or the error raised; `then` hears of it in the
    delivering thread; a cancelled job is dropped from the line's view."""
    heard: list[Job] = []
    got: list[object] = []
    served, failed, cancelled = job(), job(), job()
    served.then = heard.append
    assert not served.done
    waiter = threading.Thread(target=lambda: got.append(served.wait()))
    waiter.start()
    served.deliver({"y": None})  # type: ignore[dict-item]
    waiter.join(10)
    assert (heard, got, served.done) == ([served], [{"y": None}], True)
    failed.deliver(RuntimeError("broke"))
    with pytest.raises(RuntimeError, match="broke"):
        failed.wait()
    cancelled.cancelled = True
    assert cancelled.dropped and not served.dropped


def test_the_line_is_first_come_first_served_with_retries_at_its_head() -> None:
    """Jobs leave the line in the order they came, a retried one first; cancelled and settled
    ones are skipped on the way."""
    line = Line()
    a, b, c, retried = job(), job(), job(), job()
    for each in (a, b, c):
        line.push(each)
    line.push(retried, front=True)
    assert line.first() is retried
    line.pop()
    a.cancelled = True
    b.to(Step.SETTLED)
    assert line.first() is c and len(line) == 1
    assert line.clear() == [c] and line.first() is None


def test_deadlines_come_due_in_order_once_each() -> None:
    """The earliest deadline is next; due() gives each job whose deadline passed once; a job
    given a new deadline comes due by the new one only; dropped jobs are not watched."""
    line = Line()
    early, late, renewed, gone, never = job(10.0), job(30.0), job(20.0), job(15.0), job(None)
    for each in (late, early, renewed, gone, never):
        line.push(each)
    gone.cancelled = True
    renewed.deadline = 40.0
    line.watch(renewed)
    assert line.next_deadline() == 10.0
    assert line.due(25.0) == [early]
    assert line.due(25.0) == []
    assert line.next_deadline() == 30.0
    assert line.due(100.0) == [late, renewed]
    assert line.next_deadline() is None


def test_a_request_that_raised_then_was_lost_fails_with_both_reasons() -> None:
    """The error for a request that raised on one worker and was lost on the next is a
    WorkerFailed naming both, caused by the first error; once the pool is closed, it is
    SessionClosed, also after one failure only."""
    first = RuntimeError("forward broke")
    job = Job({}, None, 2)
    job.failures[:] = [("A raised", first), ("B was lost", None)]
    error = job.failure("twice", closed=False)
    assert type(error) is WorkerFailed and error.__cause__ is first
    assert (
        str(error)
        == "pool 'twice': the request failed on two workers: first A raised; then B was lost"
    )
    for failures in (job.failures, job.failures[:1]):
        job.failures = failures
        closed = job.failure("twice", closed=True)
        assert type(closed) is SessionClosed
        assert str(closed) == "pool 'twice' was closed during the request"
