"""The SP-API + LWA stand-in against Amazon's Messaging model and the research brief.

Every Messaging answer in this file goes through `Api.call`, which checks it against the model: the
status must be one the operation documents, the body must validate against the documented schema,
and the headers must be the documented ones (`x-amzn-RateLimit-Limit` exactly where declared).
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft4Validator

from devstack.spapi import OPERATIONS, SpapiStandIn

# Amazon's official Messaging model, byte for byte (also at ../shared/reference/; sha256 checked below).
MODEL_PATH = Path(__file__).resolve().parents[1] / "devstack" / "spapi-messaging.json"
MODEL = json.loads(MODEL_PATH.read_text())
MODEL_OPERATIONS = {op["operationId"]: (path, method.upper(), op)
                    for path, methods in MODEL["paths"].items() for method, op in methods.items()}
SEND_IDS = [op_id for op_id, (_, method, _) in MODEL_OPERATIONS.items() if method == "POST"]

APP, SECRET = "amzn1.application-oa2-client.test", "lwa-secret"
REFRESH, SELLER = "Atzr|refresh-1", "SELLER1"
US, DE = "ATVPDKIKX0DER", "A1PA6795UKMFR9"
ORDER = "111-2222222-3333333"


def model_schema(ref: str) -> Draft4Validator:
    return Draft4Validator({"$ref": ref, "definitions": MODEL["definitions"]})


def request_ref(operation_id: str) -> str:
    _, _, op = MODEL_OPERATIONS[operation_id]
    return next(param for param in op["parameters"] if param["in"] == "body")["schema"]["$ref"]


def request_schema(operation_id: str) -> Draft4Validator:
    return model_schema(request_ref(operation_id))


def request_fields(operation_id: str) -> dict[str, Any]:
    return MODEL["definitions"][request_ref(operation_id).rsplit("/", 1)[-1]]["properties"]


def valid_body(operation_id: str) -> dict[str, Any]:
    """A request body built from what the model's request schema has."""
    fields = request_fields(operation_id)
    body: dict[str, Any] = {}
    if "text" in fields:
        body["text"] = "Your order ships tomorrow."
    if "attachments" in fields:
        body["attachments"] = [{"uploadDestinationId": "amzn1.tortuga.3.abc", "fileName": "doc.pdf"}]
    for name, field in fields.items():
        if field.get("format") == "date-time":
            body[name] = "2026-01-01T00:00:00Z"
    return body


def action_of(operation_id: str) -> str:
    """The action name of a send operation: the last segment of its path."""
    return MODEL_OPERATIONS[operation_id][0].rsplit("/", 1)[-1]


def check_contract(operation_id: str, response: httpx.Response) -> None:
    _, _, op = MODEL_OPERATIONS[operation_id]
    status = str(response.status_code)
    assert status in op["responses"], f"{operation_id} answered {status}, which the model does not document"
    spec = op["responses"][status]
    model_schema(spec["schema"]["$ref"]).validate(response.json())
    uuid.UUID(response.headers["x-amzn-RequestId"])
    declared = set(spec.get("headers", {}))
    assert ("x-amzn-RateLimit-Limit" in response.headers) == ("x-amzn-RateLimit-Limit" in declared), status


class Api:
    """Calls Messaging operations by operationId on the paths of the model, checking every answer."""

    def __init__(self, http: httpx.Client, standin: SpapiStandIn) -> None:
        self.http = http
        self.standin = standin
        self.token = ""

    def login(self, refresh_token: str = REFRESH) -> str:
        response = self.http.post("/auth/o2/token", data={"grant_type": "refresh_token", "client_id": APP,
                                                          "client_secret": SECRET, "refresh_token": refresh_token})
        assert response.status_code == 200, response.text
        self.token = response.json()["access_token"]
        return self.token

    def call(self, operation_id: str, order_id: str = ORDER, *, body: Any = None, marketplace: Any = US,
             token: str | None = None, **kwargs: Any) -> httpx.Response:
        """`token`: None for the one from `login`, "" for none at all."""
        path, method, _ = MODEL_OPERATIONS[operation_id]
        token = self.token if token is None else token
        headers = {"x-amz-access-token": token} if token else {}
        headers.update(kwargs.pop("headers", {}))
        params = {"marketplaceIds": marketplace} if marketplace is not None else {}
        response = self.http.request(method, path.format(amazonOrderId=order_id), params=params, json=body,
                                     headers=headers, **kwargs)
        check_contract(operation_id, response)
        return response


