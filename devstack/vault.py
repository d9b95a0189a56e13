"""A local Vault stand-in: KV v2, token and AppRole auth, seal state and fault injection, over HTTP.

Built to `reference/vault-kv2.md` so that hvac 2.4.0 behaves against it as against a real Vault: the exact
`Content-Type: application/json` (hvac compares the string), `{"errors":[]}` for a missing secret, the full
envelope for a deleted version, 403 (never 401) for bad tokens, 204 with no body where Vault sends one.

Control API (no token needed): `POST /_emulator/seal {"sealed": true}`, `POST /_emulator/faults
{"status", "times", "path_regex", "mode"}`, `POST /_emulator/reset`, `GET /_emulator/requests`,
`PUT /_emulator/secrets/<path> {"data": {...}}`.

Run alone: `python -m devstack.vault --port 8200 [--seed FILE.json] [--root-token T]`.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from devstack.emulator import EmulatorServer, Request, Response, control_endpoint, run_cli

DEFAULT_ROOT_TOKEN = "dev-root"
DEFAULT_MOUNT = "secret"

# Vault >= 1.17 joins the two errors of an invalid token into one string (vault#28792); a policy denial
# on a valid token is the one-error form. Clients must match substrings, and so do our tests.
INVALID_TOKEN_ERROR = "2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"
POLICY_DENIED_ERROR = "1 error occurred:\n\t* permission denied\n\n"
MISSING_TOKEN_ERROR = "permission denied"
SEALED_ERROR = "Vault is sealed"

# Paths Vault serves without a token, and while sealed (health and seal status only).
_UNAUTHENTICATED = re.compile(r"^(sys/health|sys/seal-status|auth/[^/]+/login)$")
_SERVED_WHEN_SEALED = re.compile(r"^(sys/health|sys/seal-status)$")

# What a token's `default` policy always allows (Vault attaches it to every non-root token).
_SELF_ENDPOINTS = frozenset({"auth/token/lookup-self", "auth/token/renew-self"})

_FAULT_ERRORS = {
    412: "required index state not present",
    429: 'request path "{path}": rate limit quota exceeded',
    500: "internal error",
    501: "Vault is not initialized",
    502: "error from upstream",
    503: SEALED_ERROR,
}


def _rfc3339(ts: float) -> str:
    """Vault's timestamp form: RFC 3339 UTC with nanoseconds and a trailing Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def _json(status: int, payload: Any) -> Response:
    # Exactly "application/json": hvac drops `errors` and `json` from its exceptions otherwise.
    return Response.json(status, payload, **{"Cache-Control": "no-store"})


def _errors(status: int, *messages: str) -> Response:
    return _json(status, {"errors": list(messages)})


def _envelope(data: Any, *, auth: dict[str, Any] | None = None, warnings: list[str] | None = None,
              mount_type: str = "kv") -> dict[str, Any]:
    return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": data, "wrap_info": None, "warnings": warnings, "auth": auth, "mount_type": mount_type}


def _parse_duration(value: Any) -> int:
    """Seconds from Vault's duration forms: 300, "300", "300s", "5m", "1h"."""
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"(\d+)([smh]?)", str(value).strip())
    if not match:
        raise ValueError(f"invalid duration {value!r}")
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def _clean_path(path: str) -> str:
    return re.sub(r"/+", "/", path).strip("/")


@dataclass
class _Version:
    data: dict[str, Any] | None = field(repr=False)
    created_time: str
    deletion_time: str = ""
    destroyed: bool = False

    @property
    def readable(self) -> bool:
        return not self.deletion_time and not self.destroyed

    def metadata(self, number: int, custom: dict[str, str] | None) -> dict[str, Any]:
        return {"created_time": self.created_time, "custom_metadata": custom,
                "deletion_time": self.deletion_time, "destroyed": self.destroyed, "version": number}


@dataclass
class _Secret:
    created_time: str
    updated_time: str
    versions: dict[int, _Version] = field(default_factory=dict)
    current_version: int = 0
    custom_metadata: dict[str, str] | None = None
    cas_required: bool = False
    max_versions: int = 0
    delete_version_after: str = "0s"


