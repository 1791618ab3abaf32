"""The Fleet-only proxy: regions reach ``/v1/fleet/`` only; the Control API stays the operator's.

Flower 1.42 serves its Control API on the SuperLink's one port (``docs/deployment.md``). ``deploy up
--public-address`` puts nginx there (:mod:`fedcrm.deploy.proxy`). The deployment test plays a region's
host as a second loopback address (127.0.0.2; the operator's host is 127.0.0.1) and tries to start a run
through the proxy while a federation run goes through it (about a minute: ``make test-deployment``);
the quick test checks the config nginx gets.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_tiny_config

from fedcrm.deploy.certs import create_certificates
from fedcrm.deploy.proxy import ProxySettings, nginx_config
from fedcrm.deploy.supervisor import free_port
from fedcrm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
REGION_HOST = "127.0.0.2"  # a region's host: any loopback address but the operator's


def fedcrm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedcrm.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}


def post(port: int, path: str, *, ca: Path, source: str) -> int:
    """POST an empty protobuf body over TLS from ``source``; the HTTP status the proxy answers."""
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30, source_address=(source, 0))
    try:
        conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_proxy_config_forwards_fleet_paths_only_and_control_from_operators(tmp_path: Path) -> None:
    certs = create_certificates(out_dir=tmp_path / "certs")
    settings = ProxySettings.parse("0.0.0.0:9443", operators=["10.0.0.5", "127.0.0.1"])
    conf = nginx_config(settings=settings, superlink_port=9092, certs=certs, folder=tmp_path / "proxy")
    assert "listen 0.0.0.0:9443 ssl;" in conf and settings.dial == "127.0.0.1:9443"
    assert ProxySettings.from_dict(settings.to_dict()) == settings  # as federation.json keeps it
    for prefix in ("/v1/control/", "/v1/runtime/"):
        block = conf[conf.index(f"location {prefix}") :].split("}", 1)[0]
        assert "allow 10.0.0.5;" in block and "allow 127.0.0.1;" in block and "deny all;" in block
    assert "location / { return 404; }" in conf
    assert "proxy_ssl_verify on;" in conf and str(certs.server_key.resolve()) in conf
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():  # nginx itself accepts it
        (tmp_path / "proxy" / "tmp").mkdir(parents=True)  # nginx makes the temp folders inside
        (tmp_path / "proxy" / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        checked = subprocess.run(
            [nginx, "-t", "-p", str(tmp_path / "proxy"), "-c", str(tmp_path / "proxy" / "nginx.conf"), "-e", "stderr"],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stderr
    for bad in ("9443", "host:", "host:99999"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            ProxySettings.parse(bad)
    with pytest.raises(ConfigError, match="operator-address"):
        ProxySettings.parse("0.0.0.0:9443", operators=["eu-host"])


@pytest.mark.deployment
@pytest.mark.slow  # about a minute: `make test-deployment` runs it, like the other real deployments
def test_a_region_cannot_start_a_run_through_the_proxy_while_the_federation_runs_through_it(tmp_path: Path) -> None:
    cfg = write_tiny_config(tmp_path, regions={"eu": 400, "us": 300}, overrides={"federation.min_regions": 1})
    folder = tmp_path / "dep"
    port = free_port()
    up = subprocess.run(
        fedcrm_cmd("deploy", "up", "--config", str(cfg), "--workdir", str(folder), "--state", "state")
        + ["--public-address", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        desc = json.loads((folder / "federation.json").read_text())
        assert "proxy" in desc["processes"] and desc["proxy"]["port"] == port
        ca = folder / "certs" / "ca.crt"
        run = subprocess.Popen(
            fedcrm_cmd("run", str(cfg), "--federation", str(folder), "--out", str(tmp_path / "run")),
            cwd=tmp_path,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        refused: dict[str, int] = {}
        try:
            deadline = time.time() + 120
            while not (tmp_path / "run").exists() and run.poll() is None and time.time() < deadline:
                time.sleep(0.5)  # the run is under way
            for path in (
                "/v1/control/start-run",
                "/v1/control/stop-run",
                "/v1/runtime/pull-messages",
                "/v1/fleet/../control/start-run",
                "/v1/fleet/%2e%2e/control/start-run",
                "/v1/fleet/..%2Fcontrol/start-run",
                "/v1/fleet/get-run?x=/../../control/start-run",
                "/health",
            ):
                refused[path] = post(port, path, ca=ca, source=REGION_HOST)
            operator = post(port, "/v1/control/list-runs", ca=ca, source="127.0.0.1")
            output, _ = run.communicate(timeout=900)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert run.returncode == 0, output[-3000:]
        assert "finished:completed" in output
        assert refused["/v1/control/start-run"] == 403, refused
        assert all(code in (400, 403, 404) for code in refused.values()), refused
        assert operator not in (403, 404), operator  # the operator's host still reaches the Control API
        # The SuperNodes' traffic went through the proxy, and only Fleet paths were forwarded to the SuperLink.
        log = (folder / "proxy" / "access.log").read_text()
        assert "POST /v1/fleet/pull-messages" in log and "POST /v1/fleet/push-messages" in log
        region_lines = [line for line in log.splitlines() if line.startswith(REGION_HOST)]
        assert region_lines and all(
            '" 403 ' in line or '" 404 ' in line or '" 400 ' in line for line in region_lines
        ), region_lines
    finally:
        down = subprocess.run(
            fedcrm_cmd("deploy", "down", "--workdir", str(folder)),
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert down.returncode == 0, down.stdout + down.stderr
