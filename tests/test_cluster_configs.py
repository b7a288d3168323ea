"""Offline checks of the deployment files in ``cluster/``.

* Ray cluster-launcher configs: Ray's own ``prepare_config`` + ``validate_config`` (the JSON schema
  ``ray/autoscaler/ray-schema.json`` plus its extra checks), and mutated copies that must fail.
* KubeRay manifests: the storage-version ``openAPIV3Schema`` of the vendored KubeRay CRDs, made
  strict (unknown fields are errors, like ``kubeconform -strict``), and mutated copies that fail.
* The runtime_env: Ray's own parsing and its ``excludes`` matcher.

The CRDs are data beside the repository (``../shared/data/kuberay-crds``); the tests that need
them skip when it is absent.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuberay-crds"

LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBE_FILES = ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"]
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
UPLOAD_LIMIT = 100 * 2**20  # what `ray job submit --working-dir` accepts (HTTP 413 above)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML


def _ray_minor() -> str:
    import ray

    return ".".join(ray.__version__.split(".")[:2])


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


def _launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_validate(config: dict[str, Any]) -> None:
    """What ``ray up`` checks before touching the cloud (private API, no credentials needed)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def _gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: t
        for name, t in config["available_node_types"].items()
        if t["resources"].get("GPU", 0) > 0
    }


def _gpu_type(config: dict[str, Any]) -> dict[str, Any]:
    """The on-demand GPU worker type."""
    return _gpu_types(config)["gpu_worker"]


def _is_spot(name: str, node_type: dict[str, Any]) -> bool:
    node = node_type["node_config"]
    if name == "aws.yaml":
        return node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_validation(name):
    _ray_validate(_launcher(name))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_has_cpu_head_and_autoscaling_gpu_workers(name):
    config = _launcher(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "GPU tasks must drive worker scale-up"
    gpus = _gpu_types(config)
    assert set(gpus) == {"gpu_worker", "gpu_spot_worker"}
    for gpu in gpus.values():
        assert gpu is not head
        assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] >= 1
        assert gpu.get("min_workers", 0) == 0
        assert 1 <= gpu["max_workers"] <= config["max_workers"]
        node = gpu["node_config"]
        if "guestAccelerators" in node:  # GCP: GPU VMs cannot live-migrate
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_has_a_spot_gpu_type_like_the_on_demand_one(name):
    gpus = _gpu_types(_launcher(name))
    spot, on_demand = gpus["gpu_spot_worker"], gpus["gpu_worker"]
    assert _is_spot(name, spot) and not _is_spot(name, on_demand)
    assert spot["resources"] == on_demand["resources"]
    same = {k: v for k, v in spot["node_config"].items() if k in on_demand["node_config"]}
    kind = "InstanceType" if name == "aws.yaml" else "machineType"
    assert same[kind] == on_demand["node_config"][kind]
    if name == "gcp.yaml":
        assert (
            spot["node_config"]["guestAccelerators"]
            == on_demand["node_config"]["guestAccelerators"]
        )


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_image_and_mounts(name):
    config = _launcher(name)
    image = config["docker"]["image"]
    repo, tag = image.rsplit(":", 1)
    assert repo == "rayproject/ray"
    assert tag.startswith(f"{_ray_minor()}.") and "-py311" in tag and tag.endswith("-gpu"), image
    mounts = config["file_mounts"]
    assert "~/cpsd" in mounts
    for local in mounts.values():  # `ray up` runs from the repository root
        assert (REPO / local).exists(), f"file_mounts source {local} missing"
    assert any("~/cpsd" in cmd and "pip install" in cmd for cmd in config["setup_commands"])


LAUNCHER_MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown top-level key": lambda c: c.update(max_worker=3),
    "unknown node-type key": lambda c: _gpu_type(c).update(min_worker=1),
    "wrong type": lambda c: c.update(idle_timeout_minutes="ten"),
    "fractional GPU resource": lambda c: _gpu_type(c)["resources"].update(GPU=0.5),
    "min_workers above max_workers": lambda c: _gpu_type(c).update(min_workers=99),
}


