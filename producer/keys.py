"""Every Redis key and channel name agentq uses (as arq's constants.py does)."""

PREFIX = "agentq"


def job(job_id: str) -> str:
    """Hash: status, custom_id, batch_id, spec (job JSON), result (record JSON), timestamps."""
    return f"{PREFIX}:job:{job_id}"


def batch(batch_id: str) -> str:
    """Hash: total, sealed, per-status counters, tokens, cost, created_at."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_order(batch_id: str) -> str:
    """List of job ids in input order; results stream from it."""
    return f"{PREFIX}:batch:{batch_id}:order"


def batch_events(batch_id: str) -> str:
    """Pub/sub channel: one message per job state change of the batch."""
    return f"{PREFIX}:events:{batch_id}"


BATCHES = f"{PREFIX}:batches"
"""Sorted set of batch ids by creation time."""

WORKERS = f"{PREFIX}:workers"
"""Hash: worker id -> JSON heartbeat (version, concurrency, in-flight, tools, agents, seen_at)."""

ARQ_JOB_PREFIX = "arq:job:"
"""arq's own key for a queued job's payload (arq.constants.job_key_prefix)."""

ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
"""arq's marker of a job being run (arq.constants.in_progress_key_prefix)."""

LEASES = f"{PREFIX}:leases"
"""Sorted set: running job id -> lease deadline (ms). A running job leaves arq's queue, so polls
cost nothing per job in flight; a job whose worker stops renewing goes back to the queue."""

CONTROL = f"{PREFIX}:control"
"""Pub/sub channel to workers: "cancel <batch_id>" stops that batch's running jobs."""
