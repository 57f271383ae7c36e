"""Frozen configuration of the router: every knob with its default, one dataclass per concern.

Built once from the CLI (`pdserve.router.cli.config_from_args`) or directly in tests; nothing
mutates it afterwards. Flag names and defaults follow SGLang's router where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pdserve.contract import DEFAULT_ROUTER_PORT
from pdserve.flags.cors import CorsConfig
from pdserve.discovery import DiscoveryConfig

ROLES = ("regular", "prefill", "decode")
POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")


def normalize_url(url: str) -> str:
    """`http://host:port` without a trailing slash; raises ValueError for anything else."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"worker url {url!r}: only http:// is supported")
    if not parts.hostname or parts.path or parts.query or parts.fragment:
        raise ValueError(f"worker url {url!r}: expected http://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"worker url {url!r}: bad port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{host}:{port or 80}"


@dataclass(frozen=True)
class WorkerSpec:
    url: str
    role: str = "regular"  # regular | prefill | decode
    bootstrap_port: int | None = None  # prefill only; None = ask /server_info, else none
    bootstrap_host: str | None = None  # prefill only; None = the url's host (a discovered record names it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        if self.role not in ROLES:
            raise ValueError(f"worker role {self.role!r}: expected one of {', '.join(ROLES)}")
        if (self.bootstrap_port is not None or self.bootstrap_host is not None) and self.role != "prefill":
            raise ValueError("bootstrap_port/host apply to prefill workers only")
        if self.bootstrap_port is not None:
            if not 0 < self.bootstrap_port < 65536:
                raise ValueError(f"bootstrap_port {self.bootstrap_port} out of range")


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "cache_aware"
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_s: float = 60.0
    max_tree_size: int = 2**26

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy {self.name!r}: expected one of {', '.join(POLICIES)}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError("cache_threshold must be in [0, 1]")
        if self.max_tree_size < 1 or self.eviction_interval_s <= 0:
            raise ValueError("max_tree_size and eviction_interval must be positive")


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5  # total tries per request (SGLang's --retry-max-retries); 1 = no retry
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 30.0
    multiplier: float = 1.5
    jitter: float = 0.2  # +/- fraction of the delay

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or not 0 <= self.jitter <= 1 or self.multiplier < 1:
            raise ValueError("retry: attempts >= 1, multiplier >= 1, jitter in [0, 1]")


@dataclass(frozen=True)
class CircuitConfig:
    enabled: bool = True
    failure_threshold: int = 10  # consecutive failures that open the circuit
    success_threshold: int = 3  # successes in half-open that close it
    open_duration_s: float = 60.0  # how long it stays open before a trial (half-open)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1 or self.open_duration_s < 0:
            raise ValueError("circuit breaker thresholds must be >= 1")


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    interval_s: float = 10.0
    timeout_s: float = 5.0
    failure_threshold: int = 3
    success_threshold: int = 2
    endpoint: str = "/health"
    load_interval_s: float = 1.0  # /get_load polling (power_of_two)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0 or self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("health check interval/timeout must be > 0 and thresholds >= 1")
        if not self.endpoint.startswith("/"):
            raise ValueError("health check endpoint must start with '/'")


@dataclass(frozen=True)
class LimitsConfig:
    max_concurrent: int = -1  # -1: no limit
    queue_size: int = 100
    queue_timeout_s: float = 60.0
    max_payload_bytes: int = 512 * 1024 * 1024
    request_timeout_s: float = 1800.0
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_concurrent == 0 or self.max_concurrent < -1:
            raise ValueError("max_concurrent_requests must be positive or -1 (no limit)")
        if self.queue_size < 0 or self.queue_timeout_s <= 0 or self.max_payload_bytes < 1:
            raise ValueError("queue size >= 0, queue timeout > 0, max payload >= 1")
        if self.request_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


@dataclass(frozen=True)
class AdmissionConfig:
    """The router's admission control (router/admission.py); GET/POST /admission changes it at runtime."""

    enabled: bool = False
    max_kv_usage: float = 0.95  # every decode (regular: worker) holds more of its KV pool: refuse
    max_queue_wait_s: float | None = None  # every prefill (regular: worker) predicts a longer queue: refuse
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.max_kv_usage <= 1.0 or self.retry_after_s < 0:
            raise ValueError("admission: max_kv_usage in (0, 1], retry_after >= 0")
        if self.max_queue_wait_s is not None and self.max_queue_wait_s <= 0:
            raise ValueError("admission: max_queue_wait must be > 0")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_ROUTER_PORT
    pd: bool = False
    workers: tuple[WorkerSpec, ...] = ()
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prefill_policy: PolicyConfig | None = None  # PD: defaults to `policy`
    decode_policy: PolicyConfig | None = None
    retry: RetryConfig = field(default_factory=RetryConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    api_key: str | None = None
    worker_api_key: str | None = None  # sent to workers; defaults to api_key
    request_id_headers: tuple[str, ...] = ("x-request-id", "x-correlation-id", "request-id")
    log_level: str = "info"
    shutdown_timeout_s: float = 30.0
    metrics_prefix: str = "sgl"  # metric names are "<prefix>_router_<name>" (sglang-router's: sgl_router_*)
    prometheus_port: int | None = None  # also serve /metrics on this port (sglang-router's --prometheus-port)
    prometheus_host: str = "127.0.0.1"
    cors: CorsConfig = field(default_factory=CorsConfig)  # browser pages on other origins (vLLM's flags)
    migration_limit: int = 3  # times a broken stream moves to another worker (Dynamo's name); 0 = never
    pd_local_prefill_threshold: int | None = None  # PD: uncached tokens at most this -> decode alone
    pd_prefill_queue_limit: int | None = None  # PD: every prefill's queue over this -> decode alone
    kv_events: bool = True  # follow workers' KV events (exact index) when a policy or PD needs it
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    enable_trace: bool = False  # OpenTelemetry spans (pdserve/tracing): router pick, the legs' parent
    otlp_traces_endpoint: str = "localhost:4317"  # http://... : OTLP HTTP/protobuf; host:port: gRPC
    discovery: DiscoveryConfig | None = None  # --discovery: workers also come and go with etcd (router/discovery.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_id_headers", tuple(h.lower() for h in self.request_id_headers))
        roles = {w.role for w in self.workers}
        if self.pd and "regular" in roles:
            raise ValueError("PD mode takes --prefill and --decode workers, not --worker-urls")
        if not self.pd and roles - {"regular"}:
            raise ValueError("--prefill/--decode need --pd-disaggregation")
        urls = [w.url for w in self.workers]
        if len(set(urls)) != len(urls):
            raise ValueError("a worker url is listed twice")
        if self.migration_limit < 0:
            raise ValueError("migration_limit must be >= 0")
        for name in ("pd_local_prefill_threshold", "pd_prefill_queue_limit"):
            value = getattr(self, name)
            if value is not None and (value < 0 or not self.pd):
                raise ValueError(f"--{name.replace('_', '-')} needs --pd-disaggregation and a value >= 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if self.prometheus_port is not None and self.prometheus_port and self.prometheus_port == self.port:
            raise ValueError(f"--prometheus-port {self.prometheus_port} is the router's --port too; pick another")

    @property
    def worker_key(self) -> str | None:
        return self.worker_api_key if self.worker_api_key is not None else self.api_key

    @property
    def uses_kv_index(self) -> bool:
        """Follow KV events? When cache_aware routes a role, or conditional PD needs decode hits."""
        roles = ("prefill", "decode") if self.pd else ("regular",)
        return self.kv_events and (self.pd_local_prefill_threshold is not None
                                   or any(self.policy_for(r).name == "cache_aware" for r in roles))

    def policy_for(self, role: str) -> PolicyConfig:
        if role == "prefill" and self.prefill_policy is not None:
            return self.prefill_policy
        if role == "decode" and self.decode_policy is not None:
            return self.decode_policy
        return self.policy
