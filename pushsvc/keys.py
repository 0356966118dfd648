"""Every Redis key and channel name pushsvc uses, in one place (like arq's constants.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace, so deployments and test runs can share a Redis."""

    ns: str = "pushsvc"

    def tenant_tag(self, tenant: str) -> str:
        """The prefix of every key and channel of one tenant: its name in a hash tag, so on
        a Redis Cluster they share one slot (one script call touches them together).
        Tenant names hold no braces (settings.py), so the tag is the whole name."""
        return f"{self.ns}:{{{tenant}}}"

    def job(self, tenant: str, job_id: str) -> str:
        """Hash: the job's snapshot fields."""
        return f"{self.tenant_tag(tenant)}:job:{job_id}"

    def job_output(self, tenant: str, job_id: str) -> str:
        """String: the job's streamed output so far (APPENDed)."""
        return f"{self.tenant_tag(tenant)}:out:{job_id}"

    def job_log(self, tenant: str, job_id: str) -> str:
        """Stream: the job's capped event log, entry id ``0-<seq>``."""
        return f"{self.tenant_tag(tenant)}:log:{job_id}"

    def job_channel(self, tenant: str, job_id: str) -> str:
        return f"{self.tenant_tag(tenant)}:ev:{job_id}"

    def outbox(self, tenant: str) -> str:
        """Sorted set: the tenant's attempts (arq ids: new jobs', retries, re-runs) not
        yet handed to arq, by Redis's time (ms) plus their delay; see outbox.py."""
        return f"{self.tenant_tag(tenant)}:outbox"

    @property
    def tenants(self) -> str:
        """Set: the tenants that made or repaired a job: the outbox sweeper's list, and
        the stats reader's."""
        return f"{self.ns}:tenants"

    def job_tenant(self, job_id: str) -> str:
        """String: whose the job is, for the readers that know only its id (the lease
        reaper, the queue's figures); written just before the job (JobStore.create)."""
        return f"{self.ns}:jt:{job_id}"

    def tenant_index(self, tenant: str) -> str:
        """Sorted set: the tenant's job ids, scored by creation time (ms)."""
        return f"{self.tenant_tag(tenant)}:jobs"

    def tenant_position(self, tenant: str) -> str:
        """Hash: the tenant's sequence (``seq``), its ``epoch`` and that epoch's ``gen``."""
        return f"{self.tenant_tag(tenant)}:tpos"

    @property
    def epoch(self) -> str:
        """Hash: the store's epoch (``id``) and the Redis run id it was taken on (``run``)."""
        return f"{self.ns}:epoch"

    def tenant_epoch(self, tenant: str) -> str:
        """Hash: the store's epoch as the tenant's slot knows it (``id``) and the Redis run
        id it was taken on (``run``): on a Redis Cluster each shard's restart or failover
        starts new histories for its own tenants only (lua/publish_fn.lua); and when it
        was last taken over from another run (``recovered_at``, epoch seconds: the
        tenant's grace for missing jobs on a cluster, lua/grace.lua)."""
        return f"{self.tenant_tag(tenant)}:epoch"

    def tenant_log(self, tenant: str) -> str:
        """Stream: every event of the tenant's jobs, entry id ``0-<tenant seq>``."""
        return f"{self.tenant_tag(tenant)}:tlog"

    def tenant_channel(self, tenant: str) -> str:
        return f"{self.tenant_tag(tenant)}:tev"

    def idempotency(self, tenant: str, key_digest: str) -> str:
        return f"{self.tenant_tag(tenant)}:idem:{key_digest}"

    @property
    def leases(self) -> str:
        """Sorted set: running job ids scored by lease deadline (ms); see worker.py."""
        return f"{self.ns}:leases"

    def submit_window(self, tenant: str, minute: int) -> str:
        """Counter: the tenant's submissions in one clock minute (rate limit)."""
        return f"{self.tenant_tag(tenant)}:rate:{minute}"

    def tenant_running(self, tenant: str) -> str:
        """Set: the tenant's running job ids (kept by the publish script)."""
        return f"{self.tenant_tag(tenant)}:trun"

    def tenant_stats(self, tenant: str) -> str:
        """Stream: one row per finished or retried attempt of the tenant's, for /v1/stats
        (written with the transition, so in the tenant's slot)."""
        return f"{self.tenant_tag(tenant)}:stats"

    @property
    def llm_calls(self) -> str:
        """Stream: one row per finished model call (type, tenant, model, telemetry)."""
        return f"{self.ns}:llmcalls"

    @property
    def delayed(self) -> str:
        """Sorted set: attempts waiting for their backoff (or the tenant's running limit),
        "<priority>|<arq id>|<tenant>" by due ms."""
        return f"{self.ns}:delayed"

    @property
    def turns(self) -> str:
        """Hash: per priority class, the turn of the attempt that started last (fair share:
        queue.py)."""
        return f"{self.ns}:turns"

    def tenant_turns(self, tenant: str) -> str:
        """Sorted set: the tenant's attempts in arq's queue (arq id by arq score): its line,
        whose last turn its next attempt follows (fair share: queue.py)."""
        return f"{self.ns}:tturn:{tenant}"

    def answer_lengths(self, job_type: str, model: str) -> str:
        """List: the recent answers' lengths (characters) of a job type and model."""
        return f"{self.ns}:alen:{job_type}:{model}"

    def model_buckets(self, model: str) -> str:
        """Hash: a model's request and token buckets (level and time of each); see
        model_limits.py."""
        return f"{self.ns}:mlim:{model}"

    def model_holders(self, model: str) -> str:
        """Sorted set: the model calls holding a concurrency slot, scored by expiry (ms)."""
        return f"{self.ns}:mhold:{model}"

    @property
    def workers(self) -> str:
        """Sorted set: worker ids by last heartbeat (ms)."""
        return f"{self.ns}:workers"

    @property
    def queue(self) -> str:
        """The arq queue name."""
        return f"{self.ns}:queue"

    def starts(self, second: int) -> str:
        """Counter: attempts started in one clock second (the start rate; see line.py)."""
        return f"{self.ns}:starts:{second}"
