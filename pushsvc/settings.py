"""The one settings object: every knob, read from ``PUSHSVC_*`` environment variables."""

from __future__ import annotations

import ssl
from typing import Annotated

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_LIMITS_SHAPE = (
    "PUSHSVC_MODEL_LIMITS must look like "
    "'gpt-4o-mini=rpm:500,tpm:200000,concurrency:50;llama3=concurrency:4'"
)


class ModelLimit(BaseModel):
    """One model's limits (None: no such limit); see ``pushsvc.model_limits``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    window_s: float = Field(60.0, gt=0, le=3600)  # what rpm and tpm count over

    @classmethod
    def parse(cls, name: str, spec: str) -> ModelLimit:
        """``rpm:500,tpm:200000,concurrency:50`` for model ``name``; a clear ValueError."""
        pairs = [p.strip().partition(":") for p in spec.split(",") if p.strip()]
        known = set(cls.model_fields)
        if not name or not pairs or any(not sep or k.strip() not in known for k, sep, _ in pairs):
            raise ValueError(f"{_LIMITS_SHAPE}; keys: {', '.join(sorted(known))}")
        try:
            return cls.model_validate({k.strip(): v.strip() for k, _, v in pairs})
        except ValidationError as exc:
            problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"PUSHSVC_MODEL_LIMITS, model {name!r}: {problems}") from None


class Settings(BaseSettings):
    """Built once by an entry point (CLI, tests) and passed down; nothing else reads the env."""

    model_config = SettingsConfigDict(env_prefix="PUSHSVC_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # The data plane (job state, logs, sequences, pub/sub) on a Redis Cluster: some of
    # its nodes as "host:port,host:port" (any node will do; the rest are found). Empty:
    # the data plane is the Redis of ``redis_url``, with the queue.
    data_cluster: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    # The cluster's AUTH, for commands and pub/sub alike (an ACL user, or "" for the
    # default one; no password: no AUTH).
    data_cluster_username: str = ""
    data_cluster_password: SecretStr = SecretStr("")
    # TLS to every node (commands, transactions and pub/sub alike), each node's name (an
    # IP when the cluster announces IPs) checked against its certificate: the CA that
    # signed the nodes' certificates (a PEM file, its CAs only; none: the system's), and
    # this client's certificate and key, for nodes that ask for one (tls-auth-clients).
    data_cluster_tls: bool = False
    data_cluster_tls_ca_file: str = ""
    data_cluster_tls_cert_file: str = ""
    data_cluster_tls_key_file: str = ""
    # "key=tenant,key2=tenant2"; empty means one local tenant without auth (loopback only).
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    secret: SecretStr = SecretStr("")
    job_ttl_s: int = Field(86400, ge=1)
    max_body_bytes: int = Field(262144, ge=1024)
    # Redis key prefix, so several deployments (or test runs) can share one Redis.
    namespace: str = "pushsvc"

    # Event log caps: per job, and per tenant (the multiplexed stream's log).
    job_log_cap: int = Field(1000, ge=10)
    tenant_log_cap: int = Field(10000, ge=100)

    # Worker.
    worker_concurrency: int = Field(64, ge=1)
    # Worker-side flushes per job per second; each flush is at most one progress and one
    # output event, so a job publishes at most 2x this many events a second.
    publish_rate_hz: float = Field(10.0, gt=0)
    lease_s: float = Field(15.0, gt=0)
    # A new job's first attempt left in its tenant's outbox (its API process died, or
    # Redis failed, between making the job and queueing it) is queued after this long;
    # every API process looks this often (outbox.py).
    outbox_sweep_s: float = Field(5.0, gt=0)
    poll_delay_s: float = Field(0.2, gt=0)
    retry_base_s: float = Field(1.0, ge=0)
    retry_max_s: float = Field(60.0, ge=0)
    # A worker's /metrics port (0: none). Each worker process needs its own port.
    worker_metrics_port: int = Field(0, ge=0, le=65535)
    # Per-tenant limits (0: none). Submissions per minute answer 429 + Retry-After past
    # the limit; open streams are counted per API process.
    tenant_submits_per_minute: int = Field(0, ge=0)
    tenant_max_streams: int = Field(0, ge=0)
    # Browser origins allowed to call the API from other sites (empty: CORS off).
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Request hardening (CSRF, Host, slow clients, operator keys).
    # Without API keys only loopback Host names are answered (localhost, *.localhost,
    # 127.0.0.1, [::1]; 421 otherwise), so a page whose name was rebound to 127.0.0.1
    # cannot reach the API. Names to answer to besides ("api.test", "*.test", "*": any).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Operator keys (Authorization: Bearer, like API keys): /v1/stats shows them every
    # tenant's figures; an API key shows its own tenant's. Secrets: never logged.
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # A bearer token GET /metrics asks for (empty: /metrics is open).
    metrics_token: SecretStr = SecretStr("")
    # Open client connections of one API process (0: the open-file limit less 256 for
    # Redis and files). Past it the connection waiting longest for a request's headers
    # (idle or slow) is closed to make room, and while every one is busy (streams,
    # requests) new requests get 503: idle sockets cannot use up the process's fds.
    max_connections: int = Field(0, ge=0)
    # A request's headers must arrive whole within this (408, then closed), and be no
    # larger than this (431): a client that never finishes them holds no connection.
    header_timeout_s: float = Field(10.0, gt=0)
    max_header_bytes: int = Field(65536, ge=1024)
    # and its body whole within this after them (408, then closed): a client that sends
    # headers and then no body, or a byte at a time, holds no request for ever.
    body_timeout_s: float = Field(30.0, gt=0)
    # How long an idle keep-alive connection stays open between requests. Longer than
    # clients and proxies keep theirs (httpx 5 s, load balancers often 60 s): a server
    # closing first races a client's next request on that connection, which then fails.
    # Idle connections give way when the server is full (max_connections).
    keep_alive_s: int = Field(75, ge=1)
    # Jobs one tenant may run at once (0: no limit); the rest wait queued, retried this
    # often (with jitter) while other tenants' jobs go first.
    tenant_max_running: int = Field(0, ge=0)
    throttle_delay_s: float = Field(1.0, gt=0)
    # Fair share: within a priority class, tenants' attempts take turns (one each, round
    # robin), so one tenant's burst never keeps another's job waiting behind it. Off:
    # first in, first out. Weights give a tenant more turns: "acme=2,trial=0.5" (1 else).
    fair_share: bool = True
    tenant_weights: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # Extra modules whose decorated functions register job types ("pkg.mod,pkg2.mod").
    job_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The model. OPENAI_API_KEY / OPENAI_BASE_URL work too (PUSHSVC_ names win).
    llm_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("PUSHSVC_LLM_API_KEY", "OPENAI_API_KEY")
    )
    llm_base_url: str | None = Field(
        None, validation_alias=AliasChoices("PUSHSVC_LLM_BASE_URL", "OPENAI_BASE_URL")
    )
    llm_model: str = "gpt-4o-mini"
    # A model call's whole time, request to last token; and how long it may wait for its
    # first token (and between two chunks): no call runs unbounded.
    llm_timeout_s: float = Field(300.0, gt=0)
    llm_first_token_timeout_s: float = Field(60.0, gt=0)
    # A call that fails retryably before its first token (server down or restarting, 5xx,
    # 429) is tried again within this many seconds, inside the attempt (0: never).
    llm_retry_window_s: float = Field(30.0, ge=0)
    # Per job type, over the one above: "generate=30,batch=5" (a caller passes its type).
    llm_retry_windows: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    llm_parallel: int = Field(4, ge=1, le=64)
    # Prices per model, USD per million tokens, input/output: "gpt-4o-mini=0.15/0.60,
    # llama3=0/0". A job's ``llm.cost_usd`` comes from it; a model absent: no cost (null).
    llm_prices: Annotated[dict[str, tuple[float, float]], NoDecode] = Field(default_factory=dict)
    # Per-model limits every worker shares (in Redis): "gpt-4o-mini=rpm:500,tpm:200000,
    # concurrency:50;llama3=concurrency:4" (";" between models; each key optional).
    # ``window_s:N`` counts rpm and tpm per N seconds instead of 60 (tests, the bench).
    model_limits: Annotated[dict[str, ModelLimit], NoDecode] = Field(default_factory=dict)

    # Stats and alerts (/v1/stats).
    stats_window_s: float = Field(300.0, gt=0)
    stats_push_s: float = Field(2.0, gt=0)
    alert_queue_depth: int = Field(1000, ge=0)
    alert_failure_rate: float = Field(0.10, ge=0, le=1)
    alert_min_jobs: int = Field(5, ge=1)  # no failure-rate alert on fewer decided jobs
    alert_stuck_s: float = Field(120.0, gt=0)  # a running job silent this long is stuck
    alert_workers_absent_s: float = Field(30.0, gt=0)

    # API.
    # Off: stream endpoints answer 503 and clients fall back to polling (also for tests).
    streams_enabled: bool = True
    # Redis connections of one API process besides its one pub/sub connection.
    redis_pool_size: int = Field(2, ge=1)
    # Bulk reads (streams' snapshots, log replays and views; listing scans) one API
    # process runs at once; the rest wait their turn. Keep it below the pool size, so
    # other requests always find a connection however many streams open or resync.
    bulk_read_concurrency: int = Field(1, ge=1)
    # SO_SNDBUF of the API's client connections (Linux doubles it; 0: the kernel's
    # autotuning, up to net.ipv4.tcp_wmem's max, 4 MiB by default). The kernel holds at
    # most this for a client that stopped reading, and the API copies no more into it:
    # with autotuning, a few hundred such streams of a large job held a gigabyte of kernel
    # memory and seconds of the API's CPU (BENCHMARKS.md, noisy neighbours).
    # It also caps one connection's rate at about twice this per round trip.
    send_buffer_bytes: int = Field(131072, ge=0)
    stream_token_ttl_s: int = Field(900, ge=10)
    heartbeat_s: float = Field(15.0, gt=0)
    retry_ms: int = Field(2000, ge=0)  # the SSE ``retry:`` hint for reconnecting clients
    stream_subscribe_timeout_s: float = Field(3.0, gt=0)
    # Per-stream buffer: merge progress/output past this many frames, resync past the caps.
    stream_coalesce_after: int = Field(32, ge=1)
    stream_max_frames: int = Field(256, ge=2)
    stream_max_bytes: int = Field(1_048_576, ge=1024)
    # A job gone from the store (Redis came back empty) may be repaired by the worker
    # running it within a lease period; past this grace its streams end with
    # ``failed``/``state_lost``. Keep it above PUSHSVC_LEASE_S / 3 (the worker's check).
    state_lost_grace_s: float = Field(10.0, gt=0)
    # How many recent jobs an all-jobs stream scans for active ones when it starts.
    stream_recent_jobs: int = Field(500, ge=1)
    # Queued jobs' places in line (line.py): how often an API process recomputes them for
    # its open streams, and the window (s) the start rate is measured over.
    line_interval_s: float = Field(1.0, gt=0)
    start_rate_window_s: int = Field(60, ge=5, le=600)
    host: str = "127.0.0.1"
    port: int = 8000
    poll_hint_s: float = Field(2.0, gt=0)
    list_limit_max: int = Field(200, ge=1)
    # Logs: JSON lines, or a console view when unset and stderr is a terminal.
    log_level: str = "INFO"
    log_json: bool | None = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in value.split(","))):
            key, sep, tenant = pair.partition("=")
            if not sep or not key.strip() or not tenant.strip():
                raise ValueError("PUSHSVC_API_KEYS must look like 'key=tenant,key2=tenant2'")
            keys[key.strip()] = tenant.strip()
        return keys

    @field_validator("api_keys")
    @classmethod
    def _tenant_names(cls, value: dict[str, str]) -> dict[str, str]:
        # A tenant's keys share a Redis Cluster hash tag, {<tenant>}: no braces in it.
        for tenant in value.values():
            if "{" in tenant or "}" in tenant:
                raise ValueError(f"PUSHSVC_API_KEYS: a tenant name has no braces: {tenant!r}")
        return value

    @field_validator("llm_retry_windows", mode="before")
    @classmethod
    def _parse_windows(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        windows: dict[str, float] = {}
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, _, seconds = pair.partition("=")
            try:
                windows[name.strip()] = float(seconds)
            except ValueError:
                raise ValueError(
                    "PUSHSVC_LLM_RETRY_WINDOWS must look like 'generate=30,batch=5'"
                ) from None
            if not name.strip() or not 0 <= windows[name.strip()] < float("inf"):
                raise ValueError("PUSHSVC_LLM_RETRY_WINDOWS: a job type and seconds >= 0")
        return windows

    @field_validator("tenant_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        weights: dict[str, float] = {}
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, _, weight = pair.rpartition("=")
            try:
                number = float(weight)
            except ValueError:
                number = 0.0
            if not name.strip() or not 0.01 <= number <= 100:
                raise ValueError(
                    "PUSHSVC_TENANT_WEIGHTS must look like 'acme=2,trial=0.5' (0.01 to 100)"
                )
            weights[name.strip()] = number
        return weights

    @field_validator("llm_prices", mode="before")
    @classmethod
    def _parse_prices(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        prices: dict[str, tuple[float, float]] = {}
        shape = "PUSHSVC_LLM_PRICES must look like 'gpt-4o-mini=0.15/0.60,llama3=0/0'"
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, _, price = pair.rpartition("=")  # a model's name may hold "=": not a price
            given, _, taken = price.partition("/")
            try:
                prices[name.strip()] = (float(given), float(taken))
            except ValueError:
                raise ValueError(f"{shape} (USD per million input/output tokens)") from None
            if not name.strip() or not all(0 <= p < float("inf") for p in prices[name.strip()]):
                raise ValueError(f"{shape}: a model name and two prices >= 0")
        return prices

    @field_validator("model_limits", mode="before")
    @classmethod
    def _parse_model_limits(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        limits: dict[str, ModelLimit] = {}
        for entry in filter(None, (e.strip() for e in value.split(";"))):
            name, _, spec = entry.rpartition("=")  # a model's name may hold "=" or ":"
            limits[name.strip()] = ModelLimit.parse(name.strip(), spec)
        return limits

    @field_validator("data_cluster", mode="before")
    @classmethod
    def _parse_cluster(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        nodes = []
        for node in filter(None, (n.strip() for n in value.split(","))):
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"PUSHSVC_DATA_CLUSTER: {node!r} is not host:port")
            nodes.append((host.strip("[]"), int(port)))
        return tuple(nodes)

    @field_validator("job_modules", "cors_origins", "allowed_hosts", "admin_keys", mode="before")
    @classmethod
    def _parse_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @model_validator(mode="after")
    def _check_cluster_tls(self) -> Settings:
        files = {
            "PUSHSVC_DATA_CLUSTER_TLS_CA_FILE": self.data_cluster_tls_ca_file,
            "PUSHSVC_DATA_CLUSTER_TLS_CERT_FILE": self.data_cluster_tls_cert_file,
            "PUSHSVC_DATA_CLUSTER_TLS_KEY_FILE": self.data_cluster_tls_key_file,
        }
        given = [name for name, path in files.items() if path]
        if given and not self.data_cluster_tls:
            raise ValueError(f"{given[0]} is set but PUSHSVC_DATA_CLUSTER_TLS is not")
        if self.data_cluster_tls and not self.data_cluster:
            raise ValueError(
                "PUSHSVC_DATA_CLUSTER_TLS is set but PUSHSVC_DATA_CLUSTER is not (the queue's"
                " Redis takes TLS in its URL: rediss://)"
            )
        if bool(self.data_cluster_tls_cert_file) != bool(self.data_cluster_tls_key_file):
            raise ValueError(
                "PUSHSVC_DATA_CLUSTER_TLS_CERT_FILE and _KEY_FILE go together (or neither)"
            )
        try:  # loaded once here, so that a bad file stops the process at its start
            self.data_cluster_tls_context()
        except OSError as exc:  # ssl.SSLError too
            raise ValueError(
                f"{' and '.join(given)}: cannot load {'it' if len(given) == 1 else 'them'}"
                f" ({exc.strerror or exc})"
            ) from None
        return self

    def data_cluster_tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of the cluster's clients (None: no TLS): the CA file's CAs only
        when it is given (else the system's), each node's certificate and name checked,
        this client's certificate shown when given. Reads the files."""
        if not self.data_cluster_tls:
            return None
        context = ssl.create_default_context(cafile=self.data_cluster_tls_ca_file or None)
        if self.data_cluster_tls_cert_file:
            context.load_cert_chain(self.data_cluster_tls_cert_file, self.data_cluster_tls_key_file)
        return context

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
