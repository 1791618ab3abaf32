"""The region's gate on a real deployment: a TLS SuperLink with SuperNode authentication and one
SuperNode (``--isolation process``) whose ClientApps are started by the region's ``fedcrm region exec``.

Four bundles are submitted with ``flwr run`` in turn. Each bundle's ClientApp writes a marker file the
moment its code is imported, so a refusal "before its code runs" is visible as a missing marker:

- unapproved: neither on the region's allowlist nor signed;
- tampered: signed by the region's trusted signer, then one file changed, submitted with the signature;
- carrying its own ``fedcrm/``: on the region's allowlist, but it would shadow the region's safeguards;
- approved: signed and unchanged: it runs (the positive control that markers do appear).

Marked `deployment` and `slow` like the other real deployments (tests/deploy/test_deployment_e2e.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from probe_app import read_result, write_probe_app
from test_deployment_e2e import flower_processes_of

from fedcrm.deploy.approval import SIGNATURE_KEY, bundle_digest, sign_bundle
from fedcrm.deploy.bundle import build_bundle
from fedcrm.deploy.certs import create_bundle_signing_key, create_certificates, create_node_key
from fedcrm.deploy.local import COMPLETED, LocalDeployment

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

RUN_TIMEOUT_S = 600


def test_region_runs_only_approved_bundles_and_refuses_others_before_their_code_runs(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    apps = tmp_path / "apps"
    key, pub = create_bundle_signing_key(out_dir=tmp_path / "reviewer", name="compliance")

    approved = write_probe_app(apps / "approved", marker=markers / "approved", name="approved")
    unapproved = write_probe_app(apps / "unapproved", marker=markers / "unapproved", name="unapproved")
    tampered = write_probe_app(apps / "tampered", marker=markers / "tampered", name="tampered")
    tampered_signature = sign_bundle(digest=bundle_digest(build_bundle(tampered)), private_key=key)
    with (tampered / "server" / "server_app.py").open("a") as f:  # one changed file after the review
        f.write("# changed after review\n")
    shadowing = write_probe_app(apps / "shadowing", marker=markers / "shadowing", name="shadowing", ship_fedcrm=True)

    trust = tmp_path / "eu-trust.yaml"
    trust.write_text(yaml.safe_dump({
        "approved_bundles": [bundle_digest(build_bundle(shadowing))],  # approved, yet it ships fedcrm/
        "trusted_signers": {"compliance": str(pub)},
    }))  # fmt: skip
    signature = {
        "approved": sign_bundle(digest=bundle_digest(build_bundle(approved)), private_key=key),
        "unapproved": "",
        "tampered": tampered_signature,
        "shadowing": "",
    }
    app_dirs = {"unapproved": unapproved, "tampered": tampered, "shadowing": shadowing, "approved": approved}

    workdir = tmp_path / "work"
    node_private, node_public = create_node_key(out_dir=workdir / "regions" / "eu", region="eu")  # the data owner's
    certs = create_certificates(out_dir=workdir / "certs", node_public_keys={"eu": node_public})
    results: dict[str, dict[str, object]] = {}
    with LocalDeployment(workdir=workdir, certs=certs, report=lambda s: None) as dep:
        dep.start_superlink()
        node_id = dep.register(certs.supernode_public_keys["eu"])
        dep.start_supernode("eu", private_key=node_private, trust=trust)
        dep.wait_nodes([node_id], status="online")
        for case, app_dir in app_dirs.items():
            out = tmp_path / f"result-{case}.json"
            run_id = dep.submit(app_dir=app_dir, run_config={"result": str(out), SIGNATURE_KEY: signature[case]})
            status = dep.wait_run(run_id, timeout=RUN_TIMEOUT_S, poll_s=3)
            assert status["status"] == COMPLETED, (case, status, dep.superlink.log_tail() if dep.superlink else "")
            results[case] = read_result(out)
        exec_log = dep.executors["eu"].log_path.read_text(errors="replace")
    assert flower_processes_of(workdir) == []

    def reason(case: str) -> str:
        replies = results[case]["replies"]
        assert isinstance(replies, list) and len(replies) == 1, results[case]
        return str(replies[0].get("error", ""))

    # Each refused bundle got an error reply naming the fixed reason, and none of its code ran.
    assert reason("unapproved") == "region refused the app bundle: bundle not approved by the region's data owner"
    assert reason("tampered") == "region refused the app bundle: bundle not approved by the region's data owner"
    assert reason("shadowing") == "region refused the app bundle: bundle carries packages the region installs itself"
    for case in ("unapproved", "tampered", "shadowing"):
        assert not (markers / case).exists(), f"the {case} bundle's ClientApp code ran"
    assert not (markers / "shadowing.fedcrm").exists(), "the bundled fedcrm ran"
    # The details stay in the region's own log.
    assert bundle_digest(build_bundle(unapproved)) in exec_log
    assert "['fedcrm']" in exec_log

    # The approved bundle ran: its ClientApp answered and its marker is there.
    assert results["approved"]["replies"] == [{"ok": 1}]
    assert (markers / "approved").exists()
    # Refused bundles were never even unpacked on the region's host: only the approved one is installed.
    installed = sorted(p.name for p in (workdir / "supernodes" / "eu" / "apps").iterdir())
    assert len(installed) == 1 and installed[0].startswith("fedcrmtest.approved."), installed
