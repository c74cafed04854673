"""Every Redis key and channel name agentq uses (as arq's constants.py does)."""

PREFIX = "agentq"

DEFAULT_QUEUE = "agentq:queue"
"""AGENTQ_QUEUE's default. Its jobs' keys keep the names they had before queues had keys of
their own (see of_queue)."""


def of_queue(name: str, queue: str) -> str:
    """The key (or key prefix) `name` for the jobs of one queue. Leases, the repair sweep's
    cursor, fair share's clock and tenant turns are kept per queue, so one queue's workers
    never reap, repair or place another queue's jobs (into their own queue). The default
    queue keeps the bare name; another gets `name@queue|` (queue names hold no '|'). A prefix
    (ending in ':') keeps its ':' last, so no key of the default queue starts like it."""
    if queue == DEFAULT_QUEUE:
        return name
    if name.endswith(":"):
        return f"{name[:-1]}@{queue}|:"
    return f"{name}@{queue}|"


def job(job_id: str) -> str:
    """Hash: status, custom_id, batch_id, spec (job JSON), result (record JSON), timestamps."""
    return f"{PREFIX}:job:{job_id}"


def batch(batch_id: str) -> str:
    """Hash: total, sealed, per-status counters, tokens, cost, created_at, queue (the one it
    was submitted to: its jobs stay there)."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_order(batch_id: str) -> str:
    """List of job ids in input order; results stream from it."""
    return f"{PREFIX}:batch:{batch_id}:order"


def batch_events(batch_id: str) -> str:
    """Pub/sub channel: one message per job state change of the batch."""
    return f"{PREFIX}:events:{batch_id}"


def batch_logs(batch_id: str) -> str:
    """Pub/sub channel: the batch's job log events as workers capture them, for `logs
    --follow` (worker/livelogs.py: JSON lists of {"job_id", "custom_id", "i", "event"})."""
    return f"{PREFIX}:logs:{batch_id}"


def batch_settled(batch_id: str) -> str:
    """Pub/sub channel: a message when the batch may have finished (no job of it is queued or
    running any more, or it was just sealed). Waiters hear this, not one message per job."""
    return f"{PREFIX}:settled:{batch_id}"


def batch_progress(batch_id: str) -> str:
    """Pub/sub channel: the batch's counters changed. At most one message per
    PROGRESS_THROTTLE_MS per batch (a change inside that window is announced by no message of
    its own: listeners re-read once a window after the last message they heard)."""
    return f"{PREFIX}:progress:{batch_id}"


def batch_progress_throttle(batch_id: str) -> str:
    """String, set for PROGRESS_THROTTLE_MS after each progress message of the batch."""
    return f"{PREFIX}:batch:{batch_id}:throttle"


PROGRESS_THROTTLE_MS = 20


def wake(queue: str) -> str:
    """Pub/sub channel: a message when jobs were put in `queue` (submit, retry, a release, a
    reap, a repair). Idle workers sleep until they hear it instead of polling."""
    return f"{PREFIX}:wake:{queue}"


BATCHES = f"{PREFIX}:batches"
"""Sorted set of batch ids by creation time."""

WORKERS = f"{PREFIX}:workers"
"""Hash: worker id -> JSON heartbeat (version, concurrency, in-flight, tools, agents, seen_at)."""

ARQ_JOB_PREFIX = "arq:job:"
"""arq's own key for a queued job's payload (arq.constants.job_key_prefix)."""

ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
"""arq's marker of a job being run (arq.constants.in_progress_key_prefix)."""

ARQ_RETRY_PREFIX = "arq:retry:"
"""arq's count of a job's tries (arq.constants.retry_key_prefix)."""

LEASES = f"{PREFIX}:leases"
"""Sorted set: running job id -> lease deadline (ms on Redis's clock). A running job leaves
arq's queue, so polls cost nothing per job in flight; a job whose worker stops renewing goes
back to the queue."""

CLOCK = f"{PREFIX}:clock"
"""Redis time (ms) of the last lease renewal or reap by any worker. A gap longer than half a
lease means nobody could renew (Redis or every worker was away): leases are extended by the gap
instead of being reaped, so an outage never re-runs live jobs."""

ACTIVE = f"{PREFIX}:active"
"""Sorted set: batches with queued or running jobs (score: creation ms). Their keys never
expire; the reconciler walks their jobs."""

SWEEPS = f"{PREFIX}:sweeps"
"""Sorted set: batches that just became inactive -> how many of their job records have had
their TTL re-armed so far (a bounded background sweep)."""

RECONCILE = f"{PREFIX}:reconcile"
"""Hash: the reconciler's cursor (batch, offset), shared by all workers."""

RECONCILE_LOCK = f"{PREFIX}:reconcile:lock"
"""Set for one reconcile interval by whichever worker ran the last sweep step."""

CONTROL = f"{PREFIX}:control"
"""Pub/sub channel to workers: "cancel <batch_id>" stops that batch's running jobs; "budgets
{name: shift}" says a 429 moved those budgets' turns (worker/ratelimit.py)."""

VCLOCK = f"{PREFIX}:vclock"
"""The fleet's virtual time for fair share: the highest place (queue score, without its batch's
priority offset) of any job started. New jobs are placed from here; see store.py."""

TENANT_PREFIX = f"{PREFIX}:tenant:"
"""Hash per tenant (metadata.tenant): where its next jobs are placed, per priority offset:
`vnext:<offset>` (its next place in the fleet's virtual time) and `tv:<offset>` (its own
virtual time, between its batches)."""

TENANT_QUEUE_PREFIX = f"{PREFIX}:tq:"
"""Sorted set per (priority offset, tenant), `<offset>:<tenant>`: the tenant's queued job ids
by their place among the tenant's own batches. Whichever of its queue entries a worker takes,
the job run is this set's first (store.py: a tenant's turn)."""

TENANT_PLACES_PREFIX = f"{PREFIX}:tp:"
"""Sorted set per (priority offset, tenant), as TENANT_QUEUE_PREFIX: the same job ids by their
place in arq's queue, so a cancelled job's place can go to the tenant's job placed last."""


BREAKERS = f"{PREFIX}:breakers"
"""Hash: circuit breaker -> JSON state ("router|<name>" or "model|<router>|<model>"). A field
exists only while its dependency is failing; workers share it, `status` and `health` read it."""

BUDGETS = f"{PREFIX}:budgets"
"""Hash: Router budget (AGENTQ_RATE_LIMITS name) -> JSON state: its schedule (when requests
and tokens are next free, ms on Redis's clock), the Router's slow-downs, the last minutes' use.
Workers write it, `status` and `health` read it."""
