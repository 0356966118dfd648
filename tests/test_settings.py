"""The settings object (pushsvc/settings.py): ``PUSHSVC_*`` variables, comma lists,
``key=value`` maps, and values it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from pydantic import ValidationError

from pushsvc.settings import Settings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment, for one test, without the runner's own PUSHSVC_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("PUSHSVC_") or name.startswith("OPENAI_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.timeout(10)
def test_comma_lists_and_key_maps_from_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("PUSHSVC_API_KEYS", " k1=t1 , k2=t2,")
    env.setenv("PUSHSVC_CORS_ORIGINS", "https://a.test, https://b.test")
    env.setenv("PUSHSVC_JOB_MODULES", "pkg.one,,pkg.two")
    env.setenv("PUSHSVC_LLM_RETRY_WINDOWS", "generate=30, batch=2.5")
    env.setenv("PUSHSVC_ADMIN_KEYS", "op1,op2")
    env.setenv("PUSHSVC_TENANT_WEIGHTS", "acme=2, trial=0.5")
    s = Settings()
    assert s.api_keys == {"k1": "t1", "k2": "t2"} and s.auth_enabled
    assert s.cors_origins == ["https://a.test", "https://b.test"]
    assert s.job_modules == ["pkg.one", "pkg.two"]
    assert s.llm_retry_windows == {"generate": 30.0, "batch": 2.5}
    assert s.tenant_weights == {"acme": 2.0, "trial": 0.5} and s.fair_share
    assert [k.get_secret_value() for k in s.admin_keys] == ["op1", "op2"]
    assert "op1" not in repr(s)


@pytest.mark.timeout(10)
def test_defaults_need_no_environment(env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.namespace == "pushsvc" and s.api_keys == {} and not s.auth_enabled
    assert s.allowed_hosts == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PUSHSVC_API_KEYS", "justakey"),
        ("PUSHSVC_API_KEYS", "k="),
        ("PUSHSVC_API_KEYS", "=t"),
        ("PUSHSVC_LLM_RETRY_WINDOWS", "generate=soon"),
        ("PUSHSVC_LLM_RETRY_WINDOWS", "generate=-1"),
        ("PUSHSVC_LLM_RETRY_WINDOWS", "=5"),
        ("PUSHSVC_LLM_RETRY_WINDOWS", "generate=inf"),
        ("PUSHSVC_TENANT_WEIGHTS", "acme"),
        ("PUSHSVC_TENANT_WEIGHTS", "acme=0"),
        ("PUSHSVC_TENANT_WEIGHTS", "acme=lots"),
        ("PUSHSVC_TENANT_WEIGHTS", "=2"),
        ("PUSHSVC_JOB_TTL_S", "0"),
        ("PUSHSVC_LLM_PARALLEL", "65"),
        ("PUSHSVC_ALERT_FAILURE_RATE", "1.5"),
    ],
)
def test_bad_values_are_refused(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("given", "refused_for"),
    [
        ({"_TLS_CA_FILE": "{ca}"}, "PUSHSVC_DATA_CLUSTER_TLS is not"),
        ({"_TLS": "1", "_TLS_CERT_FILE": "{cert}"}, "go together"),
        ({"_TLS": "1", "_TLS_CA_FILE": "{gone}"}, "_CA_FILE: cannot load it"),
        ({"_TLS": "1", "_TLS_CA_FILE": "{key}"}, "_CA_FILE: cannot load it"),  # not a certificate
        (
            {"_TLS": "1", "_TLS_CERT_FILE": "{cert}", "_TLS_KEY_FILE": "{ca}"},
            "_KEY_FILE: cannot load",
        ),
        ({"_TLS": "1", "": ""}, "PUSHSVC_DATA_CLUSTER is not"),
    ],
)
def test_cluster_tls_files_need_tls_each_other_and_to_load(
    env: pytest.MonkeyPatch, tmp_path: Path, given: dict[str, str], refused_for: str
) -> None:
    """Refused at the start, naming the variables, not later on every connection."""
    ca = trustme.CA()
    issued = ca.issue_cert("pushsvc@example.com")
    paths = {
        "ca": str(tmp_path / "ca.pem"),
        "cert": str(tmp_path / "c.pem"),
        "key": str(tmp_path / "c.key"),
        "gone": str(tmp_path / "gone.pem"),
    }
    ca.cert_pem.write_to_path(paths["ca"])
    issued.cert_chain_pems[0].write_to_path(paths["cert"])
    issued.private_key_pem.write_to_path(paths["key"])
    env.setenv("PUSHSVC_DATA_CLUSTER", "127.0.0.1:7000")
    for name, value in given.items():  # PUSHSVC_DATA_CLUSTER{name}
        env.setenv(f"PUSHSVC_DATA_CLUSTER{name}", value.format(**paths))
    with pytest.raises(ValidationError, match=refused_for):
        Settings()
    env.setenv("PUSHSVC_DATA_CLUSTER", "127.0.0.1:7000")
    env.setenv("PUSHSVC_DATA_CLUSTER_TLS", "1")
    env.setenv("PUSHSVC_DATA_CLUSTER_TLS_CA_FILE", paths["ca"])
    env.setenv("PUSHSVC_DATA_CLUSTER_TLS_CERT_FILE", paths["cert"])
    env.setenv("PUSHSVC_DATA_CLUSTER_TLS_KEY_FILE", paths["key"])
    context = Settings().data_cluster_tls_context()  # all of them, and loadable: taken
    assert context is not None and context.check_hostname
    # The CA file's CA only, not the system's besides.
    assert context.cert_store_stats()["x509_ca"] == 1


@pytest.mark.timeout(10)
def test_openai_variables_work_and_pushsvc_ones_win(env: pytest.MonkeyPatch) -> None:
    env.setenv("OPENAI_BASE_URL", "http://openai.test/v1")
    assert Settings().llm_base_url == "http://openai.test/v1"
    env.setenv("PUSHSVC_LLM_BASE_URL", "http://ours.test/v1")
    assert Settings().llm_base_url == "http://ours.test/v1"
