"""deploy/: the model servers' Kubernetes manifests, the Prefect work pools' base job templates
and their deployments, checked as far as this machine can (no cluster, no Docker engine).

- every manifest in deploy/kubernetes against Kubernetes' own JSON schemas, strictly (an unknown
  field fails), offline (kubernetes-validate), and kustomization.yaml listing them;
- the manifests agree with each other, with the server's image and with configs/cluster.yaml
  (pod DNS names, ports, stores, probe paths);
- the probes' paths against a real ``python -m serving`` with the ConfigMap's monitoring config
  and an empty store: not ready (404), alive (200);
- the work pools created from deploy/prefect/*.json with Prefect's CLI on a real Prefect server,
  deploy/prefect/prefect-cluster.yaml deployed with ``prefect deploy``, and the job of a flow run
  of each deployment rendered by the plugins' own job configuration classes, the way their
  workers do; the Kubernetes Job validated like the manifests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tasks.config import REPO_ROOT, load_config
from tests.prefect_stack import prefect_server
from tests.processes import free_port, running, wait_for_http

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
PREFECT = REPO_ROOT / "deploy" / "prefect"
CLUSTER_CONFIG = REPO_ROOT / "configs" / "cluster.yaml"
SERVING_DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile.serving"
KUBERNETES_VERSION = "1.34"
# kustomize's file; the Secret's template; the worker, which needs a Prefect server's address
NOT_APPLIED = {"kustomization.yaml", "secret.example.yaml", "prefect-worker.yaml"}
POOLS = {"kubernetes": "train-and-serve-k8s", "docker": "train-and-serve-docker"}


def manifests(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def applied_files() -> list[str]:
    return sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name not in NOT_APPLIED)


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of ``kubectl apply -k deploy/kubernetes`` by (kind, name)."""
    found = {}
    for name in applied_files():
        for doc in manifests(KUBERNETES / name):
            found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def flags(args: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in args)


def serving_container() -> dict[str, Any]:
    (container,) = objects()["StatefulSet", "mnist"]["spec"]["template"]["spec"]["containers"]
    return container


def entrypoint_flags() -> dict[str, str]:
    (line,) = [
        ln for ln in SERVING_DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT")
    ]
    return flags(json.loads(line.removeprefix("ENTRYPOINT"))[3:])  # after python -m serving