def error_of(response: httpx.Response) -> dict[str, str]:
    return response.json()["errors"][0]


@pytest.fixture(scope="module")
def standin() -> Iterator[SpapiStandIn]:
    with SpapiStandIn() as server:
        yield server


@pytest.fixture
def api(standin: SpapiStandIn) -> Iterator[Api]:
    standin.reset()
    standin.register_app(APP, SECRET)
    standin.register_seller(REFRESH, SELLER)
    with httpx.Client(base_url=standin.url, timeout=5) as http:
        client = Api(http, standin)
        client.login()
        yield client


# --- the model's operations ------------------------------------------------------------------------


def test_the_standin_serves_exactly_the_operations_of_the_model() -> None:
    ours = {op.operation_id: op for op in OPERATIONS}
    assert set(ours) == set(MODEL_OPERATIONS)
    for operation_id, op in ours.items():
        path, method, _ = MODEL_OPERATIONS[operation_id]
        assert op.method == method
        if op.action:
            assert path.endswith(f"/messages/{op.action}")
            assert op.text_max == request_fields(operation_id).get("text", {}).get("maxLength")


@pytest.mark.parametrize("operation_id", SEND_IDS)
def test_every_send_accepts_a_body_the_model_accepts(api: Api, operation_id: str) -> None:
    body = valid_body(operation_id)
    request_schema(operation_id).validate(body)
    api.standin.set_order(ORDER, [action_of(operation_id)])

    response = api.call(operation_id, body=body)

    assert response.status_code == 201
    assert response.json() == {}
    assert response.headers["content-type"] == "application/hal+json"
    [message] = api.standin.messages()
    assert message["message_type"] == action_of(operation_id)
    assert message["order_id"] == ORDER and message["seller_id"] == SELLER and message["marketplace_id"] == US
    assert message["text"] == body.get("text")
    assert message["request_id"] == response.headers["x-amzn-RequestId"]


@pytest.mark.parametrize(("operation_id", "body", "model_refuses"), [
    ("createConfirmOrderDetails", {"text": "x" * 2001}, True),
    ("confirmCustomizationDetails", {"text": "x" * 801}, True),
    ("createDigitalAccessKey", {"text": "x" * 401}, True),
    ("createUnexpectedProblem", {"text": ""}, True),
    ("createConfirmDeliveryDetails", {"text": 42}, True),
    ("createLegalDisclosure", {"attachments": [{"fileName": "a.pdf"}]}, True),
    ("CreateWarranty", {"attachments": [{"uploadDestinationId": "u", "fileName": "w.pdf"}],
                        "coverageStartDate": 20260101}, True),
    # The brief's reading where the model is silent or slips (no `required`; maxLength on arrays):
    ("createConfirmOrderDetails", {}, False),
    ("createLegalDisclosure", {"attachments": [{"uploadDestinationId": "u", "fileName": "a.pdf"}] * 6}, False),
    ("sendInvoice", {}, False),
])
def test_a_body_outside_the_rules_is_400_invalid_input(api: Api, operation_id: str, body: dict[str, Any],
                                                       model_refuses: bool) -> None:
    assert (not request_schema(operation_id).is_valid(body)) == model_refuses
    api.standin.set_order(ORDER, [action_of(operation_id)])

    response = api.call(operation_id, body=body)

    assert response.status_code == 400
    assert error_of(response)["code"] == "InvalidInput"
    assert api.standin.messages() == []


