"""The Docker deployment (deploy/docker/).

No Docker engine runs on the CI machine, so the images are not built here. What is
tested instead is everything the images consist of: every COPY source exists and the
Python packages are all copied; the Debian packages exist in Debian 12; the container's
entrypoint serves the image's config and example script on real sockets; the
HEALTHCHECK command passes against it; the compose file wires both containers to the
same socket volume; and the Dovecot sidecar's config is accepted by a real doveconf.
The sidecar's route A file is the one the interop tests run a real Dovecot with.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.authd_process import REPO, accepts
from tests.interop.dovecot import dovecot_build
from tests.interop.procs import free_port
from tests.interop.wire import Wire

DOCKER = REPO / "deploy" / "docker"
ENTRYPOINT = DOCKER / "entrypoint"
DOVECONF = "/usr/bin/doveconf"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    result = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            result.append((words[:-1], words[-1]))
    return result


@pytest.mark.parametrize("name", ["Dockerfile", "dovecot.Dockerfile"])
def test_images_build_from_debian_12_and_copy_existing_files(name: str) -> None:
    steps = instructions(DOCKER / name)
    assert steps[0] == ("FROM", "debian:12-slim")
    for sources, _ in copies(DOCKER / name):
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"


def test_authd_image_copies_every_package_and_runs_unprivileged() -> None:
    dockerfile = DOCKER / "Dockerfile"
    copied = {source for sources, _ in copies(dockerfile) for source in sources}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} <= copied
    assert {"pyproject.toml", "README.md"} <= copied  # pip needs both to build the package
    steps = dict(instructions(dockerfile))
    assert steps["USER"] == "authd"
    assert steps["ENTRYPOINT"] == '["/usr/local/bin/authd-entrypoint"]'
    assert os.access(ENTRYPOINT, os.X_OK)


@pytest.mark.requires("apt-cache", "apt-lists")
@pytest.mark.parametrize("name", ["Dockerfile", "dovecot.Dockerfile"])
def test_debian_packages_exist(name: str) -> None:
    runs = " ".join(rest for keyword, rest in instructions(DOCKER / name) if keyword == "RUN")
    match = re.search(r"apt-get install -y --no-install-recommends ([a-z0-9 .+-]+?) &&", runs)
    assert match, runs
    packages = match.group(1).split()
    shown = subprocess.run(["apt-cache", "show", *packages], capture_output=True, text=True, check=False)
    for package in packages:
        assert f"Package: {package}\n" in shown.stdout, f"{name}: Debian 12 has no package {package}"


def container_config(tmp_path: Path, metrics_port: int) -> Path:
    """The image's authd.toml and script, with /run/authd and /etc/authd mapped into tmp_path."""
    text = (DOCKER / "authd.toml").read_text()
    text = text.replace("/run/authd/", f"{tmp_path}/").replace("/etc/authd/", f"{tmp_path}/")
    text = text.replace("port = 9090", f"port = {metrics_port}")
    shutil.copy(DOCKER / "auth.lua", tmp_path / "auth.lua")
    (tmp_path / "authd.toml").write_text(text)
    return tmp_path / "authd.toml"