@pytest.mark.parametrize("mutation", LAUNCHER_MUTATIONS)
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_validation_rejects_mutations(name, mutation):
    config = _launcher(name)
    LAUNCHER_MUTATIONS[mutation](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(config)


# --------------------------------------------------------------------------------------------
# Strict CRD schemas


def strict_schema(node: Any) -> Any:
    """A copy of a Kubernetes structural (OpenAPI v3) schema for jsonschema Draft 7, strict.

    * every object schema with ``properties`` gets ``additionalProperties: false`` unless it
      has ``x-kubernetes-preserve-unknown-fields: true`` or its own ``additionalProperties``;
    * ``x-kubernetes-int-or-string`` accepts an integer or a string (``pattern`` then only
      applies to strings, as in Kubernetes);
    * ``nullable: true`` also accepts null;
    * ``x-kubernetes-embedded-resource`` objects implicitly allow apiVersion/kind/metadata.

    ``anyOf``/``allOf``/``oneOf``/``not`` branches are left alone: in structural schemas they
    only add value checks to fields declared outside them. CEL rules
    (``x-kubernetes-validations``) and ``format`` are not evaluated.
    """
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if "properties" in out:
        props = {key: strict_schema(sub) for key, sub in out["properties"].items()}
        if out.get("x-kubernetes-embedded-resource"):
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props.setdefault("metadata", {"type": "object"})
        out["properties"] = props
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict_schema(out["items"])
    return out


_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The ObjectMeta fields a manifest sets; the CRDs leave top-level metadata unchecked.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
        "namespace": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
CONFIG_MAP = {  # core/v1 ConfigMap, the fields a manifest may set
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "ConfigMap"},
        "metadata": OBJECT_META,
        "data": _STRING_MAP,
        "binaryData": _STRING_MAP,
        "immutable": {"type": "boolean"},
    },
}


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    if not (CRD_DIR / CRD_FILES["RayJob"]).is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (shared/ sits beside the repo in CI)")
    return CRD_DIR


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = (v for v in crd["spec"]["versions"] if v["storage"])
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def _schema_for(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc.get("kind")
    if kind == "ConfigMap":
        return CONFIG_MAP
    if kind in CRD_FILES:
        return _crd_schema(kind)
    raise AssertionError(f"no schema for kind {kind!r}")


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_schema_for(doc))
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def test_strict_schema_helper():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "plain": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
                "quantity": {
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": r"^[0-9]+m?$",
                    "x-kubernetes-int-or-string": True,
                },
                "port": {"x-kubernetes-int-or-string": True},
                "when": {"type": "string", "nullable": True},
            },
        }
    )
    ok = jsonschema.Draft7Validator(schema).is_valid
    assert ok({"plain": {"a": "x"}, "open": {"a": "x", "b": 1}, "when": None})
    assert ok({"quantity": 4, "port": 8265}) and ok({"quantity": "500m", "port": "http"})
    assert not ok({"plain": {"b": "x"}})
    assert not ok({"typo": 1})
    assert not ok({"quantity": "four"}) and not ok({"port": 1.5})


# --------------------------------------------------------------------------------------------
# KubeRay manifests


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def _one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = (d for d in _documents(name) if d["kind"] == kind)
    return doc


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _gpu_groups(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        g["groupName"]: g
        for g in _cluster_spec(doc)["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    }


def _gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    """The on-demand GPU worker group."""
    return _gpu_groups(doc)["gpu"]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", KUBE_FILES)
def test_every_kubernetes_document_is_named(name):
    docs = _documents(name)
    assert docs
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), doc
        assert re.match(_DNS_LABEL, doc["metadata"]["name"]), doc["metadata"]


@pytest.mark.parametrize("name", KUBE_FILES)
def test_kubernetes_documents_match_strict_schemas(name, crd_dir):
    for doc in _documents(name):
        errors = _schema_errors(doc)
        assert not errors, f"{name} {doc['kind']}:\n" + "\n".join(errors)


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


KUBE_MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "replicas as a word": lambda d: _gpu_group(d).update(replicas="one"),
    "misspelt group field": lambda d: _rename(_gpu_group(d), "maxReplicas", "maxReplica"),
    "misspelt pod-spec field": lambda d: _rename(
        _gpu_group(d)["template"]["spec"]["containers"][0], "resources", "resource"
    ),
    "rayStartParams value not a string": lambda d: _gpu_group(d)["rayStartParams"].update(
        {"num-gpus": 1}
    ),
    "GPU quantity not a quantity": lambda d: _gpu_group(d)["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"].update({"nvidia.com/gpu": "one"}),
    "wrong apiVersion": lambda d: d.update(apiVersion="ray.io/v2"),
    "metadata name not a DNS label": lambda d: d["metadata"].update(name="CPSD_Job"),
    "label value not a string": lambda d: d["metadata"]["labels"].update(version=1),
}
RAYJOB_MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "misspelt shutdownAfterJobFinishes": lambda d: _rename(
        d["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"
    ),
    "ttl as a string": lambda d: d["spec"].update(ttlSecondsAfterFinished="10m"),
}


@pytest.mark.parametrize(
    ("name", "mutation"),
    [(n, m) for n in KUBE_FILES for m in KUBE_MUTATIONS]
    + [("kuberay-rayjob.yaml", m) for m in RAYJOB_MUTATIONS],
)
def test_strict_schemas_reject_mutations(name, mutation, crd_dir):
    kind = "RayJob" if "rayjob" in name else "RayCluster"
    doc = copy.deepcopy(_one(name, kind))
    {**KUBE_MUTATIONS, **RAYJOB_MUTATIONS}[mutation](doc)
    assert _schema_errors(doc), f"{mutation} was accepted"