@dataclass
class _Token:
    id: str = field(repr=False)
    accessor: str
    policies: list[str]
    ttl_s: int  # creation TTL; 0 means it never expires (the root token)
    renewable: bool
    max_ttl_s: int | None
    path: str
    issued_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    meta: dict[str, str] | None = None
    role_id: str | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def auth_block(self, lease_duration: int) -> dict[str, Any]:
        return {"client_token": self.id, "accessor": self.accessor, "policies": self.policies,
                "token_policies": self.policies, "identity_policies": None, "metadata": self.meta,
                "lease_duration": lease_duration, "renewable": self.renewable, "entity_id": "",
                "token_type": "service", "orphan": True, "mfa_requirement": None, "num_uses": 0}


@dataclass
class _AppRole:
    secret_id: str = field(repr=False)
    token_ttl_s: int = 3600
    renewable: bool = True
    token_max_ttl_s: int | None = None
    policies: list[str] = field(default_factory=lambda: ["default", "root"])


@dataclass
class _Fault:
    status: int
    remaining: int
    path_regex: re.Pattern[str]
    mode: str
    message: str | None = None


class VaultStandIn(EmulatorServer):
    """Vault's HTTP API for KV v2, token/AppRole auth and sys health, in memory."""

    name = "vault"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 root_token: str = DEFAULT_ROOT_TOKEN) -> None:
        super().__init__(host, port)
        self.root_token = root_token
        self._tokens: dict[str, _Token] = {}
        self._approles: dict[str, _AppRole] = {}
        # Policy name -> Vault path globs it grants (a trailing `*` is a prefix match, as in Vault's HCL).
        self._policies: dict[str, list[str]] = {"root": ["*"], "default": sorted(_SELF_ENDPOINTS)}
        self._mounts: set[str] = {DEFAULT_MOUNT}
        self._secrets: dict[tuple[str, str], _Secret] = {}
        self._config: dict[str, dict[str, Any]] = {}
        self._faults: list[_Fault] = []
        self._sealed = False
        self._reads: Counter[str] = Counter()
        self._log: list[dict[str, Any]] = []
        self._seed: dict[str, Any] = {}
        self._set_root(root_token)
        self._kv_routes = self._kv_table()
        self._add_routes()

    # --- Python control API ----------------------------------------------------------------------

    def put_secret(self, path: str, data: dict[str, str], mount: str = DEFAULT_MOUNT) -> int:
        """Write a new version (no CAS) and return its number."""
        with self._lock:
            self._mounts.add(mount)
            return self._write_version(mount, _clean_path(path), dict(data))

    def delete_secret(self, path: str, mount: str = DEFAULT_MOUNT) -> None:
        """Soft-delete the latest version, as `DELETE /v1/<mount>/data/<path>` does."""
        with self._lock:
            self._soft_delete_latest(mount, _clean_path(path))

    def seal(self, sealed: bool = True) -> None:
        with self._lock:
            self._sealed = sealed

    def create_token(self, ttl_s: int, renewable: bool = True, max_ttl_s: int | None = None,
                     policies: list[str] | None = None) -> str:
        """A service token; like a child of the root token it has the `root` policy unless told otherwise."""
        with self._lock:
            token = self._issue_token(ttl_s=ttl_s, renewable=renewable, max_ttl_s=max_ttl_s,
                                      policies=policies or ["root"], path="auth/token/create")
            return token.id

    def add_approle(self, role_id: str, secret_id: str, token_ttl_s: int = 3600, renewable: bool = True,
                    token_max_ttl_s: int | None = None, policies: list[str] | None = None) -> None:
        """Register a role; its login tokens get `policies` (default: unrestricted) plus `default`."""
        with self._lock:
            role = _AppRole(secret_id, token_ttl_s, renewable, token_max_ttl_s)
            if policies is not None:
                role.policies = ["default", *policies]
            self._approles[role_id] = role

    def add_policy(self, name: str, paths: list[str]) -> None:
        """A named policy granting the given Vault paths (`secret/data/keybuzz/*` style globs)."""
        with self._lock:
            self._policies[name] = list(paths)

    def add_fault(self, status: int, times: int = 1, path_regex: str = ".*", mode: str = "http",
                  message: str | None = None) -> None:
        """Answer the next `times` matching /v1 requests with `status` (mode "http") or close the connection
        without an answer (mode "drop"). `path_regex` is searched in the request path, e.g. "/data/"."""
        if mode not in ("http", "drop"):
            raise ValueError(f"fault mode must be 'http' or 'drop', not {mode!r}")
        if times < 1:
            raise ValueError("fault times must be at least 1")
        if mode == "http" and not 400 <= status <= 599:
            raise ValueError(f"fault status must be 4xx or 5xx, not {status}")
        with self._lock:
            self._faults.append(_Fault(status, times, re.compile(path_regex), mode, message))

    def expire_token(self, token: str) -> None:
        """Make a token expire now (it then gets Vault's 403 `invalid token`)."""
        with self._lock:
            if token in self._tokens:
                self._tokens[token].expires_at = time.time()

    def tokens(self, role_id: str | None = None) -> list[str]:
        """Live non-root tokens, those issued by AppRole `role_id` when given (for tests that revoke them)."""
        with self._lock:
            now = time.time()
            return [t.id for t in self._tokens.values() if t.id != self.root_token and not t.expired(now)
                    and (role_id is None or t.role_id == role_id)]

    def read_count(self, path: str | None = None) -> int:
        """KV v2 data reads answered 200, for one path relative to its mount or for all paths."""
        with self._lock:
            return self._reads[_clean_path(path)] if path is not None else sum(self._reads.values())

    def requests(self) -> list[dict[str, Any]]:
        """Every Vault API request served: method, path, status (None when dropped). Never a token."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def reset(self) -> None:
        """Forget secrets, tokens (except root), faults, seal and counters, then re-apply the seed, if any.

        AppRoles and policies stay: like the root token they are configuration a running worker holds.
        """
        with self._lock:
            self._secrets.clear()
            self._config.clear()
            self._mounts = {DEFAULT_MOUNT}
            self._tokens.clear()
            self._set_root(self.root_token)  # fresh, also if a test expired it
            self._faults.clear()
            self._sealed = False
            self._reads.clear()
            self._log.clear()
            self._apply(self._seed)

    def seed(self, data: dict[str, Any]) -> None:
        """Apply `{"root_token", "secrets": {path: {...}}, "approles": [{...}], "policies": {name: [paths]}}`
        (secret paths relative to the `secret` mount); `reset()` re-applies it."""
        with self._lock:
            self._seed = json.loads(json.dumps(data))  # a private copy
            self._apply(self._seed)

    def _apply(self, data: dict[str, Any]) -> None:
        if "root_token" in data:
            self._set_root(str(data["root_token"]))
        for name, paths in (data.get("policies") or {}).items():
            self.add_policy(name, paths)
        for path, values in (data.get("secrets") or {}).items():
            self.put_secret(path, values)
        for role in data.get("approles") or []:
            self.add_approle(**role)

    # --- HTTP: the shared pre-processing of every /v1 request ------------------------------------

    def handle(self, request: Request) -> Response:
        with self._lock:
            if not request.path.startswith("/v1/"):
                return self.router.dispatch(request)
            response = self._serve_vault(request)
            self._log.append({"method": request.method, "path": request.path,
                              "status": None if response.drop else response.status})
            return response

    def _serve_vault(self, request: Request) -> Response:
        vault_path = _clean_path(request.path.removeprefix("/v1/"))
        fault = self._take_fault(request.path, vault_path)
        if fault is not None:
            return fault
        if self._sealed and not _SERVED_WHEN_SEALED.match(vault_path):
            return _errors(503, SEALED_ERROR)
        if not _UNAUTHENTICATED.match(vault_path):
            denied = self._authorize(request, vault_path)
            if denied is not None:
                return denied
        if request.method == "GET" and request.query.get("list", [""])[0].lower() == "true":
            request.method = "LIST"  # Vault treats `GET ?list=true` as LIST
        try:
            return self.router.dispatch(request)
        except _BadRequest as exc:
            return _errors(400, str(exc))

    def _take_fault(self, path: str, vault_path: str) -> Response | None:
        for fault in self._faults:
            if fault.path_regex.search(path):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                if fault.mode == "drop":
                    return Response.dropped()
                message = fault.message or _FAULT_ERRORS.get(fault.status, f"injected fault {fault.status}")
                return _errors(fault.status, message.format(path=vault_path))
        return None

    def _authorize(self, request: Request, vault_path: str) -> Response | None:
        presented = _presented_token(request)
        if not presented:
            return _errors(403, MISSING_TOKEN_ERROR)
        token = self._tokens.get(presented)
        if token is None or token.expired(time.time()):
            return _errors(403, INVALID_TOKEN_ERROR)
        if vault_path in _SELF_ENDPOINTS or self._policy_allows(token.policies, vault_path):
            return None
        return _errors(403, POLICY_DENIED_ERROR)

    def _policy_allows(self, policies: list[str], vault_path: str) -> bool:
        for name in policies:
            for glob in self._policies.get(name, []):
                if vault_path == glob or (glob.endswith("*") and vault_path.startswith(glob[:-1])):
                    return True
        return False

    # --- routes ----------------------------------------------------------------------------------

    def _add_routes(self) -> None:
        add = self.router.add
        add("*", "/v1/sys/health", self._health)
        add("GET", "/v1/sys/seal-status", self._seal_status)
        add("GET", "/v1/auth/token/lookup-self", self._lookup_self)
        for method in ("POST", "PUT"):
            add(method, "/v1/auth/token/renew-self", self._renew_self)
            add(method, "/v1/auth/{mount}/login", self._approle_login)
        add("*", "/v1/{mount}/config", self._kv_config)
        add("*", "/v1/{mount}/{op:data|metadata|delete|undelete|destroy}{path:(?:/.*)?}", self._kv)
        add("*", "/v1/{route:.*}", self._no_handler)

        add("POST", "/_emulator/seal", control_endpoint(lambda r: self.seal(bool(_body(r).get("sealed", True)))))
        add("POST", "/_emulator/faults", control_endpoint(lambda r: self.add_fault(**_fault_args(_body(r)))))
        add("POST", "/_emulator/reset", control_endpoint(lambda r: self.reset()))
        add("GET", "/_emulator/requests", lambda r: _json(200, {"requests": self.requests(),
                                                                "read_counts": dict(self._reads)}))
        for method in ("PUT", "POST"):
            add(method, "/_emulator/secrets/{path:.+}", self._control_put_secret)

    def _no_handler(self, request: Request) -> Response:
        return _errors(404, f'no handler for route "{request.params["route"]}". route entry not found.')

    # --- sys -------------------------------------------------------------------------------------

    def _health(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _errors(405, "unsupported operation")
        codes = {name: int(values[0]) for name, values in request.query.items()
                 if name in ("sealedcode", "activecode") and values and values[0].isdigit()}
        status = codes.get("sealedcode", 503) if self._sealed else codes.get("activecode", 200)
        return _json(status, {"initialized": True, "sealed": self._sealed, "standby": False,
                              "performance_standby": False, "replication_performance_mode": "disabled",
                              "replication_dr_mode": "disabled", "server_time_utc": int(time.time()),
                              "version": "1.17.0-standin", "cluster_name": "vault-standin",
                              "cluster_id": "00000000-0000-0000-0000-000000000000"})

    def _seal_status(self, request: Request) -> Response:
        return _json(200, {"type": "shamir", "initialized": True, "sealed": self._sealed, "t": 1, "n": 1,
                           "progress": 0, "nonce": "", "version": "1.17.0-standin", "build_date": "",
                           "migration": False, "cluster_name": "vault-standin", "recovery_seal": False,
                           "storage_type": "inmem"})

    # --- auth ------------------------------------------------------------------------------------

    def _set_root(self, token: str) -> None:
        self._tokens.pop(self.root_token, None)
        self.root_token = token
        self._tokens[token] = _Token(token, "root-accessor", ["root"], 0, False, None, "auth/token/root")

    def _issue_token(self, *, ttl_s: int, renewable: bool, max_ttl_s: int | None, policies: list[str],
                     path: str, role_id: str | None = None) -> _Token:
        now = time.time()
        token = _Token(id=f"hvs.{secrets.token_urlsafe(24)}", accessor=secrets.token_hex(12),
                       policies=policies, ttl_s=ttl_s, renewable=renewable, max_ttl_s=max_ttl_s, path=path,
                       issued_at=now, expires_at=now + ttl_s if ttl_s > 0 else None, role_id=role_id,
                       meta={"role_name": role_id} if role_id else None)
        self._tokens[token.id] = token
        return token

    def _token_of(self, request: Request) -> _Token:
        return self._tokens[_presented_token(request)]  # _authorize has let only live tokens through

    def _lookup_self(self, request: Request) -> Response:
        token = self._token_of(request)
        remaining = 0 if token.expires_at is None else max(0, int(token.expires_at - time.time()))
        return _json(200, _envelope({
            "accessor": token.accessor, "creation_time": int(token.issued_at), "creation_ttl": token.ttl_s,
            "display_name": "root" if token.id == self.root_token else "token", "entity_id": "",
            "expire_time": None if token.expires_at is None else _rfc3339(token.expires_at),
            "explicit_max_ttl": token.max_ttl_s or 0, "id": token.id, "identity_policies": None,
            "issue_time": _rfc3339(token.issued_at), "meta": token.meta, "num_uses": 0, "orphan": True,
            "path": token.path, "policies": token.policies, "renewable": token.renewable, "ttl": remaining,
            "type": "service"}, mount_type="token"))

    def _renew_self(self, request: Request) -> Response:
        token = self._token_of(request)
        if not token.renewable or token.expires_at is None:
            return _errors(400, "lease is not renewable")
        body = _body(request)
        try:
            ttl = _parse_duration(body["increment"]) if body.get("increment") else token.ttl_s
        except ValueError as exc:
            return _errors(400, str(exc))
        now = time.time()
        warnings = None
        if token.max_ttl_s is not None:
            left = int(token.issued_at + token.max_ttl_s - now)
            if ttl > left:
                warnings = [f'TTL of "{ttl}s" exceeded the effective max_ttl of "{left}s"; '
                            "TTL value is capped accordingly"]
                ttl = max(left, 0)
        token.expires_at = now + ttl
        return _json(200, _envelope(None, auth=token.auth_block(ttl), warnings=warnings, mount_type="token"))

    def _approle_login(self, request: Request) -> Response:
        if request.params["mount"] != "approle":
            return _errors(404, f'no handler for route "auth/{request.params["mount"]}/login". '
                                "route entry not found.")
        body = _body(request)
        role_id = body.get("role_id")
        if not role_id:
            return _errors(400, "missing role_id")
        role = self._approles.get(role_id)
        if role is None or not secrets.compare_digest(str(body.get("secret_id") or ""), role.secret_id):
            return _errors(400, "invalid role or secret ID")
        token = self._issue_token(ttl_s=role.token_ttl_s, renewable=role.renewable,
                                  max_ttl_s=role.token_max_ttl_s, policies=list(role.policies),
                                  path="auth/approle/login", role_id=role_id)
        return _json(200, _envelope(None, auth=token.auth_block(role.token_ttl_s), mount_type="approle"))

    # --- KV v2 -----------------------------------------------------------------------------------

    def _kv(self, request: Request) -> Response:
        mount, op = request.params["mount"], request.params["op"]
        if mount not in self._mounts:
            return _no_route(f"{mount}/{op}/{_clean_path(request.params['path'])}")
        handler = self._kv_routes.get((op, request.method))
        if handler is None:
            return _errors(405, "1 error occurred:\n\t* unsupported operation\n\n")
        return handler(request, mount, _clean_path(request.params["path"]))

    def _kv_table(self) -> dict[tuple[str, str], Callable[[Request, str, str], Response]]:
        return {
            ("data", "GET"): self._read, ("data", "POST"): self._write, ("data", "PUT"): self._write,
            ("data", "PATCH"): self._patch, ("data", "DELETE"): self._delete_latest,
            ("delete", "POST"): self._delete_versions, ("delete", "PUT"): self._delete_versions,
            ("undelete", "POST"): self._undelete_versions, ("undelete", "PUT"): self._undelete_versions,
            ("destroy", "POST"): self._destroy_versions, ("destroy", "PUT"): self._destroy_versions,
            ("metadata", "GET"): self._read_metadata, ("metadata", "LIST"): self._list,
            ("metadata", "POST"): self._write_metadata, ("metadata", "PUT"): self._write_metadata,
            ("metadata", "DELETE"): self._delete_metadata,
        }

    def _read(self, request: Request, mount: str, path: str) -> Response:
        secret = self._secrets.get((mount, path))
        try:
            wanted = int(request.query.get("version", ["0"])[0] or 0)
        except ValueError:
            return _errors(400, "error parsing version")
        number = wanted or (secret.current_version if secret else 0)
        version = secret.versions.get(number) if secret else None
        if secret is None or version is None:
            return _errors(404)  # {"errors": []}: hvac raises InvalidPath("None, on get ...")
        meta = version.metadata(number, secret.custom_metadata)
        if not version.readable:
            # Deleted or destroyed: the whole envelope with data null, and no `errors` key.
            return _json(404, _envelope({"data": None, "metadata": meta}))
        self._reads[path] += 1
        return _json(200, _envelope({"data": dict(version.data or {}), "metadata": meta}))

    def _write(self, request: Request, mount: str, path: str) -> Response:
        body = _body(request)
        if not isinstance(body.get("data"), dict):
            return _errors(400, "no data provided")
        refused = self._check_cas(mount, path, (body.get("options") or {}).get("cas"))
        if refused is not None:
            return refused
        number = self._write_version(mount, path, body["data"])
        secret = self._secrets[(mount, path)]
        return _json(200, _envelope(secret.versions[number].metadata(number, secret.custom_metadata)))

    def _patch(self, request: Request, mount: str, path: str) -> Response:
        secret = self._secrets.get((mount, path))
        current = secret.versions.get(secret.current_version) if secret else None
        if secret is None or current is None or not current.readable:
            return _errors(404)
        body = _body(request)
        if not isinstance(body.get("data"), dict):
            return _errors(400, "no data provided")
        refused = self._check_cas(mount, path, (body.get("options") or {}).get("cas"))
        if refused is not None:
            return refused
        merged = {k: v for k, v in {**(current.data or {}), **body["data"]}.items() if v is not None}
        number = self._write_version(mount, path, merged)
        return _json(200, _envelope(secret.versions[number].metadata(number, secret.custom_metadata)))

    def _check_cas(self, mount: str, path: str, cas: Any) -> Response | None:
        secret = self._secrets.get((mount, path))
        mount_requires = bool(self._config.get(mount, {}).get("cas_required"))
        required = mount_requires or (secret is not None and secret.cas_required)
        if cas is None:
            return _errors(400, "check-and-set parameter required for this call") if required else None
        if int(cas) != (secret.current_version if secret else 0):
            return _errors(400, "check-and-set parameter did not match the current version")
        return None

    def _write_version(self, mount: str, path: str, data: dict[str, Any]) -> int:
        now = _rfc3339(time.time())
        secret = self._secrets.setdefault((mount, path), _Secret(created_time=now, updated_time=now))
        secret.current_version += 1
        secret.updated_time = now
        secret.versions[secret.current_version] = _Version(data=dict(data), created_time=now)
        return secret.current_version

    def _soft_delete_latest(self, mount: str, path: str) -> None:
        secret = self._secrets.get((mount, path))
        if secret and secret.current_version in secret.versions:
            self._set_deleted(secret, [secret.current_version], deleted=True)

    def _delete_latest(self, request: Request, mount: str, path: str) -> Response:
        self._soft_delete_latest(mount, path)
        return Response.empty(204)  # also for a missing secret: Vault does not reveal existence

    def _versions_of(self, request: Request, missing_message: str) -> list[int] | Response:
        body = _body(request)
        versions = body.get("versions")
        if not versions:
            return _errors(400, missing_message)
        return [int(v) for v in versions]

    def _delete_versions(self, request: Request, mount: str, path: str) -> Response:
        return self._change_versions(request, mount, path, "No version number provided",
                                     partial(self._set_deleted, deleted=True))

    def _undelete_versions(self, request: Request, mount: str, path: str) -> Response:
        return self._change_versions(request, mount, path, "No version number provided",
                                     partial(self._set_deleted, deleted=False))

    def _destroy_versions(self, request: Request, mount: str, path: str) -> Response:
        return self._change_versions(request, mount, path, "no version number provided", self._destroy)

    def _change_versions(self, request: Request, mount: str, path: str, missing_message: str,
                         change: Callable[[_Secret, list[int]], None]) -> Response:
        versions = self._versions_of(request, missing_message)
        if isinstance(versions, Response):
            return versions
        secret = self._secrets.get((mount, path))
        if secret is not None:
            change(secret, versions)
        return Response.empty(204)

    @staticmethod
    def _set_deleted(secret: _Secret, versions: list[int], *, deleted: bool) -> None:
        stamp = _rfc3339(time.time()) if deleted else ""
        for number in versions:
            version = secret.versions.get(number)
            if version is not None and not version.destroyed:
                version.deletion_time = stamp

    @staticmethod
    def _destroy(secret: _Secret, versions: list[int]) -> None:
        for number in versions:
            version = secret.versions.get(number)
            if version is not None:
                version.destroyed, version.data = True, None

    def _read_metadata(self, request: Request, mount: str, path: str) -> Response:
        secret = self._secrets.get((mount, path))
        if secret is None:
            return _errors(404)
        return _json(200, _envelope({
            "cas_required": secret.cas_required, "created_time": secret.created_time,
            "current_version": secret.current_version, "delete_version_after": secret.delete_version_after,
            "max_versions": secret.max_versions, "oldest_version": min(secret.versions, default=0),
            "updated_time": secret.updated_time, "custom_metadata": secret.custom_metadata,
            "versions": {str(n): {"created_time": v.created_time, "deletion_time": v.deletion_time,
                                  "destroyed": v.destroyed} for n, v in secret.versions.items()}}))

    def _list(self, request: Request, mount: str, path: str) -> Response:
        prefix = f"{path}/" if path else ""
        keys = sorted({rest.split("/", 1)[0] + ("/" if "/" in rest else "")
                       for (m, p) in self._secrets if m == mount and p.startswith(prefix)
                       for rest in [p.removeprefix(prefix)]})
        if not keys:
            return _errors(404)
        return _json(200, _envelope({"keys": keys}))

    def _write_metadata(self, request: Request, mount: str, path: str) -> Response:
        body = _body(request)
        now = _rfc3339(time.time())
        secret = self._secrets.setdefault((mount, path), _Secret(created_time=now, updated_time=now))
        if "custom_metadata" in body:
            secret.custom_metadata = body["custom_metadata"]
        if "cas_required" in body:
            secret.cas_required = bool(body["cas_required"])
        if "max_versions" in body:
            secret.max_versions = int(body["max_versions"])
        if "delete_version_after" in body:
            secret.delete_version_after = str(body["delete_version_after"])
        secret.updated_time = now
        return Response.empty(204)

    def _delete_metadata(self, request: Request, mount: str, path: str) -> Response:
        self._secrets.pop((mount, path), None)
        return Response.empty(204)

    def _kv_config(self, request: Request) -> Response:
        mount = request.params["mount"]
        if mount not in self._mounts:
            return _no_route(f"{mount}/config")
        config = self._config.setdefault(mount, {"cas_required": False, "delete_version_after": "0s",
                                                 "max_versions": 0})
        if request.method == "GET":
            return _json(200, _envelope(dict(config)))
        if request.method in ("POST", "PUT"):
            body = _body(request)
            config.update({k: v for k, v in body.items() if k in config})
            return Response.empty(204)
        return _errors(405, "1 error occurred:\n\t* unsupported operation\n\n")

    # --- control API over HTTP -------------------------------------------------------------------

    def _control_put_secret(self, request: Request) -> Response:
        try:
            body = _body(request)
        except _BadRequest as exc:
            return _errors(400, f"bad control request: {exc}")
        data = body.get("data")
        if not isinstance(data, dict):
            return _errors(400, 'bad control request: "data" must be an object of key/values')
        version = self.put_secret(request.params["path"], data, mount=str(body.get("mount") or DEFAULT_MOUNT))
        return _json(200, {"version": version})


def _presented_token(request: Request) -> str:
    """The token of `X-Vault-Token`, else of `Authorization: Bearer`; "" when there is none."""
    value = request.headers.get("x-vault-token", "")
    if not value:
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        value = bearer.strip() if scheme.lower() == "bearer" else ""
    return value


def _fault_args(body: dict[str, Any]) -> dict[str, Any]:
    if "status" not in body:
        raise ValueError('a fault needs at least {"status": <code>}')
    allowed = {"status", "times", "path_regex", "mode", "message"}
    return {k: v for k, v in body.items() if k in allowed}


class _BadRequest(ValueError):
    """A request body Vault would refuse with 400."""


def _body(request: Request) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        body = json.loads(request.body)
    except ValueError as exc:
        raise _BadRequest(f"failed to parse JSON input: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("failed to parse JSON input: not an object")
    return body


def _no_route(route: str) -> Response:
    return _errors(404, f'no handler for route "{route}". route entry not found.')


def main() -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seed", type=Path, help="JSON file: root_token, secrets, approles, policies "
                                                      "(at the top level or under a `vault` key)")
        parser.add_argument("--root-token", default=DEFAULT_ROOT_TOKEN)

    def factory(args: argparse.Namespace) -> VaultStandIn:
        server = VaultStandIn(args.host, args.port, root_token=args.root_token)
        if args.seed:
            data = json.loads(args.seed.read_text())
            server.seed(data.get("vault", data))  # the dev stack's seed file has one section per stand-in
        return server

    run_cli("Vault KV v2 stand-in", factory, configure, default_port=8200)


if __name__ == "__main__":
    main()
