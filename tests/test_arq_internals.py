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


def test_arq_main_loop_that_batchstartworker_replaces() -> None:
    """BatchStartWorker.main copies arq's start-up and replaces its poll loop; its
    _poll_iteration reads the queue only when there may be work (see worker/arqworker.py)."""
    main = inspect.getsource(Worker.main)
    for line in (
        "create_pool(",
        "job_deserializer=self.job_deserializer",
        "expires_extra_ms=self.expires_extra_ms",
        "log_redis_info(self.pool",
        "self.ctx['redis'] = self.pool",
        "await self.on_startup(self.ctx)",
        "async for _ in poll(self.poll_delay_s)",
        "await self._poll_iteration()",
        "queued_jobs = await self.pool.zcard(self.queue_name)",
    ):
        assert line in main, line
    poll = inspect.getsource(Worker._poll_iteration)
    for line in (
        "self.allow_pick_jobs",
        "self._cancel_aborted_jobs()",
        "t.result()",
        "await self.heart_beat()",
        "await self.start_jobs(job_ids)",
    ):
        assert line in poll, line
    init = inspect.getsource(Worker.__init__)
    for attr in ("self.max_burst_jobs", "self.queue_read_limit", "self.poll_delay_s"):
        assert attr in init, attr
    # The drain waits for self.tasks to empty: the loop must tidy up ended runs meanwhile.
    assert "while len(self.tasks)" in inspect.getsource(Worker._sleep_until_tasks_complete)
    assert "self.allow_pick_jobs = False" in inspect.getsource(
        Worker.handle_sig_wait_for_completion
    )
    assert BatchStartWorker.main is not Worker.main
    assert BatchStartWorker._poll_iteration is not Worker._poll_iteration


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


def test_arq_run_job_that_batchstartworker_shortens() -> None:
    """BatchStartWorker.run_job is arq's run_job less its transaction before the run (the take
    returns the payload; the try count is not kept): what it copies must still be arq's."""
    from arq import jobs, worker

    run_job = inspect.getsource(Worker.run_job)
    for line in (
        # what the take replaces or BatchStartWorker leaves out
        "pipe.get(job_key_prefix + job_id)",
        "pipe.incr(retry_key_prefix + job_id)",
        "if self.allow_abort_jobs:",
        "max_tries = self.max_tries if function.max_tries is None else function.max_tries",
        "if job_try > max_tries:",
        # what it copies
        "deserialize_job_raw(\n                v, deserializer=self.job_deserializer",
        "function: Union[Function, CronJob] = self.functions[function_name]",
        "if hasattr(function, 'next_run'):",
        "timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s",
        "ctx = {**self.ctx, **job_ctx}",
        "if self.on_job_start:",
        "self.job_tasks[job_id] = task = self.loop.create_task(function.coroutine(ctx, *args, "
        "**kwargs))",
        "result = await asyncio.wait_for(task, timeout_s)",
        "del self.job_tasks[job_id]",
        "if self.retry_jobs and isinstance(e, Retry):",
        "incr_score = e.defer_score + (timestamp_ms() - score)",
        "elif job_id in self.aborting_tasks and isinstance(e, asyncio.CancelledError):",
        "elif self.retry_jobs and isinstance(e, (asyncio.CancelledError, RetryJob)):",
        "cancelled, will be run again",
        "self.jobs_retried += 1",
        "self.jobs_failed += 1",
        "self.jobs_complete += 1",
        "if result is not no_result and (keep_result_forever or result_timeout_s > 0):",
        "if self.on_job_end:",
        "await asyncio.shield(\n            self.finish_job(",
        "if self.after_job_end:",
    ):
        assert line in run_job, line
    assert list(inspect.signature(jobs.deserialize_job_raw).parameters) == ["r", "deserializer"]
    fields = set(inspect.signature(worker.Function).parameters)
    assert {"coroutine", "timeout_s", "keep_result_s", "keep_result_forever", "max_tries"} <= fields
    init = inspect.getsource(Worker.__init__)
    for attr in ("self.job_tasks", "self.retry_jobs", "self.log_results", "self.aborting_tasks"):
        assert attr in init, attr
    assert BatchStartWorker.run_job is not Worker.run_job