@pytest.mark.parametrize(
    "name", sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
)
def test_manifest_matches_the_kubernetes_schema(name: str) -> None:
    docs = manifests(KUBERNETES / name)
    assert docs
    for doc in docs:
        validate(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "train-and-serve"


def test_schema_check_rejects_a_misplaced_field() -> None:
    """What the check above is worth: Prefect's default Kubernetes template has ``completions``
    in the pod's spec, which Kubernetes does not know there (ours moves it to the Job's)."""
    statefulset = objects()["StatefulSet", "mnist"]
    statefulset["spec"]["template"]["spec"]["completions"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="completions"):
        validate(statefulset)


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == applied_files()
    images = {image["name"] for image in kustomization["images"]}
    assert serving_container()["image"] in images


def test_replicas_are_addressable_pods_with_their_own_stores() -> None:
    """configs/cluster.yaml's push.replicas are the StatefulSet's pods, by the headless Service's
    DNS names, each with the store its pod polls, and their metrics pages where the server has
    them."""
    found = objects()
    statefulset = found["StatefulSet", "mnist"]
    headless = found["Service", statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    # push must reach a pod that is not ready yet (an empty store): its first version.
    assert headless["spec"]["publishNotReadyAddresses"] is True
    # OrderedReady would wait for mnist-0 to be ready before starting mnist-1.
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    container = serving_container()
    served = {**entrypoint_flags(), **flags(container["args"])}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": int(served["port"]), "rest": int(served["rest_api_port"])}
    assert served["bind_address"] == "0.0.0.0"
    monitoring = found["ConfigMap", "mnist-monitoring"]["data"]["monitoring.config"]
    (metrics_path,) = re.findall(r'path: "([^"]+)"', monitoring)

    namespace = statefulset["metadata"]["namespace"]
    pods = [f"mnist-{i}" for i in range(statefulset["spec"]["replicas"])]
    hosts = [f"{pod}.{headless['metadata']['name']}.{namespace}.svc" for pod in pods]
    replicas = load_config(CLUSTER_CONFIG).push.replicas
    assert [r.name for r in replicas] == pods
    assert [r.grpc for r in replicas] == [f"{host}:{ports['grpc']}" for host in hosts]
    assert [r.metrics_url for r in replicas] == [
        f"http://{host}:{ports['rest']}{metrics_path}" for host in hosts
    ]
    # As written in the file: s3:// URLs are strings only once model stores may be on S3.
    stores = [
        r["model_base_path"] for r in yaml.safe_load(CLUSTER_CONFIG.read_text())["push"]["replicas"]
    ]
    model = served["model_name"]
    assert [f"{store}/{model}" for store in stores] == [
        served["model_base_path"].replace("$(POD_NAME)", pod) for pod in pods
    ]


def test_client_service_and_probes_point_at_the_server() -> None:
    found = objects()
    container = serving_container()
    served = flags(container["args"])
    client_service = found["Service", "mnist"]
    assert {p["targetPort"] for p in client_service["spec"]["ports"]} == {"grpc", "rest"}
    assert container["readinessProbe"]["httpGet"] == {
        "path": f"/v1/models/{served['model_name']}",
        "port": "rest",
    }
    assert served["monitoring_config_file"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "monitoring")
    )
    assert (
        "/monitoring/prometheus/metrics"
        in found["ConfigMap", "mnist-monitoring"]["data"]["monitoring.config"]
    )
    assert container["livenessProbe"]["httpGet"]["path"] == "/monitoring/prometheus/metrics"


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_probes_on_a_server_with_an_empty_store(tmp_path: Path) -> None:
    """The pod's command line (the image's entrypoint, the StatefulSet's args) and monitoring
    config, run here: the server takes every flag; with an empty store it is not ready (TF
    Serving's 404: no version of the model) but alive, so it is not restarted while it waits for
    push's first version. Only the store (a directory, not S3), the ports (free ones) and the
    address (loopback, not every interface) are this machine's."""
    container = serving_container()
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text(objects()["ConfigMap", "mnist-monitoring"]["data"]["monitoring.config"])
    served = {**entrypoint_flags(), **flags(container["args"])}
    store = tmp_path / "store" / served["model_name"]
    store.mkdir(parents=True)
    rest_port = free_port()
    served |= {
        "model_base_path": str(store),
        "monitoring_config_file": str(monitoring),
        "port": str(free_port()),
        "rest_api_port": str(rest_port),
        "bind_address": "127.0.0.1",
    }
    command = [sys.executable, "-m", "serving", *(f"--{k}={v}" for k, v in served.items())]
    rest_url = f"http://127.0.0.1:{rest_port}"
    log = tmp_path / "server.log"
    with running(command, log) as process:
        wait_for_http(f"{rest_url}/", process, log)
        for probe, status in (("readinessProbe", 404), ("livenessProbe", 200)):
            assert http_status(rest_url + container[probe]["httpGet"]["path"]) == status, probe


def test_templates_keep_every_variable_of_the_plugins_defaults() -> None:
    """Ours only change defaults and the job: a plugin upgrade that adds or renames a variable
    shows up here."""
    from prefect_docker.worker import DockerWorker
    from prefect_kubernetes.worker import KubernetesWorker

    for kind, worker in (("kubernetes", KubernetesWorker), ("docker", DockerWorker)):
        ours = json.loads((PREFECT / f"{kind}.json").read_text())
        default = worker.get_default_base_job_template()
        assert ours["variables"]["properties"].keys() == default["variables"]["properties"].keys()
        assert ours["job_configuration"].keys() == default["job_configuration"].keys()


def test_cluster_worker_serves_the_kubernetes_pool() -> None:
    """deploy/kubernetes/prefect-worker.yaml: the pool, namespace and image of kubernetes.json."""
    docs = {d["kind"]: d for d in manifests(KUBERNETES / "prefect-worker.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    template = json.loads((PREFECT / "kubernetes.json").read_text())["variables"]["properties"]
    command = container["command"]
    assert command[command.index("--pool") + 1] == POOLS["kubernetes"]
    assert container["image"] == template["image"]["default"]
    env = {e["name"]: e["value"] for e in container["env"]}
    namespace = template["namespace"]["default"]
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == namespace
    assert {d["metadata"]["namespace"] for d in docs.values()} == {namespace}
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]


async def resolved_job(kind: str, api_url: str, deployment_name: str) -> Any:
    """The job configuration of a new flow run of the deployment, resolved as the pool's worker
    resolves it (pool template + deployment's job variables, then prepare_for_flow_run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_docker.worker import DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    configuration = {
        "kubernetes": KubernetesWorkerJobConfiguration,
        "docker": DockerWorkerJobConfiguration,
    }[kind]
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            (deployment,) = await client.read_deployments(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[deployment_name])
                )
            )
            flow_run = await client.create_flow_run_from_deployment(deployment.id)
            pool = await client.read_work_pool(deployment.work_pool_name)
            return await configuration.resolve_for_flow_run(
                flow_run,
                client=client,
                work_pool=pool,
                worker_name="test-render",
                deployment=deployment,
            )


@pytest.mark.slow
def test_work_pools_and_cluster_deployments_render_runnable_jobs(tmp_path: Path) -> None:
    cluster = objects()
    with prefect_server(tmp_path) as server:
        for kind, pool in POOLS.items():
            template = PREFECT / f"{kind}.json"
            server.prefect(
                "work-pool", "create", pool, "--type", kind, "--base-job-template", str(template)
            )
            with server.client() as client:
                stored = client.read_work_pool(pool).base_job_template
            assert stored == json.loads(template.read_text())
        server.prefect(
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(PREFECT / "prefect-cluster.yaml"),
        )
        spec = yaml.safe_load((PREFECT / "prefect-cluster.yaml").read_text())
        kind_of_pool = {pool: kind for kind, pool in POOLS.items()}
        rendered = {
            d["name"]: asyncio.run(
                resolved_job(kind_of_pool[d["work_pool"]["name"]], server.api_url, d["name"])
            )
            for d in spec["deployments"]
        }

    for name in ("k8s-on-demand", "k8s-nightly", "k8s-rollback"):
        job = rendered[name].job_manifest
        validate(job)
        assert job["metadata"]["namespace"] == "train-and-serve"
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "train-and-serve-flow:0.1.0"
        assert container["args"] == ["prefect", "flow-run", "execute"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PREFECT__FLOW_RUN_ID"]
        assert container["envFrom"] == [{"secretRef": {"name": "model-store"}}]
        (claim,) = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert ("PersistentVolumeClaim", claim) in cluster
        work = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "work")
        config = load_config(CLUSTER_CONFIG)
        assert Path(config.data.store).is_relative_to(work)
        assert Path(config.export.base_path).is_relative_to(work)

    docker = rendered["docker-on-demand"]
    assert docker.image == "train-and-serve-flow:0.1.0"
    assert docker.network_mode == "host"  # configs/mnist.yaml's 127.0.0.1 addresses
    # {{ $PWD }}: prefect deploy's working directory, as the README runs it (the repo root).
    assert docker.volumes == [f"{os.environ['PWD']}/.stack:/app/.stack"]
    assert docker.command == "prefect flow-run execute"
