"""The Vault stand-in as hvac 2.4.0 sees it: what a real Vault answers, down to exception classes and text."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions as vault_errors
import pytest
import requests

from devstack.vault import INVALID_TOKEN_ERROR, POLICY_DENIED_ERROR, VaultStandIn

ROOT = "standin-root-token"
PATH = "keybuzz/amazon_spapi/app"


@pytest.fixture(scope="module")
def server() -> Iterator[VaultStandIn]:
    with VaultStandIn(root_token=ROOT) as standin:
        yield standin


@pytest.fixture
def vault(server: VaultStandIn) -> VaultStandIn:
    server.reset()
    return server


@pytest.fixture
def client(vault: VaultStandIn) -> Iterator[hvac.Client]:
    client = hvac.Client(url=vault.url, token=ROOT, timeout=5)
    yield client
    client.adapter.close()


def read(client: hvac.Client, path: str = PATH, **kwargs: object) -> dict:
    kwargs.setdefault("raise_on_deleted_version", True)
    return client.secrets.kv.v2.read_secret_version(path=path, **kwargs)


# --- KV v2 ------------------------------------------------------------------------------------------


def test_write_then_read_returns_the_data_and_version_metadata(client: hvac.Client) -> None:
    written = client.secrets.kv.v2.create_or_update_secret(path=PATH, secret={"client_id": "abc"})
    assert written["data"]["version"] == 1

    answer = read(client)
    assert answer["data"]["data"] == {"client_id": "abc"}
    metadata = answer["data"]["metadata"]
    assert metadata["version"] == 1 and metadata["deletion_time"] == "" and metadata["destroyed"] is False
    assert metadata["created_time"].endswith("Z")
    assert answer["lease_duration"] == 0 and answer["renewable"] is False


def test_every_write_is_a_new_version_and_old_ones_stay_readable(vault: VaultStandIn, client: hvac.Client) -> None:
    assert vault.put_secret(PATH, {"v": "one"}) == 1
    assert vault.put_secret(PATH, {"v": "two"}) == 2

    assert read(client)["data"]["data"] == {"v": "two"}
    assert read(client, version=1)["data"]["data"] == {"v": "one"}
    metadata = client.secrets.kv.v2.read_secret_metadata(path=PATH)["data"]
    assert metadata["current_version"] == 2 and set(metadata["versions"]) == {"1", "2"}


def test_check_and_set_creates_only_once_and_refuses_a_stale_version(client: hvac.Client) -> None:
    kv = client.secrets.kv.v2
    kv.create_or_update_secret(path=PATH, secret={"v": "1"}, cas=0)
    with pytest.raises(vault_errors.InvalidRequest) as caught:
        kv.create_or_update_secret(path=PATH, secret={"v": "again"}, cas=0)
    assert str(caught.value).startswith("check-and-set parameter did not match the current version, on post ")
    assert kv.create_or_update_secret(path=PATH, secret={"v": "2"}, cas=1)["data"]["version"] == 2


def test_a_missing_secret_or_version_is_invalid_path_with_no_errors(vault: VaultStandIn,
                                                                     client: hvac.Client) -> None:
    with pytest.raises(vault_errors.InvalidPath) as caught:
        read(client, path="keybuzz/tenants/nobody/amazon_spapi")
    assert caught.value.errors == []
    assert str(caught.value).startswith("None, on get http://")

    vault.put_secret(PATH, {"v": "1"})
    with pytest.raises(vault_errors.InvalidPath) as caught:
        read(client, version=7)
    assert caught.value.errors == []


def test_a_deleted_version_answers_404_with_the_whole_envelope(vault: VaultStandIn, client: hvac.Client) -> None:
    vault.put_secret(PATH, {"client_secret": "s3cr3t"})
    vault.delete_secret(PATH)

    with pytest.raises(vault_errors.InvalidPath) as caught:
        read(client)
    assert caught.value.errors is None  # no `errors` key: the body is the envelope
    assert caught.value.json["data"]["data"] is None
    assert caught.value.json["data"]["metadata"]["deletion_time"] != ""
    assert "s3cr3t" not in str(caught.value)

    tolerated = read(client, raise_on_deleted_version=False)
    assert tolerated["data"]["data"] is None and tolerated["data"]["metadata"]["version"] == 1

    client.secrets.kv.v2.undelete_secret_versions(path=PATH, versions=[1])
    assert read(client)["data"]["data"] == {"client_secret": "s3cr3t"}


def test_a_destroyed_version_raises_even_when_deleted_versions_are_tolerated(vault: VaultStandIn,
                                                                              client: hvac.Client) -> None:
    vault.put_secret(PATH, {"v": "1"})
    client.secrets.kv.v2.destroy_secret_versions(path=PATH, versions=[1])
    with pytest.raises(vault_errors.InvalidPath) as caught:
        read(client, raise_on_deleted_version=False)
    assert caught.value.json["data"]["metadata"]["destroyed"] is True


def test_delete_without_versions_is_refused(vault: VaultStandIn) -> None:
    vault.put_secret(PATH, {"v": "1"})  # hvac refuses an empty list itself, so this speaks HTTP
    answer = requests.post(f"{vault.url}/v1/secret/delete/{PATH}", json={"versions": []},
                           headers={"X-Vault-Token": ROOT}, timeout=5)
    assert answer.status_code == 400 and answer.json() == {"errors": ["No version number provided"]}


def test_list_shows_keys_and_folders_by_list_verb_and_by_query(vault: VaultStandIn, client: hvac.Client) -> None:
    vault.put_secret("keybuzz/amazon_spapi/app", {"v": "1"})
    vault.put_secret("keybuzz/tenants/acme/amazon_spapi", {"v": "1"})
    vault.put_secret("keybuzz/tenants/bistro/amazon_spapi", {"v": "1"})

    assert client.secrets.kv.v2.list_secrets(path="keybuzz")["data"]["keys"] == ["amazon_spapi/", "tenants/"]
    assert client.secrets.kv.v2.list_secrets(path="keybuzz/tenants")["data"]["keys"] == ["acme/", "bistro/"]
    by_query = requests.get(f"{vault.url}/v1/secret/metadata/keybuzz/tenants", params={"list": "true"},
                            headers={"X-Vault-Token": ROOT}, timeout=5)
    assert by_query.json()["data"]["keys"] == ["acme/", "bistro/"]
    with pytest.raises(vault_errors.InvalidPath):
        client.secrets.kv.v2.list_secrets(path="nothing-here")


def test_an_unknown_mount_has_no_handler(client: hvac.Client) -> None:
    with pytest.raises(vault_errors.InvalidPath) as caught:
        read(client, mount_point="kv")
    assert caught.value.errors == ['no handler for route "kv/data/keybuzz/amazon_spapi/app". route entry not found.']


# --- tokens and AppRole -----------------------------------------------------------------------------


def test_the_root_token_never_expires_and_cannot_be_renewed(client: hvac.Client) -> None:
    data = client.auth.token.lookup_self()["data"]
    assert data["policies"] == ["root"] and data["ttl"] == 0 and data["expire_time"] is None
    with pytest.raises(vault_errors.InvalidRequest) as caught:
        client.auth.token.renew_self()
    assert str(caught.value).startswith("lease is not renewable, on post ")


def test_renewal_extends_up_to_the_max_ttl(vault: VaultStandIn) -> None:
    token = vault.create_token(ttl_s=60, max_ttl_s=90)
    client = hvac.Client(url=vault.url, token=token)
    data = client.auth.token.lookup_self()["data"]
    assert data["renewable"] is True and 58 <= data["ttl"] <= 60 and data["creation_ttl"] == 60

    assert client.auth.token.renew_self()["auth"]["lease_duration"] == 60
    capped = client.auth.token.renew_self(increment="1h")
    assert 88 <= capped["auth"]["lease_duration"] <= 90
    assert "max_ttl" in capped["warnings"][0]


def test_a_non_renewable_token_is_refused_renewal(vault: VaultStandIn) -> None:
    client = hvac.Client(url=vault.url, token=vault.create_token(ttl_s=60, renewable=False))
    with pytest.raises(vault_errors.InvalidRequest, match="lease is not renewable"):
        client.auth.token.renew_self()


def test_approle_login_issues_a_token_and_refuses_bad_credentials(vault: VaultStandIn) -> None:
    vault.add_approle("role-1", "secret-1", token_ttl_s=120)
    client = hvac.Client(url=vault.url, token="")
    login = client.auth.approle.login(role_id="role-1", secret_id="secret-1")
    assert login["auth"]["lease_duration"] == 120 and login["auth"]["renewable"] is True
    assert client.token == login["auth"]["client_token"] and client.token in vault.tokens("role-1")
    assert client.auth.token.lookup_self()["data"]["path"] == "auth/approle/login"

    with pytest.raises(vault_errors.InvalidRequest) as caught:
        client.auth.approle.login(role_id="role-1", secret_id="wrong")
    assert caught.value.errors == ["invalid role or secret ID"]


def test_missing_unknown_and_expired_tokens_are_403(vault: VaultStandIn) -> None:
    vault.put_secret(PATH, {"v": "1"})
    with pytest.raises(vault_errors.Forbidden) as caught:
        read(hvac.Client(url=vault.url, token=""))
    assert caught.value.errors == ["permission denied"]

    with pytest.raises(vault_errors.Forbidden) as caught:
        read(hvac.Client(url=vault.url, token="hvs.not-a-token"))
    assert caught.value.errors == [INVALID_TOKEN_ERROR]

    token = vault.create_token(ttl_s=600)
    read(hvac.Client(url=vault.url, token=token))
    vault.expire_token(token)
    client = hvac.Client(url=vault.url, token=token)
    with pytest.raises(vault_errors.Forbidden, match="invalid token"):
        read(client)
    assert client.is_authenticated() is False


def test_a_policy_without_the_path_is_denied_with_a_single_error(vault: VaultStandIn) -> None:
    vault.put_secret(PATH, {"v": "1"})
    vault.add_policy("tenants-only", ["secret/data/keybuzz/tenants/*"])
    client = hvac.Client(url=vault.url, token=vault.create_token(ttl_s=600, policies=["tenants-only"]))
    with pytest.raises(vault_errors.Forbidden) as caught:
        read(client)
    assert caught.value.errors == [POLICY_DENIED_ERROR]
    assert client.is_authenticated() is True  # lookup-self is the default policy's


def test_the_bearer_header_is_accepted(vault: VaultStandIn) -> None:
    answer = requests.get(f"{vault.url}/v1/auth/token/lookup-self", headers={"Authorization": f"Bearer {ROOT}"},
                          timeout=5)
    assert answer.status_code == 200


# --- seal, faults, wire format ----------------------------------------------------------------------


def test_sealed_vault_answers_503_except_health_and_seal_status(vault: VaultStandIn, client: hvac.Client) -> None:
    vault.put_secret(PATH, {"v": "1"})
    vault.seal()
    with pytest.raises(vault_errors.VaultDown) as caught:
        read(client)
    assert caught.value.errors == ["Vault is sealed"]
    assert client.sys.is_sealed() is True
    health = client.sys.read_health_status(method="GET")
    assert health.status_code == 503 and health.json()["sealed"] is True

    vault.seal(False)
    assert read(client)["data"]["data"] == {"v": "1"}
    assert client.sys.read_health_status(method="GET")["sealed"] is False


@pytest.mark.parametrize(("status", "exception"), [
    (429, vault_errors.RateLimitExceeded), (500, vault_errors.InternalServerError),
    (502, vault_errors.BadGateway), (503, vault_errors.VaultDown), (412, vault_errors.UnexpectedError),
])
def test_a_fault_answers_the_status_the_given_number_of_times(vault: VaultStandIn, client: hvac.Client,
                                                              status: int, exception: type[Exception]) -> None:
    vault.put_secret(PATH, {"v": "1"})
    vault.add_fault(status, times=2, path_regex="/data/")
    assert client.auth.token.lookup_self()  # not a /data/ path: unaffected
    for _ in range(2):
        with pytest.raises(exception):
            read(client)
    assert read(client)["data"]["data"] == {"v": "1"}


def test_a_dropped_connection_is_a_transport_error(vault: VaultStandIn, client: hvac.Client) -> None:
    vault.put_secret(PATH, {"v": "1"})
    vault.add_fault(500, mode="drop")
    with pytest.raises(requests.ConnectionError):
        read(client)
    assert vault.requests()[-1] == {"method": "GET", "path": f"/v1/secret/data/{PATH}", "status": None}
    assert read(client)["data"]["data"] == {"v": "1"}


def test_every_json_answer_has_the_exact_content_type_and_deletes_have_no_body(vault: VaultStandIn) -> None:
    vault.put_secret(PATH, {"v": "1"})
    token = {"X-Vault-Token": ROOT}
    answers = [
        requests.get(f"{vault.url}/v1/secret/data/{PATH}", headers=token, timeout=5),
        requests.get(f"{vault.url}/v1/secret/data/missing", headers=token, timeout=5),
        requests.get(f"{vault.url}/v1/secret/data/{PATH}", timeout=5),
        requests.get(f"{vault.url}/v1/sys/health", timeout=5),
    ]
    assert [a.status_code for a in answers] == [200, 404, 403, 200]
    assert {a.headers["Content-Type"] for a in answers} == {"application/json"}
    assert answers[1].json() == {"errors": []}

    deleted = requests.delete(f"{vault.url}/v1/secret/data/{PATH}", headers=token, timeout=5)
    assert deleted.status_code == 204 and deleted.content == b""


def test_reads_are_counted_and_requests_are_logged_without_tokens(vault: VaultStandIn, client: hvac.Client) -> None:
    vault.put_secret(PATH, {"v": "1"})
    read(client)
    read(client)
    with pytest.raises(vault_errors.InvalidPath):
        read(client, path="missing")

    assert vault.read_count(PATH) == 2 and vault.read_count() == 2
    log = vault.requests()
    assert [entry["status"] for entry in log] == [200, 200, 404]
    assert ROOT not in json.dumps(log)


def test_reset_forgets_secrets_tokens_faults_and_seal_but_keeps_root_and_roles(vault: VaultStandIn,
                                                                                client: hvac.Client) -> None:
    vault.put_secret(PATH, {"v": "1"})
    token = vault.create_token(ttl_s=600)
    vault.add_approle("kept-role", "kept-secret")
    vault.add_fault(500, times=5)
    vault.seal()

    vault.reset()
    assert vault.requests() == [] and vault.read_count() == 0
    with pytest.raises(vault_errors.InvalidPath):
        read(client)
    with pytest.raises(vault_errors.Forbidden):
        hvac.Client(url=vault.url, token=token).auth.token.lookup_self()
    assert hvac.Client(url=vault.url, token="").auth.approle.login(role_id="kept-role", secret_id="kept-secret")


def test_the_control_api_works_over_http(vault: VaultStandIn, client: hvac.Client) -> None:
    control = f"{vault.url}/_emulator"
    put = requests.put(f"{control}/secrets/{PATH}", json={"data": {"v": "http"}}, timeout=5)
    assert put.status_code == 200 and put.json() == {"version": 1}
    assert read(client)["data"]["data"] == {"v": "http"}

    assert requests.post(f"{control}/faults", json={"status": 502, "times": 1, "path_regex": "/data/",
                                                    "mode": "http"}, timeout=5).status_code == 204
    with pytest.raises(vault_errors.BadGateway):
        read(client)

    assert requests.post(f"{control}/seal", json={"sealed": True}, timeout=5).status_code == 204
    with pytest.raises(vault_errors.VaultDown):
        read(client)
    seen = requests.get(f"{control}/requests", timeout=5).json()
    assert [entry["status"] for entry in seen["requests"]] == [200, 502, 503]
    assert seen["read_counts"] == {PATH: 1}

    assert requests.post(f"{control}/reset", timeout=5).status_code == 204
    with pytest.raises(vault_errors.InvalidPath):
        read(client)
    refused = requests.post(f"{control}/faults", json={"times": 1}, timeout=5)
    assert refused.status_code == 400 and refused.headers["Content-Type"] == "application/json"


def test_the_seed_is_applied_and_reapplied_on_reset(vault: VaultStandIn, client: hvac.Client) -> None:
    vault.seed({"secrets": {PATH: {"v": "seeded"}},
                "approles": [{"role_id": "seed-role", "secret_id": "seed-secret", "token_ttl_s": 60}]})
    try:
        vault.put_secret(PATH, {"v": "changed"})
        vault.reset()
        assert read(client)["data"]["data"] == {"v": "seeded"}
        login = hvac.Client(url=vault.url, token="").auth.approle.login(role_id="seed-role", secret_id="seed-secret")
        assert login["auth"]["lease_duration"] == 60
    finally:
        vault.seed({})


def test_it_runs_alone_from_the_command_line(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"vault": {"secrets": {PATH: {"v": "cli"}}}}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "devstack.vault", "--port", str(port), "--seed", str(seed),
                                "--root-token", "cli-root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = hvac.Client(url=f"http://127.0.0.1:{port}", token="cli-root", timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert read(client)["data"]["data"] == {"v": "cli"}
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=5)
