"""The regions' door to the SuperLink: an nginx reverse proxy that lets the regions reach the Fleet API only.

Why: Flower 1.42 serves its Control API (start, stop and list runs, register nodes), its Fleet API (what
SuperNodes use) and its Runtime API (what each run's ServerApp uses) as protobuf over HTTP/1.1 (httpx on
the client side, uvicorn on the SuperLink's) on one ``--host``/``--port``, with nothing but TLS in front
of the Control API. Whoever reaches that port can start or stop runs. So on a deployment whose regions
come from other hosts the SuperLink listens on loopback only, and this proxy listens where the regions
connect:

- it terminates TLS with the deployment's own SuperLink certificate (:mod:`fedcrm.deploy.certs`), so the
  SuperNodes' ``--root-certificates`` stay the deployment's ``ca.crt``, and re-encrypts to the SuperLink,
  checking its certificate against the same CA;
- ``/v1/fleet/NAME`` (one path segment of letters, digits and ``-``, no query: all the SuperNode sends)
  is forwarded; the raw request line is checked too, so an encoded ``..`` or ``/`` cannot smuggle another
  path past the location match;
- ``/v1/control/`` and ``/v1/runtime/`` are forwarded only from the operator's addresses (default
  127.0.0.1, the SuperLink's host): from anywhere else nginx answers 403 without contacting the SuperLink;
- every other path is 404.

The regions' own defence never depends on the proxy: a run submitted by anyone still runs at a region only
if its bundle passed that region's trust file. nginx comes from the system's packages (``.ci/run``).
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcrm.deploy.certs import CertificateBundle
from fedcrm.deploy.supervisor import Component, start_component
from fedcrm.errors import ConfigError, FederationError

__all__ = ["PROXY", "FLEET_PATH", "ProxySettings", "nginx_config", "start_proxy"]

PROXY = "proxy"  # the component's name (logs/proxy.log, pids/proxy.pid)
FLEET_PATH = r"^/v1/fleet/[a-z0-9-]+$"  # every Fleet API call of a 1.42 SuperNode, and nothing else
OPERATOR_ONLY = ("/v1/control/", "/v1/runtime/")


@dataclass(frozen=True)
class ProxySettings:
    """Where the regions connect (``host``:``port``) and which addresses may use the Control/Runtime APIs."""

    host: str
    port: int
    operators: tuple[str, ...] = ("127.0.0.1",)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dial(self) -> str:
        """The address a SuperNode on this host dials (a wildcard listener is reached on loopback)."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '*') else self.host}:{self.port}"

    @classmethod
    def parse(cls, address: str, *, operators: Sequence[str] = ("127.0.0.1",)) -> ProxySettings:
        """``HOST:PORT`` (``--public-address``) and the operators' IP addresses or CIDR blocks."""
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--public-address: expected HOST:PORT (e.g. 0.0.0.0:9092), got {address!r}")
        for op in operators:
            try:
                ipaddress.ip_network(op, strict=False)
            except ValueError:
                raise ConfigError(f"--operator-address: expected an IP address or CIDR block, got {op!r}") from None
        if not operators:
            raise ConfigError("--operator-address: name at least one address (default 127.0.0.1)")
        return cls(host=host, port=int(port), operators=tuple(operators))

    def to_dict(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "operators": list(self.operators)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ProxySettings:
        ops = d["operators"]
        assert isinstance(ops, list)
        return cls(host=str(d["host"]), port=int(str(d["port"])), operators=tuple(str(o) for o in ops))


def upstream_name(certs: CertificateBundle) -> str:
    """A DNS name of the SuperLink's certificate: nginx checks the upstream's certificate by name, not IP SAN."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(certs.server_cert).read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        names = []
    if not names:
        raise ConfigError(
            f"{certs.server_cert}: the SuperLink's certificate names no DNS host; the proxy verifies the SuperLink "
            "by name: make it with `fedcrm certs --host localhost ...`"
        )
    return str(names[0])


def nginx_config(*, settings: ProxySettings, superlink_port: int, certs: CertificateBundle, folder: Path) -> str:
    """The whole ``nginx.conf`` for one deployment; every path nginx writes lies under ``folder``."""
    f = Path(folder).resolve()
    upstream = f"https://127.0.0.1:{superlink_port}"
    # Started as root, nginx keeps the keys in the master and runs its workers (the code that parses what
    # the network sends) as an unprivileged user; :func:`start_proxy` gives that user the temp folders.
    worker = worker_user()
    user = f"user {worker.pw_name} {grp.getgrgid(worker.pw_gid).gr_name};\n" if worker is not None else ""
    allow = "".join(f"        allow {op};\n" for op in settings.operators)
    operator_locations = "".join(
        f"    location {prefix} {{\n{allow}        deny all;\n        proxy_pass {upstream};\n    }}\n"
        for prefix in OPERATOR_ONLY
    )
    temp = "".join(
        f"    {kind}_temp_path {f}/tmp/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# Written by `fedcrm deploy up` (fedcrm/deploy/proxy.py); rewritten at every start.
{user}worker_processes 1;
pid {f}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log {f}/access.log;
{temp}    client_max_body_size 0;            # model weights: the regions' own policy bounds their size
    proxy_http_version 1.1;
    proxy_request_buffering off;
    proxy_buffering off;               # streamed protobuf replies pass as they come
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
    proxy_ssl_trusted_certificate {Path(certs.ca_cert).resolve()};
    proxy_ssl_verify on;
    proxy_ssl_name {upstream_name(certs)};
    server {{
    listen {settings.address} ssl;
    ssl_certificate {Path(certs.server_cert).resolve()};
    ssl_certificate_key {Path(certs.server_key).resolve()};
    ssl_protocols TLSv1.2 TLSv1.3;
    location /v1/fleet/ {{
        if ($request_uri !~ "{FLEET_PATH}") {{ return 404; }}
        proxy_pass {upstream};
    }}
{operator_locations}    location / {{ return 404; }}
    }}
}}
"""


def worker_user() -> pwd.struct_passwd | None:
    """The user nginx's workers run as when it is started as root (``nobody``); None when it is not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise ConfigError(
            "nginx started as root needs an unprivileged user for its workers: no `nobody` here"
        ) from None


def nginx_executable() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        raise ConfigError(
            "`nginx` not found (PATH, /usr/sbin): install it from the system's packages (apt install nginx)"
        )
    return found


def start_proxy(
    *,
    settings: ProxySettings,
    superlink_port: int,
    certs: CertificateBundle,
    folder: Path,
    logs: Path,
    env: dict[str, str],
    ready_timeout: float = 30.0,
) -> Component:
    """Write ``folder/nginx.conf``, check it (``nginx -t``), start nginx in the foreground, wait until it listens."""
    import subprocess

    folder = Path(folder).resolve()
    worker = worker_user()
    for sub in ("tmp", "tmp/client_body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        if worker is not None:
            os.chown(folder / sub, worker.pw_uid, worker.pw_gid)
    conf = folder / "nginx.conf"
    conf.write_text(nginx_config(settings=settings, superlink_port=superlink_port, certs=certs, folder=folder))
    argv = [nginx_executable(), "-p", str(folder), "-c", str(conf), "-e", "stderr"]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if checked.returncode != 0:
        raise FederationError(f"{conf}: nginx refused the proxy's configuration: {checked.stderr[-1500:]}")
    # In the foreground, so the supervisor owns it like any other component (stop = SIGTERM, fast shutdown).
    comp = start_component(PROXY, [*argv, "-g", "daemon off;"], env=env, cwd=folder, log_path=logs / f"{PROXY}.log")
    probe, _, _ = settings.dial.rpartition(":")
    deadline = time.time() + ready_timeout
    while True:
        if not comp.alive():
            raise FederationError(f"the proxy (nginx) exited at start:\n{comp.log_tail()}")
        try:
            with socket.create_connection((probe.strip("[]"), settings.port), timeout=1.0):
                break
        except OSError:
            if time.time() > deadline:
                comp.stop(grace_s=3)
                raise FederationError(
                    f"the proxy (nginx) did not listen on {settings.address} within {ready_timeout:.0f} s"
                ) from None
            time.sleep(0.2)
    comp.refresh_groups()
    return comp
