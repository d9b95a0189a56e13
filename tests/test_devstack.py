"""`make run`'s stack: up (with the demo deliveries), a delivery through the CLI, down leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.launcher import process_alive
from tests.conftest import detached_devstack, devstack_environment, free_ports

ROOT = Path(__file__).resolve().parents[1]


def test_devstack_up_demo_send_down(tmp_path: Path) -> None:
    with detached_devstack(tmp_path) as stack:
        pids = [svc["pid"] for svc in stack.state["services"]]
        assert [svc["name"] for svc in stack.state["services"]] == ["temporal", "vault", "spapi", "smtp", "worker"]
        out = stack.up.stdout
        assert "status     delivered via SPAPI" in out
        assert "note       No orderId - SMTP fallback used" in out
        assert "status     delivered via SMTP\n" in out
        assert "status     failed" in out
        assert "status     awaiting_action" in out
        ui = stack.env["OUTBOUND_DEVSTACK_UI_PORT"]
        assert f"http://127.0.0.1:{ui}/namespaces/default/workflows" in out

        send = subprocess.run(
            [sys.executable, "starter.py", "send", "--tenant", "acme", "--channel", "email",
             "--to", "buyer@example.org", "--subject", "Hello", "--body", "Hi there", "--wait", "--json"],
            cwd=ROOT, env={**stack.env, "OUTBOUND_TEMPORAL_ADDRESS": stack.state["urls"]["temporal"]},
            capture_output=True, text=True, timeout=60)
        assert send.returncode == 0, send.stderr
        trace = json.loads(send.stdout)
        assert (trace["status"], trace["provider_final"]) == ("delivered", "SMTP")
    assert pids and not [pid for pid in pids if process_alive(pid)], "devstack down left processes running"


def test_a_port_in_use_is_reported_by_name_before_anything_starts(tmp_path: Path) -> None:
    temporal, ui, spapi, smtp, smtp_http, codec = free_ports(6)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        vault = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
        env.update({
            "OUTBOUND_DEVSTACK_STATE_DIR": str(tmp_path), "OUTBOUND_DEVSTACK_TEMPORAL_PORT": str(temporal),
            "OUTBOUND_DEVSTACK_UI_PORT": str(ui), "OUTBOUND_DEVSTACK_VAULT_PORT": str(vault),
            "OUTBOUND_DEVSTACK_SPAPI_PORT": str(spapi), "OUTBOUND_DEVSTACK_SMTP_PORT": str(smtp),
            "OUTBOUND_DEVSTACK_SMTP_HTTP_PORT": str(smtp_http), "OUTBOUND_DEVSTACK_CODEC_PORT": str(codec),
        })
        up = subprocess.run([sys.executable, "-m", "devstack", "up", "--detach"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)

    assert up.returncode == 2
    assert f"port already in use: vault http port {vault}" in up.stderr
    assert "Traceback" not in up.stderr
    assert not (tmp_path / "stack.json").exists()


def test_a_stand_in_started_on_a_taken_port_says_so_without_a_traceback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "devstack.smtp", "--smtp-port", str(port), "--http-port", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert "smtp: cannot listen (Address already in use)" in run.stderr
    assert f"smtp_port={port}" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_service_that_dies_at_start_is_explained_by_its_taken_port_or_its_log(tmp_path: Path) -> None:
    from devstack.launcher import Service, StackError, wait_ready

    log = tmp_path / "smtp.log"
    log.write_text("starting\nsmtp: cannot listen (Address already in use)\n")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    dead.wait()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        svc = Service("smtp", [], {"smtp": taken}, taken)
        try:
            wait_ready(svc, dead, log, timeout=5)
        except StackError as err:
            message = str(err)
        else:
            raise AssertionError("a dead service was taken for ready")
    assert f"smtp exited with code 1; see {log}" in message
    assert f"its smtp port {taken} was taken by another process after the check" in message

    svc = Service("smtp", [], {"smtp": free_ports(1)[0]}, 0)
    try:
        wait_ready(svc, dead, log, timeout=5)
    except StackError as err:
        message = str(err)
    assert "| smtp: cannot listen (Address already in use)" in message


def test_foreground_stack_stops_on_ctrl_c_and_a_second_run_keeps_earlier_deliveries(tmp_path: Path) -> None:
    # `make run` in a terminal: Ctrl-C reaches the whole foreground process group.
    env = devstack_environment(tmp_path)
    temporal = f"127.0.0.1:{env['OUTBOUND_DEVSTACK_TEMPORAL_PORT']}"
    starter = {**env, "OUTBOUND_TEMPORAL_ADDRESS": temporal}

    def run_until_ctrl_c(then: Callable[[], None]) -> tuple[str, list[int]]:
        up = subprocess.Popen([sys.executable, "-m", "devstack", "up", "--no-demo"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert up.stdout is not None
        lines: list[str] = []
        try:
            for line in up.stdout:
                lines.append(line)
                if line.startswith("serving; Ctrl-C stops everything"):
                    break
            else:
                raise AssertionError("the stack never said it was serving:\n" + "".join(lines))
            pids = [svc["pid"] for svc in json.loads((tmp_path / "stack.json").read_text())["services"]]
            then()
            os.killpg(up.pid, signal.SIGINT)
            rest, _ = up.communicate(timeout=120)
        finally:
            if up.poll() is None:
                up.kill()
                subprocess.run([sys.executable, "-m", "devstack", "down"], cwd=ROOT, env=env, timeout=120)
        assert up.returncode == 0, "".join(lines) + rest
        return "".join(lines) + rest, pids

    delivery_id = "ctrl-c-survivor-1"

    def send() -> None:
        sent = subprocess.run([sys.executable, "starter.py", "send", "--delivery-id", delivery_id, "--tenant", "acme",
                               "--channel", "email", "--to", "buyer@example.org", "--subject", "Hello",
                               "--body", "Hi there", "--wait"],
                              cwd=ROOT, env=starter, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr

    found: list[str] = []

    def trace_earlier() -> None:
        traced = subprocess.run([sys.executable, "starter.py", "trace", delivery_id, "--json"],
                                cwd=ROOT, env=starter, capture_output=True, text=True, timeout=60)
        assert traced.returncode == 0, traced.stdout + traced.stderr
        found.append(json.loads(traced.stdout)["status"])

    output, pids = run_until_ctrl_c(send)
    assert "stopping the dev stack" in output and "temporal stopped" in output
    assert pids and not [pid for pid in pids if process_alive(pid)], "Ctrl-C left processes running"
    assert not (tmp_path / "stack.json").exists()

    run_until_ctrl_c(trace_earlier)  # the same state dir: Temporal's SQLite file is reused
    assert found == ["delivered"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see a zombie")
def test_a_zombie_is_not_taken_for_a_running_service() -> None:
    # `down` of a detached stack waits for services it did not start; in a container their zombies
    # linger until PID 1 reaps them, and waiting on those cost two seconds a service.
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert process_alive(running.pid)
        deadline = time.monotonic() + 10
        while process_alive(exited.pid):
            assert time.monotonic() < deadline, "an exited, unreaped child is still taken for running"
            time.sleep(0.05)
        assert Path(f"/proc/{exited.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        running.kill()
        running.wait()
        exited.wait()
    assert not process_alive(exited.pid)