def test_text_at_the_limit_is_accepted(api: Api) -> None:
    api.standin.set_order(ORDER, ["confirmOrderDetails", "confirmCustomizationDetails"])
    assert api.call("createConfirmOrderDetails", body={"text": "x" * 2000}).status_code == 201
    assert api.call("confirmCustomizationDetails", body={"text": "x" * 800, "extra": 1}).status_code == 201


def test_actions_are_hal_links_named_by_path_segment(api: Api) -> None:
    api.standin.set_order(ORDER, ["confirmOrderDetails", "unexpectedProblem"])

    response = api.call("getMessagingActionsForOrder")

    assert response.status_code == 200
    body = response.json()
    base = f"/messaging/v1/orders/{ORDER}"
    assert body["_links"]["self"]["href"] == f"{base}?marketplaceIds={US}"
    assert body["_links"]["actions"] == [
        {"href": f"{base}/messages/confirmOrderDetails?marketplaceIds={US}", "name": "confirmOrderDetails"},
        {"href": f"{base}/messages/unexpectedProblem?marketplaceIds={US}", "name": "unexpectedProblem"},
    ]
    first = body["_embedded"]["actions"][0]
    assert first["_links"]["schema"] == {"href": f"{base}/messages/confirmOrderDetails/schema",
                                         "name": "confirmOrderDetails"}
    payload = first["_embedded"]["schema"]["payload"]
    Draft4Validator.check_schema(payload)
    assert payload["properties"]["text"]["maxLength"] == 2000


def test_an_order_not_registered_gets_the_default_actions_and_the_sandbox_order_all(api: Api) -> None:
    names = [link["name"] for link in api.call("getMessagingActionsForOrder").json()["_links"]["actions"]]
    assert names == api.standin.default_actions == ["confirmOrderDetails", "confirmDeliveryDetails",
                                                    "unexpectedProblem"]
    sandbox = api.call("getMessagingActionsForOrder", "123-1234567-1234567").json()["_links"]["actions"]
    assert {"confirmCustomizationDetails", "legalDisclosure", "warranty", "attributes"} <= \
        {link["name"] for link in sandbox}


def test_an_order_with_no_actions_lists_empty_arrays(api: Api) -> None:
    api.standin.set_order(ORDER, [])
    body = api.call("getMessagingActionsForOrder").json()
    assert body["_links"]["actions"] == [] and body["_embedded"]["actions"] == []


def test_attributes_give_the_buyer_locale(api: Api) -> None:
    assert api.call("GetAttributes").json() == {"buyer": {"locale": "en-US"}}
    api.standin.set_order(ORDER, [], DE, locale="de-DE")
    assert api.call("GetAttributes", marketplace=DE).json() == {"buyer": {"locale": "de-DE"}}


def test_a_type_the_order_does_not_allow_is_403_template_combination(api: Api) -> None:
    api.standin.set_order(ORDER, ["confirmDeliveryDetails"])

    response = api.call("createConfirmOrderDetails", body={"text": "Hello"})

    assert response.status_code == 403
    assert error_of(response) == {"code": "Unauthorized", "message": "Invalid amazonOrderId and template combination.",
                                  "details": ""}
    assert api.standin.messages() == []


def test_a_removed_type_is_refused_as_a_template(api: Api) -> None:
    response = api.http.post(f"/messaging/v1/orders/{ORDER}/messages/negativeFeedbackRemoval",
                             params={"marketplaceIds": US}, json={}, headers={"x-amz-access-token": api.token})
    assert response.status_code == 403
    assert error_of(response)["message"] == "Invalid amazonOrderId and template combination."


@pytest.mark.parametrize("marketplace", [None, "", [US, DE], f"{US},{DE}"])
def test_marketplace_ids_must_be_one_value(api: Api, marketplace: Any) -> None:
    response = api.call("getMessagingActionsForOrder", marketplace=marketplace)
    assert response.status_code == 400
    assert error_of(response)["message"] == "marketplaceIds: Missing or invalid request parameter: marketplaceId"