def entrypoint_env(config: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent  # where the venv's `authd` script lives, as /opt/authd/bin
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", AUTHD_CONFIG=str(config))


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    port = free_port()
    config = container_config(tmp_path, port)
    with open(tmp_path / "stdout", "wb") as out:
        proc = subprocess.Popen([str(ENTRYPOINT)], env=entrypoint_env(config), stdout=out, stderr=out)
    try:
        for _ in range(400):
            if all(accepts(tmp_path / name) for name in ("auth-client", "auth-userdb")):
                break
            assert proc.poll() is None, (tmp_path / "stdout").read_text()
            subprocess.run(["sleep", "0.05"], check=True)
        yield proc, tmp_path, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entrypoint_serves_the_image_config(container: tuple[subprocess.Popen[bytes], Path, int]) -> None:
    proc, directory, port = container
    resp = base64.b64encode(b"\0bob\0bobpass").decode()
    with Wire.auth_client(directory / "auth-client") as w:
        w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=smtp\trip=192.0.2.5\tresp={resp}")
        assert w.read_line() == "OK\t1\tuser=bob"
    with Wire.auth_master(directory / "auth-userdb") as w:
        w.send("VERSION\t1\t0", "USER\t1\talice\tservice=lmtp")
        assert w.read_line() == "USER\t1\talice\tquota_rule=*:storage=1G"
    assert oct((directory / "auth-master").stat().st_mode & 0o777) == "0o600"

    healthcheck = dict(instructions(DOCKER / "Dockerfile"))["HEALTHCHECK"]
    command = yaml.safe_load(healthcheck.split("CMD", 1)[1])  # the exec form is a JSON (so YAML) list
    command = [sys.executable if command[0] == "python3" else command[0], *command[1:]]
    command[-1] = command[-1].replace(":9090/", f":{port}/")
    assert subprocess.run(command, timeout=10, check=False).returncode == 0

    proc.send_signal(signal.SIGTERM)  # `docker stop`
    assert proc.wait(15) == 0
    assert '"event": "server.stopping"' in (directory / "stdout").read_text()  # JSON logs on stdout


def test_entrypoint_check_tools_and_missing_config(tmp_path: Path) -> None:
    config = container_config(tmp_path, free_port())
    env = entrypoint_env(config)
    checked = subprocess.run([str(ENTRYPOINT), "check"], env=env, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    env["AUTHD_CONFIG"] = str(tmp_path / "missing.toml")
    missing = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, check=False)
    assert missing.returncode == 78
    assert missing.stderr == (
        f"authd-entrypoint: cannot read the config {tmp_path}/missing.toml; mount one or set AUTHD_CONFIG\n"
    )
    shell = subprocess.run([str(ENTRYPOINT), "sh", "-c", "echo $AUTHD_CONFIG"], env=env, capture_output=True)
    assert shell.stdout == f"{tmp_path}/missing.toml\n".encode()


def test_compose_shares_the_socket_volume() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"authd", "dovecot"}
    for service in services.values():
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
        assert "authd-sockets:/run/authd" in service["volumes"]
    assert set(compose["volumes"]) == {"authd-sockets", "mail"}
    assert services["dovecot"]["depends_on"] == {"authd": {"condition": "service_healthy"}}
    mounts = [v.split(":") for v in services["authd"]["volumes"] if v.startswith("./")]
    assert mounts == [["./auth.lua", "/etc/authd/auth.lua", "ro"]] and (DOCKER / "auth.lua").is_file()


@pytest.mark.requires("doveconf")
def test_dovecot_sidecar_config_points_at_the_authd_sockets(tmp_path: Path) -> None:
    """The sidecar ships a 2.3 config: the 2.3.19 reference's doveconf checks it (a chroot's on
    Debian 13, which sees /tmp only, hence the copies)."""
    build = dovecot_build("2.3")
    if build is None:
        pytest.skip("no Dovecot 2.3 reference: run ./scripts/bootstrap as root")
    image = {dest: sources[0] for sources, dest in copies(DOCKER / "dovecot.Dockerfile")}
    includes = []
    for name, dest in (
        ("route-a.conf", "/etc/dovecot/conf.d/99-authd-route-a.conf"),
        ("local.conf", "/etc/dovecot/local.conf"),
    ):
        shutil.copy(REPO / image[dest], tmp_path / name)
        includes.append(f"!include {tmp_path / name}\n")
    main = tmp_path / "dovecot.conf"
    main.write_text("".join(includes))
    tmp_path.chmod(0o755)
    command = build.argv([DOVECONF, "-c", str(main), "-n"])
    shown = subprocess.run(command, capture_output=True, text=True, check=False)
    assert shown.returncode == 0, shown.stderr
    listeners = {x["type"]: x["path"] for x in tomllib.loads((DOCKER / "authd.toml").read_text())["listener"]}
    assert f"auth_socket_path = {listeners['userdb']}" in shown.stdout
    assert f"executable = imap-login {listeners['login']}" in shown.stdout
    assert f"executable = imap -a {listeners['master']}" in shown.stdout
    assert "protocols = imap lmtp" in shown.stdout