@pytest.mark.parametrize("value", [4, "4", "3500m"])
def test_int_or_string_quantities_accept_both(value, crd_dir):
    doc = copy.deepcopy(_one("kuberay-raycluster.yaml", "RayCluster"))
    _gpu_group(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = value
    assert not _schema_errors(doc)


@pytest.mark.parametrize("name", KUBE_FILES)
def test_kuberay_cluster_groups(name):
    doc = _one(name, "RayJob" if "rayjob" in name else "RayCluster")
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"].startswith(f"{_ray_minor()}.")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head)
    groups = _gpu_groups(doc)
    assert set(groups) == {"gpu", "gpu-spot"}
    for group in groups.values():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
    # The spot group differs only in where its pods may land.
    on_demand, spot = (groups[g]["template"]["spec"] for g in ("gpu", "gpu-spot"))
    assert spot["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert "nodeSelector" not in on_demand
    assert spot["containers"] == on_demand["containers"]
    assert on_demand["tolerations"][0] in spot["tolerations"]
    containers = _containers(doc)
    assert len({c["image"] for c in containers}) == 1, "head and workers need the same image"
    for container in containers:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI", "").startswith("http"), container["name"]


def test_rayjob_runs_the_pipeline_on_its_configmap():
    docs = _documents("kuberay-rayjob.yaml")
    job = _one("kuberay-rayjob.yaml", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    # the CRD leaves submissionMode a free string
    assert spec["submissionMode"] == "K8sJobMode"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "workflows.pipeline"]
    config_path = PurePosixPath(argv[argv.index("--config") + 1])

    # the driver runs on the head: the config must be mounted there from a ConfigMap here
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    (mount,) = (
        m
        for c in head["containers"]
        for m in c.get("volumeMounts", [])
        if config_path.parent == PurePosixPath(m["mountPath"])
    )
    map_name = volumes[mount["name"]]["configMap"]["name"]
    (config_map,) = (
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == map_name
    )
    text = config_map["data"][config_path.name]

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)
    assert not {"pip", "uv", "conda"} & set(runtime_env)
    _check_pipeline_config(text, job)


def _check_pipeline_config(text: str, job: dict[str, Any]) -> None:
    from workflows.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        path.write_text(text)
        cfg = load_config(path)
    assert "://" in cfg.storage_path, "storage_path must be shared storage on a cluster"
    # explicit, as autoscaler v2 (KubeRay's autoscalerOptions.version: v2) says nothing about
    # its node types to the GPU default of workflows.autoscaling
    assert cfg.ray.teacher_gpus and cfg.ray.teacher_gpus >= 1
    assert cfg.ray.student_gpus and cfg.ray.student_gpus >= 1
    teachers = 2 * cfg.cpsd.k if cfg.cpsd.mode == "cpsd" else cfg.cpsd.k
    assert _gpu_group(job)["maxReplicas"] >= teachers, "all teachers should run at once"


# --------------------------------------------------------------------------------------------
# runtime_env


def _runtime_env() -> dict[str, Any]:
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(
        runtime_env=str(CLUSTER / "runtime_env.yaml"), working_dir=str(REPO)
    )


def _uploaded(root: Path, excludes: list[str], include_gitignore: bool) -> list[Path]:
    """The files Ray would zip for ``working_dir=root`` (its own traversal and matcher)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[Path] = []
    _dir_travel(
        root,
        [_get_excludes(root, excludes)],
        lambda p: files.append(p) if p.is_file() else None,
        include_gitignore=include_gitignore,
    )
    return files


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env()
    RuntimeEnv(**env)
    assert not {"pip", "uv", "conda"} & set(env), "bake dependencies into the image"
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert {".venv", ".git", "mlruns"} <= set(env["excludes"])

    env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = 0.2  # not a string
    with pytest.raises(TypeError):
        RuntimeEnv(**env)


def test_runtime_env_excludes_keep_code_and_drop_the_rest(tmp_path):
    kept = ["pyproject.toml", "mlcore/data/synth.py", "workflows/configs/tiny.yaml"]
    dropped = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/HEAD",
        ".cache/cpsd/synth-1/manifest.parquet",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "runs/tiny/teacher-0/model.pt",
        "data/coco/manifest.parquet",
        "mlcore/__pycache__/config.cpython-311.pyc",
        "best.ckpt",
    ]
    for rel in kept + dropped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    files = _uploaded(tmp_path, _runtime_env()["excludes"], include_gitignore=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in files) == sorted(kept)


def test_repository_upload_is_under_the_limit():
    files = _uploaded(REPO, _runtime_env()["excludes"], include_gitignore=True)
    size = sum(p.stat().st_size for p in files)
    assert size < UPLOAD_LIMIT, f"working_dir upload would be {size / 2**20:.1f} MiB"
    assert REPO / "workflows" / "config.py" in files