def test_an_order_of_another_marketplace_is_400(api: Api) -> None:
    api.standin.set_order(ORDER, ["confirmOrderDetails"], DE)
    assert api.call("getMessagingActionsForOrder", marketplace=US).status_code == 400
    assert api.call("getMessagingActionsForOrder", marketplace=DE).status_code == 200


@pytest.mark.parametrize("order_id", ["1234567", "ABC-1234567-1234567", "123-1234567-0000000"])
def test_an_order_id_not_3_7_7_or_the_sandbox_bad_one_is_400(api: Api, order_id: str) -> None:
    response = api.call("createConfirmOrderDetails", order_id, body={"text": "Hello"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "InvalidInput"


def test_a_body_that_is_not_json_is_415_and_one_too_large_is_413(api: Api) -> None:
    response = api.http.post(f"/messaging/v1/orders/{ORDER}/messages/confirmOrderDetails",
                             params={"marketplaceIds": US}, content=b"text=hi",
                             headers={"x-amz-access-token": api.token, "content-type": "text/plain"})
    check_contract("createConfirmOrderDetails", response)
    assert response.status_code == 415

    huge = json.dumps({"text": "x" * (api.standin.max_body_bytes + 1)}).encode()
    response = api.http.post(f"/messaging/v1/orders/{ORDER}/messages/confirmOrderDetails",
                             params={"marketplaceIds": US}, content=huge,
                             headers={"x-amz-access-token": api.token, "content-type": "application/json"})
    check_contract("createConfirmOrderDetails", response)
    assert response.status_code == 413
    assert api.standin.messages() == []


# --- access tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "details"), [
    ("", "Access token is missing in the request header."),
    ("Atza|not-one-we-issued", "The access token you provided is revoked, malformed or invalid."),
])
def test_a_missing_or_unknown_access_token_is_403(api: Api, token: str, details: str) -> None:
    response = api.call("getMessagingActionsForOrder", token=token)
    assert response.status_code == 403
    assert error_of(response) == {"code": "Unauthorized", "message": "Access to requested resource is denied.",
                                  "details": details}


def test_expired_access_tokens_are_403_until_a_new_grant(api: Api) -> None:
    assert api.call("getMessagingActionsForOrder").status_code == 200
    api.standin.expire_access_tokens()

    response = api.call("getMessagingActionsForOrder")
    assert response.status_code == 403
    assert error_of(response)["details"] == "The access token you provided has expired."

    api.login()
    assert api.call("getMessagingActionsForOrder").status_code == 200


def test_tokens_expire_after_their_lifetime() -> None:
    with SpapiStandIn(token_ttl_s=0) as server, httpx.Client(base_url=server.url) as http:
        server.register_app(APP, SECRET)
        server.register_seller(REFRESH, SELLER)
        api = Api(http, server)
        api.login()
        response = api.call("GetAttributes")
        assert error_of(response)["details"] == "The access token you provided has expired."


# --- LWA -------------------------------------------------------------------------------------------


def test_lwa_grants_a_bearer_token_from_a_form_or_json_body(api: Api) -> None:
    grant = {"grant_type": "refresh_token", "client_id": APP, "client_secret": SECRET, "refresh_token": REFRESH}
    before = api.standin.lwa_calls()
    for response in (api.http.post("/auth/o2/token", data=grant), api.http.post("/auth/o2/token", json=grant)):
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["token_type"] == "bearer" and body["expires_in"] == 3600 and body["refresh_token"] == REFRESH
        assert body["access_token"].startswith("Atza|") and len(body["access_token"]) >= 350
    assert api.standin.lwa_calls() == before + 2


