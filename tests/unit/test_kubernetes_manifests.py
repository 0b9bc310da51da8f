"""deploy/kubernetes renders, is valid Kubernetes, passes checkov, and deploys safely.

Offline, from a clean clone: kustomize renders the base and the example overlay
(tests/kubernetes.py); every object is checked against the JSON schemas of the named
Kubernetes versions (PyPI ``kubernetes-validate``, strict: an unknown field is an error,
so a typo cannot silently do nothing); checkov scans both renderings and may only skip a
check whose waiver carries a reason and is listed in docs/RUNBOOK.md. The rest checks
what an operator would notice: pods that drain every stream, probes that never restart a
replica for Postgres's sake, secrets only as files, a spool that outlives a container.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest

from tests.conftest import REPO_ROOT
from tests.kubernetes import TARGETS, Obj, Rendered, container, environment, mount_of, render_text, rendered

# The oldest Kubernetes these manifests support (native gRPC probes are GA since 1.27;
# 1.30 is the oldest release the schemas package and common clouds still carry) and
# the newest whose schemas we ship.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Health names whose status follows Postgres (the ledger, or calls refused for a full
# ledger): a liveness probe on them would restart replicas during a database outage.
POSTGRES_DEPENDENT_HEALTH = {"", "chatgate.v1.ChatService", "chatgate.ledger"}
RUNBOOK = REPO_ROOT / "docs" / "RUNBOOK.md"


@pytest.fixture(scope="module", params=sorted(TARGETS))
def objects(request: pytest.FixtureRequest) -> Rendered:
    return rendered(request.param)


@pytest.fixture(scope="session")
def checkov_bin() -> Path:
    """checkov's own venv (scripts/tool_venv.py; ./scripts/test installs it first)."""
    ran = subprocess.run(
        [sys.executable, "scripts/tool_venv.py", "checkov"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    return Path(ran.stdout.strip())


def server(objects: Rendered) -> tuple[Obj, Obj, dict[str, str]]:
    template = objects.one("Deployment", "chatgate")["spec"]["template"]
    main = container(template, "chatgate")
    return template, main, environment(objects, main)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_the_named_kubernetes_versions(objects: Rendered, version: str) -> None:
    problems = []
    for obj in objects.objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except Exception as exc:  # the package's errors share no base class worth naming
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
    assert problems == []


def checkov_report(tmp_path: Path, checkov_bin: Path) -> dict[str, Any]:
    files = []
    for name, target in TARGETS.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(render_text(target))
        files += ["-f", str(path)]
    # --skip-download: no policy or guideline download (no network here, nor in CI).
    command = [str(checkov_bin / "checkov"), *files, "--framework", "kubernetes", "--skip-download"]
    ran = subprocess.run(
        [*command, "--output", "json"], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert ran.returncode in (0, 1), ran.stderr  # 1: findings, reported below
    report = json.loads(ran.stdout)
    assert isinstance(report, dict) and report["check_type"] == "kubernetes", ran.stdout[:500]
    return report


def test_checkov_finds_nothing_unwaived(tmp_path: Path, checkov_bin: Path) -> None:
    report = checkov_report(tmp_path, checkov_bin)
    results = report["results"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results["failed_checks"]]
    assert failed == []
    # It did look: every workload of both renderings went through the pod checks.
    assert report["summary"]["parsing_errors"] == 0
    checked = {c["resource"] for c in results["passed_checks"] if c["check_id"] == "CKV_K8S_22"}
    workloads = {
        f"{o['kind']}.{o['metadata']['namespace']}.{o['metadata']['name']}"
        for name in TARGETS
        for o, _ in rendered(name).pod_templates()
    }
    assert checked == workloads
    # Each waiver says why, and docs/RUNBOOK.md lists it.
    listed = set(re.findall(r"^\| `(CKV2?_K8S_\d+)` \|", RUNBOOK.read_text(), re.MULTILINE))
    for skipped in results["skipped_checks"]:
        assert skipped["check_result"].get("suppress_comment", "").strip(), skipped["check_id"]
        assert skipped["check_id"] in listed, f"{skipped['check_id']} is waived but not in docs/RUNBOOK.md"


def test_probes_are_native_grpc_on_the_health_port(objects: Rendered) -> None:
    _, main, env = server(objects)
    health_port = port_of(env["CHATGATE_HEALTH_LISTEN"])
    assert {"name": "health", "containerPort": health_port, "protocol": "TCP"} in main["ports"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(main[probe]) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"grpc"}, probe
        assert main[probe]["grpc"]["port"] == health_port, probe
    # Readiness follows the whole server (draining, a full ledger); liveness and startup
    # never depend on Postgres, so an outage cannot restart replicas (and lose the queue).
    assert main["readinessProbe"]["grpc"]["service"] == ""
    for probe in ("startupProbe", "livenessProbe"):
        assert main[probe]["grpc"]["service"] not in POSTGRES_DEPENDENT_HEALTH, probe


def test_a_rollout_drains_every_stream(objects: Rendered) -> None:
    template, main, env = server(objects)
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:3] == ["chatgate", "prestop", "--wait-seconds"]
    prestop_wait = float(command[3])
    cap = float(env["CHATGATE_DEADLINE_CAP_SECONDS"])
    grace = float(env["CHATGATE_SHUTDOWN_GRACE_SECONDS"])
    flush = float(env["CHATGATE_LEDGER_WRITE_TIMEOUT_SECONDS"])
    # A call that started just before SIGTERM may run the whole cap: the drain grace
    # lets it, and kubelet's grace outlasts preStop + drain + the ledger's last flush.
    assert grace >= cap
    assert template["spec"]["terminationGracePeriodSeconds"] > prestop_wait + grace + flush
    # Connections recycled for balancing never cut a stream either.
    assert float(env["CHATGATE_MAX_CONNECTION_AGE_GRACE_SECONDS"]) >= cap
    strategy = objects.one("Deployment", "chatgate")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_pods_are_locked_down(objects: Rendered) -> None:
    for workload, template in objects.pod_templates():
        pod = template["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"]), name


def test_secrets_reach_chatgate_only_as_files(objects: Rendered) -> None:
    for workload, template in objects.pod_templates():
        for c in template["spec"]["containers"]:
            for item in c.get("env", []):
                assert "valueFrom" not in item, (workload["metadata"]["name"], item)
            assert all("secretRef" not in source for source in c.get("envFrom", []))
    template, main, env = server(objects)
    for variable in [name for name in env if name.endswith("_FILE")] + ["PGSERVICEFILE"]:
        held = mount_of(template, main, env[variable])
        assert held is not None, f"{variable}={env[variable]} is on no volume"
        mount, volume = held
        if variable != "CHATGATE_CONFIG":
            assert "secret" in volume, f"{variable} must come from a Secret"
        assert mount.get("readOnly") is True and "subPath" not in mount, variable
    # The password is in the service file, never in the environment.
    assert "password" not in env["DATABASE_URL"] and "@" not in env["DATABASE_URL"]


def test_chatgate_toml_comes_from_a_mounted_config_map(objects: Rendered) -> None:
    template, main, env = server(objects)
    path = PurePosixPath(env["CHATGATE_CONFIG"])
    held = mount_of(template, main, str(path))
    assert held is not None
    mount, volume = held
    config_map = objects.one("ConfigMap", volume["configMap"]["name"])
    assert str(path.relative_to(mount["mountPath"])) in config_map["data"]
    assert "subPath" not in mount  # a subPath mount never sees an updated ConfigMap


def test_the_spool_outlives_a_container_restart(objects: Rendered) -> None:
    template, main, env = server(objects)
    held = mount_of(template, main, env["CHATGATE_SPOOL_DIR"])
    assert held is not None, "the spool must not be in the read-only root filesystem"
    _, volume = held
    assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory"
    # One spool slot per worker, each up to CHATGATE_SPOOL_MAX_MB: a full spool must not
    # exceed the volume, or kubelet evicts the pod and the spool goes with it.
    limit_mib = quantity_mib(volume["emptyDir"]["sizeLimit"])
    assert int(env["CHATGATE_WORKERS"]) * int(env["CHATGATE_SPOOL_MAX_MB"]) < limit_mib
    assert quantity_mib(main["resources"]["limits"]["ephemeral-storage"]) > limit_mib
    # Python and libraries may write temporary files: /tmp is a volume too.
    assert mount_of(template, main, "/tmp/x") is not None


def quantity_mib(value: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    raise AssertionError(f"unexpected quantity {value}")


def test_workers_match_the_cpu_the_pod_gets(objects: Rendered) -> None:
    # Without CHATGATE_WORKERS chatgate would start one worker per core of the node.
    _, main, env = server(objects)
    assert int(env["CHATGATE_WORKERS"]) == int(main["resources"]["requests"]["cpu"])


def test_services_reach_the_pods(objects: Rendered) -> None:
    template, main, env = server(objects)
    labels = template["metadata"]["labels"]
    port_names = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert port_names["grpc"] == port_of(env["CHATGATE_LISTEN"])
    cluster_ip = objects.one("Service", "chatgate")["spec"]
    headless = objects.one("Service", "chatgate-headless")["spec"]
    assert cluster_ip.get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in cluster_ip
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    for spec in (cluster_ip, headless):
        assert spec["selector"].items() <= labels.items()
        assert [(p["port"], p["targetPort"]) for p in spec["ports"]] == [(port_names["grpc"], "grpc")]


def test_scaling_and_disruption_budget_agree(objects: Rendered) -> None:
    template, _, _ = server(objects)
    hpa = objects.one("HorizontalPodAutoscaler", "chatgate")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chatgate"}
    # The autoscaler alone sets the count: a count in the Deployment would undo its work
    # at every apply.
    assert "replicas" not in objects.one("Deployment", "chatgate")["spec"]
    pdb = objects.one("PodDisruptionBudget", "chatgate")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    # A drain always leaves replicas serving.
    assert 1 <= pdb["maxUnavailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]


def test_network_policies_cover_every_pod(objects: Rendered) -> None:
    policies = objects.all("NetworkPolicy")
    for workload, template in objects.pod_templates():
        labels = template["metadata"]["labels"]
        covering = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert covering, workload["metadata"]["name"]
        assert all({"Ingress", "Egress"} <= set(p["spec"]["policyTypes"]) for p in covering)
    ingress = objects.one("NetworkPolicy", "chatgate")["spec"]["ingress"]
    assert [port["port"] for rule in ingress for port in rule["ports"]] == ["grpc"]
    egress_ports = {port["port"] for rule in objects.one("NetworkPolicy", "chatgate")["spec"]["egress"]
                    for port in rule["ports"]}  # fmt: skip
    assert {53, 5432, 443, 4317} <= egress_ports  # DNS, Postgres, the upstreams, the collector


def test_the_migration_job_runs_the_servers_image_and_database(objects: Rendered) -> None:
    _, main, env = server(objects)
    job = objects.one("Job", "chatgate-migrate")["spec"]["template"]
    migrate = container(job, "migrate")
    assert migrate["args"] == ["migrate"] and migrate["image"] == main["image"]
    job_env = environment(objects, migrate)
    assert job_env["DATABASE_URL"] == env["DATABASE_URL"]
    assert mount_of(job, migrate, job_env["PGSERVICEFILE"]) is not None
    assert job["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_the_example_overlay_turns_on_mtls_with_plaintext_probes() -> None:
    objects = rendered("example")
    template, main, env = server(objects)
    for variable in ("CHATGATE_TLS_CERT_FILE", "CHATGATE_TLS_KEY_FILE", "CHATGATE_TLS_CLIENT_CA_FILE"):
        held = mount_of(template, main, env[variable])
        assert held is not None and held[1]["secret"]["secretName"] == "chatgate-tls", variable
    # The probes stay on the plaintext health port, which is not the TLS port.
    assert port_of(env["CHATGATE_HEALTH_LISTEN"]) != port_of(env["CHATGATE_LISTEN"])
    namespace = objects.one("Namespace", "chatgate-prod")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in objects.objects if o["kind"] != "Namespace"} == {
        "chatgate-prod"
    }


def test_the_migration_job_can_be_applied_alone(objects: Rendered) -> None:
    # docs/RUNBOOK.md applies `-l chatgate.io/migrate=true` first: that subset must hold
    # everything the Job refers to (Secrets excepted: operators create those).
    selector = re.search(r"kubectl apply -k \S+ -l (\S+)=(\S+)", RUNBOOK.read_text())
    assert selector is not None
    label, value = selector[1], selector[2]
    subset = Rendered([o for o in objects.objects if o["metadata"].get("labels", {}).get(label) == value])
    job = subset.one("Job", "chatgate-migrate")["spec"]["template"]
    subset.one("ServiceAccount", job["spec"]["serviceAccountName"])
    for c in job["spec"]["containers"]:
        for source in c.get("envFrom", []):
            subset.one("ConfigMap", source["configMapRef"]["name"])
    labels = job["metadata"]["labels"]
    selectors = [p["spec"]["podSelector"]["matchLabels"] for p in subset.all("NetworkPolicy")]
    assert any(selector.items() <= labels.items() for selector in selectors)
    assert not subset.all("Deployment"), "the servers wait for the second apply"
