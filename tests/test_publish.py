"""The publish call's layout (pushsvc/publish.py) against the names lua/publish_fn.lua
gives its KEYS and ARGV: a field moved on one side only would corrupt jobs silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from pushsvc.epoch import StreamPosition
from pushsvc.keys import Keys
from pushsvc.models import JobStatus
from pushsvc.publish import PublishCall, Writer
from pushsvc.settings import Settings

LUA = (Path(__file__).parents[1] / "pushsvc" / "lua" / "publish_fn.lua").read_text()


def lua_names(table: str) -> dict[str, int]:
    """``local A, B = ARGV[1], ARGV[2]`` lines: each name and its (0-based) index."""
    names: dict[str, int] = {}
    for lhs, rhs in re.findall(rf"^local ([A-Z_, ]+) = ((?:{table}\[\d+\],? ?)+)$", LUA, re.M):
        indexes = re.findall(rf"{table}\[(\d+)\]", rhs)
        named = [n.strip() for n in lhs.split(",")]
        names.update(zip(named, (int(i) - 1 for i in indexes), strict=True))
    return names


@pytest.mark.timeout(10)
def test_the_layout_puts_each_value_where_the_script_reads_it() -> None:
    known = StreamPosition(7, "ep0ch")
    call = PublishCall(
        "job-1",
        "tenant-a",
        "progress",
        {"progress": 50},
        {"stage": "half"},
        expect=(JobStatus.RUNNING,),
        delta="text",
        writer=Writer("arq-1", owner="w1", known=known, call="c1"),
        max_running=3,
    )
    keys, args = call.layout(Keys("ns"), Settings(job_ttl_s=99), "run-1")
    k, a = lua_names("KEYS"), lua_names("ARGV")
    fields_from = int(re.search(r"FIELDS_FROM = (\d+)", LUA)[1])  # type: ignore[index]
    assert len(keys) == len(k) and len(args) == fields_from - 1 + 2  # one field pair
    assert keys[k["K_JOB"]] == "ns:{tenant-a}:job:job-1"
    assert keys[k["K_EPOCH"]] == "ns:{tenant-a}:epoch"
    assert keys[k["K_TPOS"]] == Keys("ns").tenant_position("tenant-a")
    expected = {
        "A_TTL": 99,
        "A_KIND": "progress",
        "A_EXPECT": "running",
        "A_DELTA": "text",
        "A_ARQ_ID": "arq-1",
        "A_JOB_ID": "job-1",
        "A_RUN_ID": "run-1",
        "A_MAX_RUNNING": 3,
        "A_OWNER": "w1",
        "A_KNOWN_EPOCH": "ep0ch",
        "A_KNOWN_SEQ": 7,
        "A_CALL": "c1",
    }
    assert {name: args[a[name]] for name in expected} == expected
    assert args[fields_from - 1 :] == ["stage", '"half"']
    assert args[a["A_BODY"]].startswith('"job_id":"job-1"')  # the script prepends {"seq":N,


@pytest.mark.timeout(10)
@pytest.mark.parametrize("tenant", ["tenant-a", "local", "a:b|c d", "ü"])
def test_a_tenants_keys_and_channels_share_one_cluster_slot(tenant: str) -> None:
    keys, k, a = Keys("ns"), lua_names("KEYS"), lua_names("ARGV")
    call = PublishCall("job-1", tenant, "progress", {"progress": 50})
    layout, args = call.layout(keys, Settings())
    named = list(layout)  # every key, named or not
    named += [args[a["A_JOB_CHANNEL"]], args[a["A_TENANT_CHANNEL"]]]
    named += [keys.tenant_index(tenant), keys.idempotency(tenant, "d"), keys.tenant_running(tenant)]
    named += [keys.submit_window(tenant, 1), keys.job_output(tenant, "job-2")]
    assert len(named) == 16  # 9 keys, 2 channels, 5 others
    assert {key_slot(n.encode()) for n in named} == {key_slot(tenant.encode())}
    other = Keys("ns").job("tenant-b", "job-1")  # the same job id under another tenant
    assert other != layout[k["K_JOB"]]


@pytest.mark.timeout(10)
def test_a_tenant_name_with_braces_is_refused() -> None:
    """A brace would cut the hash tag short: the tenant's keys could land in many slots."""
    with pytest.raises(ValidationError, match="no braces"):
        Settings(api_keys="k1=acme,k2={evil}")
