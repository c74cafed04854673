"""The deployment files (Dockerfiles, docker-compose.yml, Prometheus and Grafana configs) are
checked without a Docker engine: parsed and cross-checked against the code they deploy."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "agentq-dashboard.json"
PROMETHEUS = ROOT / "ops" / "prometheus.yml"
METRICS_PORT = 9108
SHUTDOWN_GRACE_S = 30  # AGENTQ_SHUTDOWN_GRACE_S's default


# --- YAML ----------------------------------------------------------------------------------


def _yaml_via_router_venv(path: Path) -> Any:
    """PyYAML is not among agentq's dependencies; the Router's venv (ops/router/install.sh,
    which CI runs first) has it. Parse there and hand the document back as JSON."""
    python = ROOT / ".venv-router" / "bin" / "python"
    if not python.exists():
        pytest.skip("PyYAML is not installed here, nor in .venv-router (ops/router/install.sh)")
    code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    out = subprocess.run(
        [str(python), "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@cache
def load_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        return _yaml_via_router_venv(path)
    return yaml.safe_load(path.read_text())


_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")

SECRETS = ("REDIS_PASSWORD", "HANZO_API_KEY", "ROUTER_MASTER_KEY", "GRAFANA_ADMIN_PASSWORD")
"""Variables compose must refuse to start without (no weak default)."""


def interpolate(value: str) -> str:
    """Compose's interpolation with an empty environment: ${X:-default} -> default; a required
    ${X:?message} becomes the placeholder <X>."""
    return _VAR.sub(lambda m: f"<{m.group(1)}>" if m.group(2) == "?" else m.group(3) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def duration_s(value: str) -> float:
    """A compose duration: 45s, 1m30s, 2m."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), value
    return sum(float(n) * units[u] for n, u in parts)


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "router", "simrouter", "worker", "producer"} <= set(services)
    assert services["producer"]["profiles"] == ["producer"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    for name in ("redis", "router", "simrouter", "worker"):
        assert "profiles" not in services[name], f"{name} must start with a plain `up`"


def test_compose_redis_persists(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_compose_worker_scales_and_drains(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "--scale worker=N needs generated names"
    assert "ports" not in worker, "a published host port would clash between replicas"
    assert worker["command"] == ["worker", "--processes", "${AGENTQ_WORKER_PROCESSES:-auto}"]
    env = env_of(worker)
    grace = int(env.get("AGENTQ_SHUTDOWN_GRACE_S", SHUTDOWN_GRACE_S))
    assert duration_s(worker["stop_grace_period"]) > grace
    assert int(env["AGENTQ_METRICS_PORT"]) == METRICS_PORT
    assert int(env["AGENTQ_CONCURRENCY"]) > 0
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["router"]["condition"] == "service_healthy"


FLEET_SETTINGS = (
    "AGENTQ_ROUTERS",
    "AGENTQ_RATE_LIMITS",
    "AGENTQ_PRICES",
    "AGENTQ_MCP_SERVERS",
    "AGENTQ_PLUGINS",
)
"""Settings every worker must share (README, "Deploying"), passed through from the shell."""


def test_compose_passes_the_fleet_settings_to_workers(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """AGENTQ_RATE_LIMITS and its siblings reach the workers from the shell or .env. Unset,
    compose passes them as empty strings, and a worker takes that as none: it refused an empty
    AGENTQ_RATE_LIMITS (or AGENTQ_ROUTERS, AGENTQ_PRICES) as bad JSON and would not start."""
    from producer.settings import load_settings

    raw = services["worker"]["environment"]
    for name in FLEET_SETTINGS:
        assert raw.get(name) == f"${{{name}:-}}", name
    for name in list(os.environ):
        if name.upper().startswith(("AGENTQ_", "HANZO_")) or name.upper() == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    for name, value in env_of(services["worker"]).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.rate_limits == settings.routers == settings.prices == {}
    assert settings.mcp_servers == "" and settings.plugins == []
    monkeypatch.setenv("AGENTQ_RATE_LIMITS", '{"*": {"rpm": 1140}}')
    assert load_settings().rate_limits["*"].rpm == 1140


@pytest.mark.parametrize("name", ["worker", "producer"])
def test_compose_agentq_env_points_at_services(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    env = env_of(services[name])
    redis = urlparse(env["REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert redis.password == "<REDIS_PASSWORD>"
    router = urlparse(env["HANZO_ROUTER_URL"])
    assert (router.hostname, router.port, router.path) == ("router", 4000, "/v1")
    # The Router accepts agentq's key; its master (admin) key is another one agentq never holds.
    router_env = env_of(services["router"])
    assert env["HANZO_API_KEY"] in router_env["ROUTER_KEYS"].split(",")
    assert router_env["HANZO_API_KEY"] == "<ROUTER_MASTER_KEY>" != env["HANZO_API_KEY"]


def test_compose_secrets_have_no_default() -> None:
    """Compose refuses to start without each secret, instead of using a value anyone knows."""
    text = COMPOSE.read_text()
    used = {m.group(1): m.group(2) for m in _VAR.finditer(text) if m.group(1) in SECRETS}
    assert set(used) == set(SECRETS)
    for m in _VAR.finditer(text):
        if m.group(1) in SECRETS:
            assert m.group(2) == "?", f"{m.group(0)} has a default"
            assert "README" in m.group(3), "the message says where to read on"


def test_compose_redis_requires_its_password(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert env_of(redis)["REDIS_PASSWORD"] == "<REDIS_PASSWORD>"
    # sh expands the password (compose's $$ is a literal $); docker-entrypoint.sh still runs
    entrypoint = redis["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"]
    assert '--requirepass "$$REDIS_PASSWORD"' in entrypoint[2]
    assert entrypoint[2].startswith('exec docker-entrypoint.sh "$$@"')
    assert redis["command"][0] == "redis-server"
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])


def test_metrics_listen_on_every_interface_only_in_the_container(
    services: dict[str, dict[str, Any]],
) -> None:
    """Prometheus scrapes workers over the container network; elsewhere the default is
    loopback (tests/test_metrics_bind.py)."""
    assert env_of(services["worker"])["AGENTQ_METRICS_HOST"] == "0.0.0.0"
    final = final_stage(instructions(ROOT / "Dockerfile"))
    env = " ".join(args for word, args in final if word == "ENV")
    assert "AGENTQ_METRICS_HOST=0.0.0.0" in env


def test_compose_router(services: dict[str, dict[str, Any]]) -> None:
    router = services["router"]
    assert router["build"]["dockerfile"] == "ops/router/Dockerfile"
    assert (ROOT / router["build"]["context"] / router["build"]["dockerfile"]).is_file()
    env = env_of(router)
    for key in ("HANZO_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "SIMROUTER_API_KEY"):
        assert key in env
    assert "/health/liveliness" in " ".join(router["healthcheck"]["test"])
    # By default its models' upstream is the simulator service, on the port it listens on.
    upstream = urlparse(env["SIMROUTER_URL"])
    sim = services["simrouter"]
    assert upstream.hostname == "simrouter"
    assert sim["entrypoint"] == ["python", "-m", "ops.simrouter"]
    command = sim["command"]
    assert command[command.index("--port") + 1] == str(upstream.port)
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert env_of(sim)["SIMROUTER_API_KEY"] == env["SIMROUTER_API_KEY"]


def test_compose_producer_one_shot(services: dict[str, dict[str, Any]]) -> None:
    producer = services["producer"]
    command = producer["command"]
    assert command[0] == "submit" and "--wait" in command
    mount = next(v for v in producer["volumes"] if v.split(":")[1] == "/jobs")
    host, target, mode = mount.split(":")
    assert mode == "ro"
    job_file = command[1]
    assert job_file.startswith(target + "/")
    assert (ROOT / host / job_file.removeprefix(target + "/")).is_file()
    assert producer.get("restart", "no") == "no"


def test_compose_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_compose_config_cli() -> None:
    """`docker compose config` (or the standalone docker-compose) validates the file against
    the Compose schema without a Docker engine."""
    if shutil.which("docker") and _ok(["docker", "compose", "version"]):
        cmd = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    else:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    secrets = {name: f"test{i}secret" for i, name in enumerate(SECRETS)}
    for profiles in ([], ["--profile", "producer", "--profile", "monitoring"]):
        out = subprocess.run(
            [*cmd, "-f", str(COMPOSE), *profiles, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**env, **secrets},
        )
        assert out.returncode == 0, out.stderr
    # without its secrets, compose refuses to start
    out = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, **secrets, "REDIS_PASSWORD": ""},
    )
    assert out.returncode != 0 and "REDIS_PASSWORD" in out.stderr


def _ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


# --- Dockerfiles -----------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"^\s*#.*\n", "", path.read_text(), flags=re.M)
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last(instrs: list[tuple[str, str]], name: str) -> str:
    values = [args for word, args in instrs if word == name]
    assert values, f"no {name}"
    return values[-1]


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instrs) if word == "FROM"]
    return instrs[starts[-1] :]


def dockerignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, p.removeprefix("**/")) or fnmatch.fnmatch(prefix, p)
        for p in patterns
        for prefix in prefixes
    )


def copied_sources(instrs: list[tuple[str, str]]) -> list[str]:
    sources = []
    for word, args in instrs:
        if word == "COPY" and "--from=" not in args:
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    return sources


def assert_non_root(instrs: list[tuple[str, str]]) -> None:
    user = last(final_stage(instrs), "USER").split(":")[0]
    assert user not in ("root", "0", ""), user


def test_agentq_dockerfile() -> None:
    instrs = instructions(ROOT / "Dockerfile")
    for word, args in instrs:
        if word == "FROM":
            assert args.split()[0] == "python:3.11-slim"
    final = final_stage(instrs)
    assert_non_root(instrs)
    assert json.loads(last(final, "ENTRYPOINT")) == ["agentq"]
    assert json.loads(last(final, "CMD")) == ["worker", "--processes", "auto"]
    assert str(METRICS_PORT) in last(final, "EXPOSE").split()
    # No build tools, and the project is installed by pip without a cache.
    assert not any(word == "RUN" and "apt-get" in args for word, args in final)
    install = " ".join(args for word, args in instrs if word == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", install)


def test_agentq_image_has_every_package() -> None:
    """The build copies every top-level package pyproject installs, and pyproject's readme."""
    instrs = instructions(ROOT / "Dockerfile")
    sources = copied_sources(instrs)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in sources
    assert project["project"]["readme"] in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"{source} is in .dockerignore"


OPTIONAL_IMPORTS = {"uvloop": "used when installed, under `suppress(ImportError)`"}


def _declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", d)[0].lower().replace("_", "-") for d in requirements}


def test_agentq_image_installs_what_the_worker_imports() -> None:
    """The image gets only pyproject's dependencies: every third-party module that agentq's
    own code imports must come from a declared one (found by scanning the imports)."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = _declared(project["project"]["dependencies"])
    optional = _declared(project["project"]["optional-dependencies"]["otel"])
    dists = packages_distributions()
    missing = {}
    sources = [*ROOT.glob("producer/*.py"), *ROOT.glob("worker/*.py"), *ROOT.glob("ops/*.py")]
    sources += ROOT.glob("ops/bench/*.py")
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in (n.split(".")[0] for n in names):
                if name in sys.stdlib_module_names or name in ("producer", "worker", "ops"):
                    continue
                if name in OPTIONAL_IMPORTS:
                    continue
                allowed = deps | (optional if name == "opentelemetry" else set())
                found = {d.lower().replace("_", "-") for d in dists.get(name, [])}
                if not found & allowed:
                    missing[name] = f"{path.relative_to(ROOT)} (distributions: {found})"
    assert not missing, f"imported but not declared in pyproject: {missing}"


def test_router_dockerfile() -> None:
    instrs = instructions(ROOT / "ops" / "router" / "Dockerfile")
    assert last(instrs, "FROM").split()[0] == "python:3.11-slim"
    assert_non_root(instrs)
    sources = copied_sources(instrs)
    for name in ("requirements.txt", "config.yaml", "custom_auth.py"):
        assert f"ops/router/{name}" in sources
        assert not dockerignored(f"ops/router/{name}")
    runs = " ".join(args for word, args in instrs if word == "RUN")
    assert re.search(r"pip install --no-cache-dir -r \S*requirements\.txt", runs)
    env = " ".join(args for word, args in instrs if word == "ENV")
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env
    command = json.loads(last(instrs, "ENTRYPOINT")) + json.loads(last(instrs, "CMD"))
    assert command[0] == "litellm"
    assert command[command.index("--config") + 1] == "/app/config.yaml"
    assert command[command.index("--port") + 1] == "4000"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    # config.yaml and custom_auth.py land in the same directory (custom_auth is found beside it).
    copy = next(args for word, args in instrs if word == "COPY" and "config.yaml" in args)
    assert "custom_auth.py" in copy and copy.split()[-1] in ("/app/", "/app")


def test_router_image_uses_the_install_script_pins() -> None:
    """Both ways of running the Router (install.sh, the image) read the same requirements."""
    script = (ROOT / "ops" / "router" / "install.sh").read_text()
    assert "REQ=ops/router/requirements.txt" in script
    pins = (ROOT / "ops" / "router" / "requirements.txt").read_text()
    assert re.search(r"^litellm==\d", pins, flags=re.M)
    assert not re.search(r"^litellm==1\.107\.0\b", pins, flags=re.M)


# --- Prometheus and Grafana ----------------------------------------------------------------


@cache
def metric_names() -> frozenset[str]:
    """Every series name worker/metrics.py defines: counters' _total, histograms' _bucket..."""
    from prometheus_client import REGISTRY

    from worker import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    ours = {id(v) for v in vars(metrics).values() if hasattr(v, "_name") and hasattr(v, "collect")}
    names = set()
    for collector in list(REGISTRY._collector_to_names):
        if id(collector) not in ours:
            continue
        for family in collector.collect():
            names |= {family.name + s for s in suffixes[family.type]}
    assert names
    return frozenset(names)


PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords,
    label names, strings, durations or dashboard variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # $__rate_interval, ${var}
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if m.group(2) or m.group(1).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def test_promql_parser() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(x_bucket{a="b"}[$__rate_interval])))'
    assert promql_metrics(expr) == {"x_bucket"}
    assert promql_metrics("sum(rate(a_total[5m])) * 3600 / on (i) b") == {"a_total", "b"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_queries_use_worker_metrics(dashboard: dict[str, Any]) -> None:
    known = metric_names()
    used: set[str] = set()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        names = promql_metrics(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{expr!r} uses {names - known}; worker/metrics.py has {known}"
        assert expr.count("(") == expr.count(")"), expr
        used |= names
    # Every metric the worker serves is on the dashboard.
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in known}
    for family in families:
        assert any(n.startswith(family) for n in used), f"{family} is on no panel"


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(agentq_job_duration" in exprs
    assert "sum by (status) (rate(agentq_jobs_total" in exprs
    assert 'agentq_jobs_total{status="failed"}' in exprs
    assert "sum by (instance) (agentq_jobs_in_flight)" in exprs
    assert "sum by (model, kind) (rate(agentq_tokens_total" in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_datasource_is_templated(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for panel in dashboard["panels"]:
        for item in (panel, *panel.get("targets", [])):
            assert item["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_grafana_provisions_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mount = next(v for v in grafana["volumes"] if "agentq-dashboard.json" in v)
    source, target = mount.split(":")[:2]
    assert (ROOT / source).resolve() == DASHBOARD
    script = "\n".join(grafana["command"])
    assert f"path: {Path(target).parent}" in script
    assert "url: http://prometheus:9090" in script
    assert script.rstrip().endswith("exec /run.sh")
    if shutil.which("sh"):
        assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0


def test_prometheus_scrapes_workers(services: dict[str, dict[str, Any]]) -> None:
    config = load_yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd = jobs["agentq-worker"]["dns_sd_configs"]
    assert {"names": ["worker"], "type": "A", "port": METRICS_PORT}.items() <= sd[0].items()
    assert "worker" in services
    mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert (ROOT / mount.split(":")[0]).resolve() == PROMETHEUS


def test_alert_rules_watch_the_breakers(services: dict[str, dict[str, Any]]) -> None:
    """The alert rules load next to prometheus.yml (here and in the container) and use only
    metrics the worker serves."""
    config = load_yaml(PROMETHEUS)
    assert config["rule_files"] == ["alerts.yml"]
    rules = load_yaml(PROMETHEUS.parent / "alerts.yml")
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    down = alerts["AgentqRouterDown"]
    assert promql_metrics(down["expr"]) == {"agentq_breaker_open"} <= metric_names()
    mounts = services["prometheus"]["volumes"]
    assert "./ops/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    promtool = shutil.which("promtool")
    if promtool:
        out = subprocess.run([promtool, "check", "rules", str(PROMETHEUS.parent / "alerts.yml")])
        assert out.returncode == 0


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (Debian: prometheus); the YAML is checked above")
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True)
    assert out.returncode == 0, out.stderr