@pytest.mark.parametrize(("change", "status", "error", "description"), [
    ({"client_secret": "wrong"}, 401, "invalid_client", "Client authentication failed"),
    ({"client_id": "amzn1.application-oa2-client.other"}, 401, "invalid_client", "Client authentication failed"),
    ({"refresh_token": "Atzr|unknown"}, 400, "invalid_grant",
     "The request has an invalid grant parameter : refresh_token"),
    ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type", None),
    ({"refresh_token": None}, 400, "invalid_request", None),
    ({"grant_type": None}, 400, "invalid_request", None),
])
def test_lwa_errors(api: Api, change: dict[str, Any], status: int, error: str, description: str | None) -> None:
    grant = {"grant_type": "refresh_token", "client_id": APP, "client_secret": SECRET, "refresh_token": REFRESH}
    grant = {k: v for k, v in {**grant, **change}.items() if v is not None}
    before = api.standin.lwa_calls()

    response = api.http.post("/auth/o2/token", data=grant)

    assert response.status_code == status
    assert response.json()["error"] == error
    if description:
        assert response.json()["error_description"] == description
    assert api.standin.lwa_calls() == before


def test_a_revoked_refresh_token_is_invalid_grant_and_issued_tokens_live_on(api: Api) -> None:
    api.standin.revoke_refresh_token(REFRESH)
    response = api.http.post("/auth/o2/token", data={"grant_type": "refresh_token", "client_id": APP,
                                                     "client_secret": SECRET, "refresh_token": REFRESH})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert api.call("GetAttributes").status_code == 200


# --- quotas ----------------------------------------------------------------------------------------


def test_the_quota_is_a_token_bucket_per_seller_and_operation(api: Api) -> None:
    statuses = [api.call("getMessagingActionsForOrder").status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]

    throttled = api.call("getMessagingActionsForOrder")
    assert error_of(throttled)["code"] == "QuotaExceeded"
    assert error_of(throttled)["message"] == "You exceeded your quota for the requested resource."
    assert api.call("GetAttributes").status_code == 200  # another operation has its own bucket
    api.standin.register_seller("Atzr|refresh-2", "SELLER2")
    api.login("Atzr|refresh-2")
    assert api.call("getMessagingActionsForOrder").status_code == 200  # so has another seller


def test_the_bucket_refills_at_the_rate(api: Api) -> None:
    api.standin.set_quota(rate=20.0, burst=1)
    assert api.call("GetAttributes").status_code == 200
    assert api.call("GetAttributes").status_code == 429
    deadline = time.monotonic() + 2
    while (response := api.call("GetAttributes")).status_code == 429 and time.monotonic() < deadline:
        pass
    assert response.status_code == 200
    assert response.headers["x-amzn-RateLimit-Limit"] == "20.0"


