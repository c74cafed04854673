"""Prometheus metrics of one worker process, served on AGENTQ_METRICS_PORT (0 = off)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

JOBS = Counter("agentq_jobs_total", "Jobs finished by this worker", ["status", "error_type"])
JOB_SECONDS = Histogram(
    "agentq_job_duration_seconds",
    "Run time of a job, claim to stored record",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
CALL_SECONDS = Histogram(
    "agentq_model_call_duration_seconds",
    "Latency of one model call through the Router",
    ["model", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
TOKENS = Counter("agentq_tokens_total", "Tokens used", ["model", "kind"])
COST = Counter("agentq_cost_usd_total", "Cost reported by the Router or the price table", ["model"])
RETRIES = Counter("agentq_retries_total", "Model calls retried", ["model", "error_type"])
IN_FLIGHT = Gauge("agentq_jobs_in_flight", "Agent runs in flight in this worker")
QUEUE_DEPTH = Gauge("agentq_queue_depth", "Jobs waiting in the queue (sampled by this worker)")
BREAKER_OPEN = Gauge(
    "agentq_breaker_open",
    "1 while the circuit breaker of a Router (empty model label) or of one model is open",
    ["router", "model"],
)
RATELIMIT_WAIT = Histogram(
    "agentq_ratelimit_wait_seconds",
    "How long model calls waited for their turn under a Router budget (AGENTQ_RATE_LIMITS)",
    ["budget"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LIVE_LOGS_DROPPED = Counter(
    "agentq_live_log_events_dropped_total",
    "Job log events not published live (Redis slow or down, or too many waiting)",
)
CPU_TURNS_OFF = Gauge(
    "agentq_cpu_turns_off",
    "1 while this worker's runs take no CPU turns (AGENTQ_CPU_TURNS): short of CPU, or for 1 s "
    "after a run held its turn past 50 ms",
)
CPU_TURN_OVERRUNS = Counter(
    "agentq_cpu_turn_overruns_total", "Runs that held their CPU turn past 50 ms (waiting on I/O)"
)
LEASED = Gauge("agentq_jobs_leased", "Jobs of its queue running on all workers (leases held)")


MAX_MODEL_LABELS = 50
_model_labels: set[str] = set()


def model_label(model: str) -> str:
    """The model's label value: the first MAX_MODEL_LABELS names seen, then "other" (jobs name
    models freely; a label per invented name would grow the registry without bound)."""
    if model in _model_labels:
        return model
    if len(_model_labels) < MAX_MODEL_LABELS:
        _model_labels.add(model)
        return model
    return "other"


_served: set[int] = set()


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Start the /metrics endpoint in a thread (prometheus_client's own server) on `host`:
    loopback unless AGENTQ_METRICS_HOST says otherwise (prometheus_client's own default is
    every interface)."""
    if port and port not in _served:  # once per process: a restarted worker loop reuses it
        start_http_server(port, addr=host)
        _served.add(port)
