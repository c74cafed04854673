"""agentq leans on arq 0.28's Worker internals (worker/arqworker.py) and on how arq cleans up
after a job. These fail loudly when an arq upgrade moves them; pyproject pins arq <0.29."""

from __future__ import annotations

import inspect

import arq
from arq import Worker

from worker.arqworker import BatchStartWorker


def test_arq_version_is_the_tested_one() -> None:
    assert arq.VERSION.startswith("0.28"), "re-check worker/arqworker.py against this arq"


def test_worker_internals_batchstartworker_uses() -> None:
    params = list(inspect.signature(Worker.start_jobs).parameters)
    assert params == ["self", "job_ids"]
    assert list(inspect.signature(Worker.run_job).parameters) == ["self", "job_id", "score"]
    for name in ("_release_sem_dec_counter_on_complete", "handle_sig", "close", "finish_job"):
        assert callable(getattr(Worker, name))
    src = inspect.getsource(Worker.__init__)
    for attr in (
        "self.job_counter",
        "self.sem",
        "self.tasks",
        "self._handle_signals",
        "self.health_check_key",
        "self.in_progress_timeout_s",
    ):
        assert attr in src, attr
    assert BatchStartWorker.close is not Worker.close


def test_arq_cleans_up_by_the_arq_job_id_only() -> None:
    """The generation scheme (one arq id per enqueue) is safe because arq's clean-up touches
    only keys named by the arq id of the run that ended."""
    src = inspect.getsource(Worker.finish_job) + inspect.getsource(Worker.finish_failed_job)
    assert "job_key_prefix + job_id" in src and "self.queue_name, job_id" in src
    assert "in_progress_key_prefix + job_id" in src


def test_claims_clean_up_what_arq_would() -> None:
    """A claim removes arq's keys of its enqueue (producer/store.py's dequeue), so
    BatchStartWorker.finish_job can skip arq's clean-up: the names and the call must match."""
    from arq import constants

    from producer import keys

    assert constants.job_key_prefix == keys.ARQ_JOB_PREFIX
    assert constants.in_progress_key_prefix == keys.ARQ_IN_PROGRESS_PREFIX
    assert constants.retry_key_prefix == keys.ARQ_RETRY_PREFIX
    assert list(inspect.signature(Worker.finish_job).parameters) == list(
        inspect.signature(BatchStartWorker.finish_job).parameters
    )
    assert "self.finish_job(" in inspect.getsource(Worker.run_job)