# --- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429, 400, 404])
def test_an_http_fault_answers_an_amazon_shaped_error_then_stops(api: Api, status: int) -> None:
    api.standin.add_fault("createConfirmOrderDetails", status=status, times=2)

    pending = api.http.get("/_emulator/faults").json()
    assert [(f["operation"], f["status"], f["times"]) for f in pending] == [("createConfirmOrderDetails", status, 2)]
    answers = [api.call("createConfirmOrderDetails", body={"text": "Hello"}) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [status, status, 201]
    assert api.standin.pending_faults() == [] == api.http.get("/_emulator/faults").json()
    assert len(api.standin.messages()) == 1
    assert [r["fault"] for r in api.standin.requests() if r["operation"] == "createConfirmOrderDetails"] == \
        ["http", "http", None]


def test_a_wildcard_fault_hits_any_operation_and_lwa_faults_are_lwa_shaped(api: Api) -> None:
    api.standin.add_fault("*", status=503)
    assert api.call("GetAttributes").status_code == 503
    api.standin.add_fault("lwa", status=500)
    response = api.http.post("/auth/o2/token", data={"grant_type": "refresh_token", "client_id": APP,
                                                     "client_secret": SECRET, "refresh_token": REFRESH})
    assert (response.status_code, response.json()["error"]) == (500, "server_error")


def test_a_delay_fault_holds_one_call_and_not_the_others(api: Api) -> None:
    api.standin.add_fault("createConfirmOrderDetails", mode="delay", delay_s=1.0)
    timed_out = threading.Event()

    def slow_send() -> None:
        with httpx.Client(base_url=api.standin.url, timeout=0.5) as http:
            try:
                http.post(f"/messaging/v1/orders/{ORDER}/messages/confirmOrderDetails", params={"marketplaceIds": US},
                          json={"text": "late"}, headers={"x-amz-access-token": api.token})
            except httpx.ReadTimeout:
                timed_out.set()

    sender = threading.Thread(target=slow_send)
    sender.start()
    started = time.monotonic()
    assert api.call("GetAttributes").status_code == 200
    assert time.monotonic() - started < 0.5  # served while the delayed call sleeps
    sender.join()
    assert timed_out.is_set()
    # The stand-in still serves the late call after the client gave up: wait for it, so it cannot
    # land in the next test's records.
    deadline = time.monotonic() + 5
    while not any(r["fault"] == "delay" for r in api.standin.requests()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r["status"] for r in api.standin.requests() if r["fault"] == "delay"] == [201]


def test_a_client_that_hung_up_is_not_a_traceback_but_a_stand_in_bug_is(capfd: pytest.CaptureFixture[str],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    with SpapiStandIn() as standin, socket.socket() as client:
        httpd = standin._httpd
        assert httpd is not None
        for gone in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
            try:
                raise gone
            except ConnectionError:
                httpd.handle_error(client, ("127.0.0.1", 1))
        assert "Traceback" not in capfd.readouterr().err
        try:
            raise ValueError("a real bug")
        except ValueError:
            httpd.handle_error(client, ("127.0.0.1", 1))
    assert "a real bug" in caplog.text


def test_drop_after_request_on_a_send_records_the_message_and_answers_nothing(api: Api) -> None:
    api.standin.add_fault("createConfirmOrderDetails", mode="drop_after_request")

    with pytest.raises(httpx.RemoteProtocolError):
        api.http.post(f"/messaging/v1/orders/{ORDER}/messages/confirmOrderDetails", params={"marketplaceIds": US},
                      json={"text": "Did it arrive?"}, headers={"x-amz-access-token": api.token})

    [message] = api.standin.messages()
    assert message["text"] == "Did it arrive?"
    assert api.call("createConfirmOrderDetails", body={"text": "again"}).status_code == 201


def test_fault_arguments_are_checked(standin: SpapiStandIn) -> None:
    with pytest.raises(ValueError, match="mode"):
        standin.add_fault("createConfirmOrderDetails", mode="explode")
    with pytest.raises(ValueError, match="unknown operation"):
        standin.add_fault("createConfirmOrderDetail")
    with pytest.raises(ValueError, match="error status"):
        standin.add_fault("createConfirmOrderDetails", status=201)
    with pytest.raises(ValueError, match="at least 1"):
        standin.add_fault("createConfirmOrderDetails", times=0)


# --- control API, reset, CLI -------------------------------------------------------------------------


def test_the_control_api_over_http(api: Api) -> None:
    http, base = api.http, "/_emulator"
    assert http.put(f"{base}/apps/app-2", json={"client_secret": "s2"}).status_code == 204
    assert http.put(f"{base}/sellers/Atzr%7Cwith%2Fslash", json={"seller_id": "SELLER3"}).status_code == 204
    grant = {"grant_type": "refresh_token", "client_id": "app-2", "client_secret": "s2",
             "refresh_token": "Atzr|with/slash"}
    token = http.post("/auth/o2/token", data=grant).json()["access_token"]
    assert http.put(f"{base}/orders/{ORDER}", json={"actions": ["unexpectedProblem"], "marketplace_id": US}
                    ).status_code == 204
    assert http.put(f"{base}/quota", json={"rate": 2.0, "burst": 3}).status_code == 204
    assert http.post(f"{base}/faults", json={"operation": "createUnexpectedProblem", "status": 500}).status_code == 204

    assert api.call("createUnexpectedProblem", body={"text": "Hi"}, token=token).status_code == 500
    sent = api.call("createUnexpectedProblem", body={"text": "Hi"}, token=token)
    assert (sent.status_code, sent.headers["x-amzn-RateLimit-Limit"]) == (201, "2.0")
    assert [m["seller_id"] for m in http.get(f"{base}/messages").json()] == ["SELLER3"]
    assert http.get(f"{base}/requests").json()[-1]["status"] == 201
    assert http.get(f"{base}/lwa-calls").json() == {"lwa_calls": api.standin.lwa_calls()}

    assert http.post(f"{base}/tokens/expire").status_code == 204
    assert api.call("GetAttributes", token=token).status_code == 403
    assert http.delete(f"{base}/sellers/Atzr%7Cwith%2Fslash").status_code == 204
    assert http.post("/auth/o2/token", data=grant).json()["error"] == "invalid_grant"

    assert http.post(f"{base}/reset").status_code == 204
    assert http.get(f"{base}/messages").json() == [] and http.get(f"{base}/requests").json() == []
    assert http.post(f"{base}/faults", json={"operation": "nope"}).status_code == 400
    assert http.put(f"{base}/orders/{ORDER}", json={"marketplace_id": US}).status_code == 400


def test_reset_forgets_what_happened_keeps_credentials_and_reapplies_the_seed() -> None:
    with SpapiStandIn() as standin, httpx.Client(base_url=standin.url, timeout=5) as http:
        standin.seed({"apps": {APP: SECRET}, "orders": {ORDER: {"actions": ["confirmServiceDetails"]}},
                      "default_actions": ["unexpectedProblem"]})
        standin.register_seller(REFRESH, SELLER)
        api = Api(http, standin)
        api.login()
        standin.set_order(ORDER, [])
        standin.set_order("999-0000000-0000001", ["confirmOrderDetails"])
        standin.set_quota(0.01, 1)
        standin.add_fault("createConfirmServiceDetails", 500)
        api.call("GetAttributes")

        standin.reset()

        assert standin.messages() == [] and standin.requests() == [] and standin.lwa_calls() == 0
        assert api.call("GetAttributes").status_code == 403  # issued tokens are forgotten
        api.login()  # the seeded app and the registered seller are still there
        actions = [a["name"] for a in api.call("getMessagingActionsForOrder").json()["_links"]["actions"]]
        assert actions == ["confirmServiceDetails"]  # the seeded order, not the later change
        other = api.call("getMessagingActionsForOrder", "999-0000000-0000001").json()["_links"]["actions"]
        assert [a["name"] for a in other] == ["unexpectedProblem"]  # the seeded default actions
        assert api.call("createConfirmServiceDetails", body={"text": "Hi"}).status_code == 201  # no fault


def test_requests_are_recorded_without_the_access_token(api: Api) -> None:
    api.call("createConfirmOrderDetails", body={"text": "Hello"}, headers={"user-agent": "test-agent/1"})
    record = api.standin.requests()[-1]
    assert record["operation"] == "createConfirmOrderDetails" and record["status"] == 201
    assert record["seller_id"] == SELLER and record["order_id"] == ORDER and record["user_agent"] == "test-agent/1"
    assert api.token not in json.dumps(api.standin.requests())


def test_the_cli_serves_a_seeded_standin(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    section = {"apps": {APP: SECRET}, "sellers": {REFRESH: SELLER},
               "orders": {ORDER: {"actions": ["confirmDeliveryDetails"]}}}
    seed.write_text(json.dumps({"vault": {}, "spapi": section}))  # the dev stack's file: a section per stand-in
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-m", "devstack.spapi", "--port", "0", "--seed", str(seed)],
                               cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        assert line.startswith("spapi listening on http://"), line
        with httpx.Client(base_url=url, timeout=5) as http:
            api = Api(http, SpapiStandIn())  # only `http` is used
            api.login()
            names = [a["name"] for a in api.call("getMessagingActionsForOrder").json()["_links"]["actions"]]
            assert names == ["confirmDeliveryDetails"]
    finally:
        process.terminate()
        process.wait(timeout=5)


def test_vendored_model_is_amazons_official_file_unchanged() -> None:
    # sha256 of models/messaging-api-model/messaging.json at b9dffa43 (reference/spapi-messaging.md §0).
    digest = hashlib.sha256(MODEL_PATH.read_bytes()).hexdigest()
    assert digest.startswith("16b585e8") and digest.endswith("06700a8a1")
