"""infra/: the manifests a cluster would reject must fail here, in seconds, without a cluster or Ray.

- KubeRay manifests (RayCluster, RayJob, RayCronJob, and the RayJob inside the CronJob's ConfigMap) are
  validated against the openAPIV3Schema of the real CRDs (the served + stored version), as the API
  server does: the JSON schema itself, plus unknown fields (the API server's strict field validation;
  KubeRay's CRDs declare `properties` without `additionalProperties: false`, so jsonschema alone lets a
  typo'd field through), plus ObjectMeta, plus the checks KubeRay's operator makes before it reconciles
  (``ValidateRayClusterSpec``/``ValidateRayJobSpec``/``ValidateRayCronJobSpec``: min <= max replicas,
  token auth needs rayVersion >= 2.52, autoscaler v2 needs restartPolicy Never, ...).
- The plain CronJob: batch/v1 fields, a valid 5-field schedule, concurrencyPolicy Forbid, its pod
  template against the core/v1 PodTemplateSpec schema embedded in the RayJob CRD, least-privilege RBAC.
- infra/aws/cluster.yaml against the cluster-launcher schema Ray ships (ray/autoscaler/ray-schema.json).
- Cross-file: image names follow the Dockerfile's targets and the package version, Ray/torch versions
  agree with pyproject.toml/constraints.txt, no literal credentials, entrypoint scripts exist.

The CRDs are read from $KUBERAY_CRDS_DIR, else the vendored copy in infra/k8s/crds/ (unchanged from
ray-project/kuberay, see its SOURCE.md), else shared/kuberay-crds/ in or next to the repository.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "Dockerfile"
README = INFRA / "README.md"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"

RAYCLUSTER = K8S / "raycluster.yaml"
RAYJOB_TRAIN = K8S / "rayjob-train.yaml"
RAYCRONJOB = K8S / "raycronjob-nightly.yaml"
CRONJOB = K8S / "cronjob-nightly.yaml"

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
# KubeRay's utils: MaxRayClusterNameLength = 53 (63 - len("-serve-svc")); a RayJob's cluster is named
# <rayjob>-<5 chars>, so MaxRayJobNameLength = 47; a RayCronJob's RayJobs are <raycronjob>-<5 chars>.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 47 - 6}
NIGHT_EXAMPLE = "20260102"
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "ICHD_PATIENT_SALT", "RAY_AUTH_TOKEN"}

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# the docker reference grammar (distribution/reference), enough to reject what a runtime cannot pull
_IMAGE_REF = re.compile(
    r"^(?:(?P<domain>(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*"
    r"(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_AWS_ACCESS_KEY = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])")
_AWS_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(aws_secret_access_key|secret_access_key|aws_session_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}"
)


# ------------------------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (the API server's strict decoding does; PyYAML would
    silently keep the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_docs(text: str) -> list[dict]:
    """Every non-empty YAML document in ``text``, duplicate keys rejected."""
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc is not None]


@functools.cache
def _docs(path: Path) -> tuple[dict, ...]:
    return tuple(load_docs(path.read_text()))


def docs(path: Path) -> list[dict]:
    """The documents of a file, as fresh copies (tests mutate them)."""
    return copy.deepcopy(list(_docs(path)))


def one(path: Path, kind: str) -> dict:
    found = [doc for doc in docs(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _crd_dir() -> Path | None:
    candidates = [Path(os.environ["KUBERAY_CRDS_DIR"])] if os.environ.get("KUBERAY_CRDS_DIR") else []
    # Vendored copy first (infra/k8s/crds/SOURCE.md says where from), so CI on a bare clone validates too.
    candidates += [ROOT / "infra" / "k8s" / "crds", ROOT / "shared" / "kuberay-crds", ROOT.parent / "shared" / "kuberay-crds"]
    for path in candidates:
        if all((path / name).is_file() for name in CRD_FILES.values()):
            return path
    return None


def _require_crds() -> Path:
    path = _crd_dir()
    if path is None:
        pytest.skip(
            "KubeRay CRDs not found (set KUBERAY_CRDS_DIR, or put them in shared/kuberay-crds/ "
            f"in or next to {ROOT})"
        )
    return path


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (as in a CRD) -> JSON Schema: `nullable: true` becomes a "null" type. Every
    `x-kubernetes-*` keyword is left in place: jsonschema ignores keywords it does not know."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _openapi_to_jsonschema(value) for key, value in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_schema(kind: str) -> tuple[str, dict]:
    """(apiVersion, JSON schema) of the version of ``kind``'s CRD that is served and stored."""
    path = _require_crds() / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return f"{crd['spec']['group']}/{version['name']}", _openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# ------------------------------------------------------------------------------- schema validation


def schema_errors(instance: Any, schema: dict) -> list[str]:
    """jsonschema errors, as 'path: message'."""
    validator = jsonschema.Draft7Validator(schema, format_checker=_FORMATS)
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def unknown_fields(instance: Any, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare, as the API server's strict field validation reports them.

    A key is unknown where its object's schema lists `properties`, the key is not among them, there is
    no `additionalProperties` schema for it, and the object is not `x-kubernetes-preserve-unknown-fields`.
    An object schema with neither properties nor additionalProperties admits no keys at all (Kubernetes
    prunes them), except where it preserves unknown fields.
    """
    found: list[str] = []
    if not isinstance(schema, dict):
        return found
    for sub in schema.get("allOf", []) + schema.get("anyOf", []) + schema.get("oneOf", []):
        if isinstance(sub, dict) and "properties" in sub:
            raise NotImplementedError(f"{path}: properties under a combinator")
    if isinstance(instance, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
        for key, value in instance.items():
            where = f"{path}.{key}" if path else str(key)
            if properties is not None and key in properties:
                found += unknown_fields(value, properties[key], where)
            elif isinstance(additional, dict):
                found += unknown_fields(value, additional, where)
            elif not preserve and additional is not True and (properties is not None or schema.get("type") == "object"):
                found.append(where)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(instance):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string", "pattern": _DNS1123_LABEL.pattern, "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def metadata_errors(metadata: Any, kind: str) -> list[str]:
    """ObjectMeta (the CRDs leave `metadata` to the API server): the fields we use, label syntax, and the
    name rules KubeRay adds (DNS-1035 label, length)."""
    errors = [f"metadata.{e}" for e in schema_errors(metadata, _OBJECT_META)]
    if errors:
        return errors
    name = metadata["name"]
    if kind in MAX_NAME:
        if not _DNS1035.match(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1035 label")
        if len(name) > MAX_NAME[kind]:
            errors.append(f"metadata.name: {name!r} is longer than KubeRay's {MAX_NAME[kind]} for a {kind}")
    elif not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    for key, value in (metadata.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if (prefix and not _DNS1123_SUBDOMAIN.match(prefix)) or not _LABEL_NAME.match(label) or len(label) > 63:
            errors.append(f"metadata.labels: invalid key {key!r}")
        if not _LABEL_VALUE.match(value) or len(value) > 63:
            errors.append(f"metadata.labels[{key}]: invalid value {value!r}")
    return errors


def crd_errors(obj: dict) -> list[str]:
    """Everything the API server (with the CRD installed) and KubeRay's validation would reject."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of {sorted(CRD_FILES)}"]
    api_version, schema = crd_schema(kind)
    errors: list[str] = []
    if obj.get("apiVersion") != api_version:
        errors.append(f"apiVersion {obj.get('apiVersion')!r}: the CRD serves and stores {api_version!r}")
    errors += schema_errors(obj, schema)
    errors += [f"{path}: unknown field" for path in unknown_fields({k: v for k, v in obj.items() if k != "metadata"}, schema)]
    errors += metadata_errors(obj.get("metadata"), kind)
    if not errors:
        errors += kuberay_errors(obj)
        errors += [e for where, pod in pod_specs(obj) for e in pod_errors(pod, where)]
    return errors


# ------------------------------------------------------------------- the operator's own validation


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def cluster_spec_errors(spec: dict, where: str) -> list[str]:
    """KubeRay's ValidateRayClusterSpec, the parts that apply to what these manifests use."""
    errors: list[str] = []
    head = spec["headGroupSpec"]
    workers = spec.get("workerGroupSpecs") or []
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{g.get('groupName')}]", g) for g in workers]
    autoscaling = spec.get("enableInTreeAutoscaling") is True
    autoscaler = spec.get("autoscalerOptions") or {}
    v2 = autoscaling and (
        autoscaler.get("version") == "v2"
        or (autoscaler.get("version") is None and _version(spec.get("rayVersion", "0")) >= (2, 47, 0))
    )
    names = [g.get("groupName") for g in workers]
    if len(set(names)) != len(names):
        errors.append(f"{where}: worker group names are not unique: {names}")
    for label, group in groups:
        pod = group["template"].get("spec") or {}
        if not pod.get("containers"):
            errors.append(f"{where}.{label}: no container")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where}.{label}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            errors.append(f"{where}.{label}: rayStartParams['labels'] is not supported; use labels")
        if v2 and pod.get("restartPolicy") not in (None, "", "Never"):
            errors.append(f"{where}.{label}: restartPolicy must be Never or unset with autoscaler v2")
    for label, group in groups[1:]:
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"{where}.{label}: minReplicas and maxReplicas are required without autoscaling")
        if (low is not None and low < 0) or (high is not None and high < 0):
            errors.append(f"{where}.{label}: negative replicas")
        if low is not None and high is not None and low > high:
            errors.append(f"{where}.{label}: minReplicas {low} > maxReplicas {high}")
        if group.get("idleTimeoutSeconds") is not None:
            if group["idleTimeoutSeconds"] < 0:
                errors.append(f"{where}.{label}: negative idleTimeoutSeconds")
            if not v2:
                errors.append(f"{where}.{label}: idleTimeoutSeconds needs autoscaler v2")
        if autoscaling and group.get("suspend"):
            errors.append(f"{where}.{label}: a worker group cannot be suspended with the autoscaler")
    if (autoscaler.get("idleTimeoutSeconds") or 0) < 0:
        errors.append(f"{where}.autoscalerOptions.idleTimeoutSeconds must be non-negative")
    auth = spec.get("authOptions")
    if auth is not None and auth.get("mode", "token") == "token":
        if not spec.get("rayVersion"):
            errors.append(f"{where}: token auth needs rayVersion")
        elif _version(spec["rayVersion"]) < (2, 52, 0):
            errors.append(f"{where}: token auth needs rayVersion >= 2.52.0, got {spec['rayVersion']}")
        if auth.get("enableK8sTokenAuth"):
            if _version(spec.get("rayVersion", "0")) < (2, 55, 0):
                errors.append(f"{where}: enableK8sTokenAuth needs rayVersion >= 2.55.0")
            if auth.get("secretName"):
                errors.append(f"{where}: enableK8sTokenAuth and secretName are exclusive")
    elif auth is not None and auth.get("enableK8sTokenAuth"):
        errors.append(f"{where}: enableK8sTokenAuth needs authOptions.mode token")
    if spec.get("tlsOptions") or spec.get("networkPolicy") or spec.get("historyServerOptions"):
        errors.append(f"{where}: tlsOptions/networkPolicy/historyServerOptions need operator feature gates")
    return errors


def rayjob_spec_errors(spec: dict, where: str) -> list[str]:
    """KubeRay's ValidateRayJobSpec."""
    errors: list[str] = []
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: suspend needs shutdownAfterJobFinishes")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append(f"{where}: negative ttlSecondsAfterFinished")
    if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("deletionStrategy") is not None:
        errors.append(f"{where}: deletionStrategy needs the RayJobDeletionPolicy feature gate")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector is required")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append(f"{where}: backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        errors.append(f"{where}: SidecarMode takes no submitterPodTemplate/submitterConfig")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            errors.append(f"{where}: {field} must be positive")
    if spec.get("backoffLimit", 0) < 0:
        errors.append(f"{where}: negative backoffLimit")
    if "runtimeEnvYAML" in spec:
        try:
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            errors.append(f"{where}.runtimeEnvYAML: not YAML: {exc}")
        else:
            if not isinstance(runtime_env, dict):
                errors.append(f"{where}.runtimeEnvYAML: not a mapping")
    cluster = spec.get("rayClusterSpec")
    if cluster is not None:
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            errors.append(f"{where}: K8s token auth is not supported for RayJob")
        errors += cluster_spec_errors(cluster, f"{where}.rayClusterSpec")
    return errors


_ENUMS = {
    "restartPolicy": {"Always", "OnFailure", "Never"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "operator": {"Exists", "Equal"},
    "effect": {"NoSchedule", "PreferNoSchedule", "NoExecute"},
}


def pod_errors(pod: dict, where: str) -> list[str]:
    """Core/v1 rules the CRDs' embedded PodSpec schema does not carry (enums, references, names): the API
    server checks them only when the operator creates the pod, i.e. long after `kubectl apply` succeeded."""
    errors: list[str] = []
    if pod.get("restartPolicy", "Never") not in _ENUMS["restartPolicy"]:
        errors.append(f"{where}: restartPolicy {pod['restartPolicy']!r}")
    volumes = [v["name"] for v in pod.get("volumes") or []]
    containers = _containers(pod)
    for label, names in (("volume", volumes), ("container", [c["name"] for c in containers])):
        if len(set(names)) != len(names):
            errors.append(f"{where}: duplicate {label} names {names}")
    ports = [p["name"] for c in containers for p in c.get("ports") or [] if "name" in p]
    if len(set(ports)) != len(ports) or any(len(p) > 15 or not _DNS1123_LABEL.match(p) for p in ports):
        errors.append(f"{where}: port names must be unique IANA service names (<= 15 chars): {ports}")
    for container in containers:
        name = container["name"]
        if not _DNS1123_LABEL.match(name) or len(name) > 63:
            errors.append(f"{where}: container name {name!r} is not a DNS-1123 label")
        if container.get("imagePullPolicy", "IfNotPresent") not in _ENUMS["imagePullPolicy"]:
            errors.append(f"{where} {name}: imagePullPolicy {container['imagePullPolicy']!r}")
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                errors.append(f"{where} {name}: volumeMount {mount['name']!r} names no volume")
        env = [item["name"] for item in container.get("env") or []]
        if len(set(env)) != len(env):
            errors.append(f"{where} {name}: duplicate env names")
    for toleration in pod.get("tolerations") or []:
        for key in ("operator", "effect"):
            if key in toleration and toleration[key] not in _ENUMS[key]:
                errors.append(f"{where}: toleration {key} {toleration[key]!r}")
        if toleration.get("operator") == "Exists" and toleration.get("value"):
            errors.append(f"{where}: a toleration with operator Exists takes no value")
    return errors


def kuberay_errors(obj: dict) -> list[str]:
    kind, spec = obj["kind"], obj["spec"]
    if kind == "RayCluster":
        return cluster_spec_errors(spec, "spec")
    if kind == "RayJob":
        return rayjob_spec_errors(spec, "spec")
    errors = cron_errors(spec["schedule"])
    if "TZ" in spec["schedule"]:
        errors.append("schedule: use timeZone, not TZ/CRON_TZ")
    if "timeZone" in spec:
        errors += timezone_errors(spec["timeZone"])
    return errors + rayjob_spec_errors(spec["jobTemplate"], "spec.jobTemplate")


# ---------------------------------------------------------------------------------- cron, timezone

_MONTHS = {name: number for number, name in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1)}
_DAYS = {name: number for number, name in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_CRON_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}), ("month", 1, 12, _MONTHS),
                ("day of week", 0, 6, _DAYS))
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(expression: str) -> list[str]:
    """Errors of a schedule as robfig/cron's ParseStandard reads it (Kubernetes' CronJob and KubeRay's
    RayCronJob both use it): five fields, or a descriptor."""
    if expression.startswith("@"):
        return [] if expression in _DESCRIPTORS else [f"schedule {expression!r}: unknown descriptor"]
    fields = expression.split()
    if len(fields) != 5:
        return [f"schedule {expression!r}: {len(fields)} fields, expected 5"]
    errors: list[str] = []
    for text, (name, low, high, names) in zip(fields, _CRON_FIELDS):
        for item in text.split(","):
            span, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                errors.append(f"schedule {expression!r}: bad step in {name} {item!r}")
            if span in ("*",) or (span == "?" and name in ("day of month", "day of week")):
                continue
            start_text, dash, end_text = span.partition("-")
            try:
                start = int(start_text) if start_text.isdigit() else names[start_text.upper()]
                end = (int(end_text) if end_text.isdigit() else names[end_text.upper()]) if dash else start
            except KeyError:
                errors.append(f"schedule {expression!r}: bad {name} {item!r}")
                continue
            if not (low <= start <= end <= high):
                errors.append(f"schedule {expression!r}: {name} {item!r} outside {low}-{high}")
    return errors


def timezone_errors(name: str) -> list[str]:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return [f"timeZone {name!r} is not an IANA time zone"]
    return []


# ---------------------------------------------------------------------------------- walking objects


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodSpec) of every pod template in a KubeRay object or a CronJob."""
    kind, spec = obj["kind"], obj["spec"]
    if kind == "CronJob":
        yield "jobTemplate", spec["jobTemplate"]["spec"]["template"]["spec"]
        return
    job = spec["jobTemplate"] if kind == "RayCronJob" else spec
    cluster = spec if kind == "RayCluster" else job["rayClusterSpec"]
    if kind != "RayCluster" and job.get("submitterPodTemplate"):
        yield "submitterPodTemplate", job["submitterPodTemplate"]["spec"]
    yield "headGroupSpec", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs") or []:
        yield f"workerGroupSpecs[{group['groupName']}]", group["template"]["spec"]


def ray_cluster_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    if obj["kind"] == "RayJob":
        return [obj["spec"]["rayClusterSpec"]]
    return [obj["spec"]["jobTemplate"]["rayClusterSpec"]]


def nightly_rayjob_template() -> str:
    return one(CRONJOB, "ConfigMap")["data"]["rayjob.yaml"]


def render_nightly_rayjob(night: str = NIGHT_EXAMPLE) -> dict:
    """The RayJob the CronJob submits, rendered the way its init container does (sed s/NIGHT/<date>/g)."""
    (rayjob,) = load_docs(nightly_rayjob_template().replace("NIGHT", night))
    return rayjob


def kuberay_objects() -> list[tuple[str, dict]]:
    """(label, object) of every KubeRay object the infra creates, the CronJob's RayJob included."""
    objects = [(path.name, doc) for path in (RAYCLUSTER, RAYJOB_TRAIN, RAYCRONJOB) for doc in docs(path)]
    return objects + [("cronjob-nightly.yaml:ConfigMap/rayjob.yaml", render_nightly_rayjob())]


def all_manifest_objects() -> list[tuple[str, dict]]:
    return kuberay_objects() + [(CRONJOB.name, doc) for doc in docs(CRONJOB)]


def _project() -> dict:
    """version and dependencies of pyproject.toml's [project] (a regex: tomllib needs Python 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    project = re.search(r"^\[project\]$(.*?)(?=^\[)", text, re.MULTILINE | re.DOTALL).group(1)
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", project, re.MULTILINE | re.DOTALL).group(1)
    return {
        "version": re.search(r'^version = "([^"]+)"', project, re.MULTILINE).group(1),
        "dependencies": re.findall(r'"([^"]+)"', dependencies),
    }


def _pin(name: str) -> str:
    """The version constraints.txt pins ``name`` to."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        package, sep, version = line.partition("==")
        if sep and package.strip().lower() == name:
            return version.strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def dockerfile_args() -> dict[str, str]:
    """ARG defaults of the Dockerfile (the first default of each name; ${VAR} expanded from earlier ARGs)."""
    values: dict[str, str] = {}
    for match in re.finditer(r"^ARG\s+(\w+)=(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE):
        name, value = match.groups()
        values.setdefault(name, re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value))
    return values


def dockerfile_stages() -> dict[str, str]:
    """stage name -> its FROM image."""
    return {
        name: image
        for image, name in re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE)
    }


def dockerfile_stage_text(stage: str) -> str:
    text = DOCKERFILE.read_text()
    start = re.search(rf"^FROM\s+\S+\s+AS\s+{re.escape(stage)}\s*$", text, re.MULTILINE | re.IGNORECASE)
    assert start, f"no stage {stage}"
    following = re.search(r"^FROM\s", text[start.end():], re.MULTILINE)
    return text[start.start(): start.end() + following.start()] if following else text[start.start():]


# ------------------------------------------------------------------------------ KubeRay manifests


@pytest.mark.parametrize(
    ("path", "kind"),
    [(RAYCLUSTER, "RayCluster"), (RAYJOB_TRAIN, "RayJob"), (RAYCRONJOB, "RayCronJob")],
    ids=lambda value: value.name if isinstance(value, Path) else value,
)
def test_kuberay_manifest_validates_against_its_crd(path: Path, kind: str) -> None:
    (obj,) = docs(path)
    assert obj["kind"] == kind
    assert crd_errors(obj) == []


def test_nightly_rayjob_in_the_cronjob_configmap_validates_against_the_rayjob_crd() -> None:
    assert crd_errors(render_nightly_rayjob()) == []


def test_crd_version_used_is_the_served_and_stored_one() -> None:
    for kind in CRD_FILES:
        api_version, schema = crd_schema(kind)
        assert api_version == "ray.io/v1"
        assert schema["properties"]["spec"]["type"] == "object"


# negative: each is a mistake that a real API server (or the operator) rejects


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def test_a_typo_in_a_field_name_is_rejected_even_where_jsonschema_alone_accepts_it() -> None:
    obj = one(RAYCLUSTER, "RayCluster")
    _rename(obj["spec"]["headGroupSpec"], "rayStartParams", "rayStartParam")
    _, schema = crd_schema("RayCluster")
    assert schema_errors(obj, schema) == [], "the CRD schema alone lets the typo through"
    assert "spec.headGroupSpec.rayStartParam: unknown field" in crd_errors(obj)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: _rename(o["spec"]["workerGroupSpecs"][1], "minReplicas", "minReplica"),
         "spec.workerGroupSpecs[1].minReplica: unknown field"),
        (lambda o: _rename(o["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0], "resources", "resource"),
         "spec.workerGroupSpecs[1].template.spec.containers[0].resource: unknown field"),
        (lambda o: _rename(o["spec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
         "spec.enableInTreeAutoScaling: unknown field"),
        (lambda o: o["spec"]["workerGroupSpecs"][1].update(maxReplicas="8"), "is not of type 'integer'"),
        (lambda o: o["spec"]["authOptions"].update(mode="Token"), "is not one of ['disabled', 'token']"),
        (lambda o: o["spec"]["workerGroupSpecs"][1].update(maxReplicas=2**31), "is not a 'int32'"),
        (lambda o: o.update(apiVersion="ray.io/v1alpha1"), "apiVersion 'ray.io/v1alpha1'"),
        (lambda o: o["metadata"].update(name="ichd_ray"), "is not a DNS-1035 label"),
        (lambda o: o["spec"]["workerGroupSpecs"][1].update(minReplicas=9), "minReplicas 9 > maxReplicas 8"),
        (lambda o: o["spec"].update(rayVersion="2.51.0"), "token auth needs rayVersion >= 2.52.0"),
        (lambda o: o["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": "4"})
         or o["spec"]["workerGroupSpecs"][0].update(resources={"CPU": "4"}), "resources set both"),
        (lambda o: o["spec"]["headGroupSpec"]["template"]["spec"].update(restartPolicy="Always"),
         "restartPolicy must be Never or unset with autoscaler v2"),
        (lambda o: o["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0].update(
            imagePullPolicy="Sometimes"), "imagePullPolicy 'Sometimes'"),
        (lambda o: o["spec"]["workerGroupSpecs"][1]["template"]["spec"]["volumes"].pop(),
         "volumeMount 'dshm' names no volume"),
        (lambda o: o["spec"]["workerGroupSpecs"][1]["template"]["spec"]["tolerations"][0].update(operator="Exist"),
         "toleration operator 'Exist'"),
    ],
    ids=["minReplica", "container-resource", "enableInTreeAutoScaling", "string-replicas", "auth-enum",
         "int32-overflow", "old-apiversion", "bad-name", "min-gt-max", "auth-old-ray", "double-resources",
         "restart-policy", "pull-policy", "missing-volume", "toleration-operator"],
)
def test_raycluster_mistakes_are_rejected(mutate, expected: str) -> None:
    obj = one(RAYCLUSTER, "RayCluster")
    mutate(obj)
    errors = crd_errors(obj)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: _rename(o["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
         "spec.shutdownAfterJobFinish: unknown field"),
        (lambda o: _rename(o["spec"]["rayClusterSpec"]["headGroupSpec"], "rayStartParams", "rayStartParam"),
         "spec.rayClusterSpec.headGroupSpec.rayStartParam: unknown field"),
        (lambda o: o["spec"].update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"),
        (lambda o: o["spec"].update(activeDeadlineSeconds=0), "activeDeadlineSeconds must be positive"),
        (lambda o: o["spec"].update(runtimeEnvYAML="working_dir: [unclosed"), "runtimeEnvYAML: not YAML"),
        (lambda o: o["spec"]["rayClusterSpec"]["authOptions"].update(enableK8sTokenAuth=True),
         "K8s token auth is not supported for RayJob"),
        (lambda o: o["metadata"].update(name="ichd-train-" + "x" * 40), "longer than KubeRay's 47"),
    ],
    ids=["shutdownAfterJobFinish", "nested-typo", "ttl-without-shutdown", "deadline-zero", "runtime-env",
         "k8s-token-auth", "long-name"],
)
def test_rayjob_mistakes_are_rejected(mutate, expected: str) -> None:
    obj = one(RAYJOB_TRAIN, "RayJob")
    mutate(obj)
    errors = crd_errors(obj)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: o["spec"].update(schedule="0 2 * *"), "4 fields, expected 5"),
        (lambda o: o["spec"].update(schedule="0 25 * * *"), "outside 0-23"),
        (lambda o: o["spec"].update(schedule="CRON_TZ=UTC 0 2 * * *"), "use timeZone"),
        (lambda o: o["spec"].update(timeZone="Mars/Olympus"), "not an IANA time zone"),
        (lambda o: o["spec"].update(concurrencyPolicy="Forbid"), "spec.concurrencyPolicy: unknown field"),
        (lambda o: o["metadata"].update(name="ichd-nightly-" + "x" * 30), "longer than KubeRay's 41"),
    ],
    ids=["four-fields", "hour-25", "cron-tz", "bad-zone", "no-concurrency-policy-in-crd", "long-name"],
)
def test_raycronjob_mistakes_are_rejected(mutate, expected: str) -> None:
    obj = one(RAYCRONJOB, "RayCronJob")
    mutate(obj)
    errors = crd_errors(obj)
    assert any(expected in error for error in errors), errors


def test_duplicate_yaml_keys_are_rejected() -> None:
    text = RAYCLUSTER.read_text().replace("  enableInTreeAutoscaling: true\n", "  enableInTreeAutoscaling: true\n  enableInTreeAutoscaling: false\n", 1)
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'enableInTreeAutoscaling'"):
        load_docs(text)


# project policy on every Ray cluster (long-lived, training, nightly)


@pytest.mark.parametrize("label_obj", kuberay_objects(), ids=lambda lo: lo[0])
def test_ray_clusters_follow_the_cluster_policy(label_obj) -> None:
    label, obj = label_obj
    for cluster in ray_cluster_specs(obj):
        assert cluster["rayVersion"] == _pin("ray") == dockerfile_args()["RAY_VERSION"], label
        assert cluster["authOptions"]["mode"] == "token", f"{label}: token authentication must be on"
        assert cluster["enableInTreeAutoscaling"] is True, label
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{label}: no work on the head"
        gpu_groups = [g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in
                      g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        cpu_groups = [g for g in cluster["workerGroupSpecs"] if g not in gpu_groups]
        assert gpu_groups and cpu_groups, f"{label}: a CPU (decode) and a GPU worker group"
        for group in gpu_groups:
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, f"{label}: GPUs scale from 0"
            tolerations = group["template"]["spec"].get("tolerations") or []
            assert any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists" for t in tolerations), label
        autoscaler = cluster["autoscalerOptions"]["resources"]
        assert autoscaler["requests"] == autoscaler["limits"], f"{label}: autoscaler requests != limits"


def _pod_owners() -> list[tuple[str, dict]]:
    return [(label, obj) for label, obj in all_manifest_objects() if obj["kind"] in (*CRD_FILES, "CronJob")]


@pytest.mark.parametrize("label_obj", _pod_owners(), ids=lambda lo: f"{lo[0]}:{lo[1]['kind']}")
def test_every_container_requests_equal_limits_and_runs_as_non_root(label_obj) -> None:
    label, obj = label_obj
    for where, pod in pod_specs(obj):
        security = pod.get("securityContext") or {}
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) > 0, f"{label} {where}"
        for container in _containers(pod):
            resources = container.get("resources") or {}
            assert resources.get("limits"), f"{label} {where} {container['name']}: no limits"
            assert resources.get("requests") == resources["limits"], f"{label} {where} {container['name']}"
            assert (container.get("securityContext") or {}).get("allowPrivilegeEscalation") is False, container["name"]


@pytest.mark.parametrize("label_obj", kuberay_objects(), ids=lambda lo: lo[0])
def test_credentials_come_from_secrets(label_obj) -> None:
    label, obj = label_obj
    for where, pod in pod_specs(obj):
        if where == "submitterPodTemplate":
            continue  # KubeRay injects the token; the submitter needs no data credentials
        for container in _containers(pod):
            env = {item["name"]: item for item in container.get("env") or []}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ICHD_PATIENT_SALT"):
                assert name in env, f"{label} {where}: {name} missing"
            for name in SECRET_ENV & env.keys():
                assert "value" not in env[name] and "secretKeyRef" in env[name].get("valueFrom", {}), (
                    f"{label} {where}: {name} must come from a Secret"
                )


def test_the_long_lived_cluster_uses_its_own_token_secret_and_jobs_a_generated_one() -> None:
    assert one(RAYCLUSTER, "RayCluster")["spec"]["authOptions"] == {"mode": "token", "secretName": "ichd-ray-auth-token"}
    for _, obj in kuberay_objects():
        if obj["kind"] != "RayCluster":
            assert ray_cluster_specs(obj)[0]["authOptions"] == {"mode": "token"}


def test_training_and_nightly_jobs_clean_up_and_are_bounded() -> None:
    train = one(RAYJOB_TRAIN, "RayJob")["spec"]
    nightly = one(RAYCRONJOB, "RayCronJob")["spec"]["jobTemplate"]
    for spec in (train, nightly):
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
    assert nightly["backoffLimit"] == 0, "exit code 75 (lease held) must not be retried the same night"
    assert nightly["activeDeadlineSeconds"] < 24 * 3600, "a night's run must end before the next one"


def test_nightly_rayjob_is_the_same_for_raycronjob_and_cronjob() -> None:
    assert render_nightly_rayjob()["spec"] == one(RAYCRONJOB, "RayCronJob")["spec"]["jobTemplate"]


# ------------------------------------------------------------------------------ entrypoints


def _entrypoints() -> list[tuple[str, str]]:
    return [
        ("rayjob-train", one(RAYJOB_TRAIN, "RayJob")["spec"]["entrypoint"]),
        ("raycronjob-nightly", one(RAYCRONJOB, "RayCronJob")["spec"]["jobTemplate"]["entrypoint"]),
        ("cronjob-nightly", render_nightly_rayjob()["spec"]["entrypoint"]),
    ]


def test_entrypoints_are_the_documented_commands() -> None:
    entry = dict(_entrypoints())
    assert entry["rayjob-train"] == (
        "python jobs/train.py all --data s3://BUCKET/rsna/train --labels s3://BUCKET/rsna/labels.csv "
        "--out s3://BUCKET/models/ --recipe rsna1st"
    )
    nightly = ("python jobs/nightly.py --archive s3://BUCKET/archive/ --model s3://BUCKET/models/current/ "
               "--out s3://BUCKET/results/")
    assert entry["raycronjob-nightly"] == entry["cronjob-nightly"] == nightly


def test_entrypoint_scripts_are_shipped_in_the_image_working_dir() -> None:
    """`python jobs/<x>.py` resolves: the image copies jobs/ to /home/ray/app/jobs and every RayJob's
    runtime env makes /home/ray/app its working_dir."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY --from=src\b.*\s/src/jobs\s+/home/ray/app/jobs\s*$", text, re.MULTILINE)
    for label, spec in [("train", one(RAYJOB_TRAIN, "RayJob")["spec"]),
                        ("nightly", one(RAYCRONJOB, "RayCronJob")["spec"]["jobTemplate"])]:
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/home/ray/app"}, label


def test_jobs_score_exists() -> None:
    assert (ROOT / "jobs" / "score.py").is_file()


@pytest.mark.parametrize("label_entrypoint", _entrypoints(), ids=lambda le: le[0])
def test_entrypoint_script_exists(label_entrypoint) -> None:
    label, entrypoint = label_entrypoint
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), entrypoint
    assert (ROOT / argv[1]).is_file(), f"{label} runs {argv[1]}, which is not in the repository"


@pytest.mark.parametrize("label_entrypoint", _entrypoints(), ids=lambda le: le[0])
def test_entrypoint_arguments_parse_with_the_cli(label_entrypoint) -> None:
    """jobs/<x>.py takes the arguments of `ichd-ray <x>`: where that subcommand exists, they must parse."""
    from ichd_ray.cli import build_parser

    label, entrypoint = label_entrypoint
    argv = shlex.split(entrypoint)
    command = Path(argv[1]).stem
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert command in subcommands.choices, f"{label} runs jobs/{command}.py but `ichd-ray {command}` does not exist"
    parser.parse_args([command, *argv[2:]])


# ------------------------------------------------------------------------------ the plain CronJob

# batch/v1 and the other core objects the file uses: the fields Kubernetes defines for them
_CRONJOB_SPEC_FIELDS = {"schedule", "timeZone", "startingDeadlineSeconds", "concurrencyPolicy", "suspend",
                        "jobTemplate", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"}
_JOB_SPEC_FIELDS = {"parallelism", "completions", "activeDeadlineSeconds", "podFailurePolicy", "successPolicy",
                    "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes", "selector", "manualSelector",
                    "template", "ttlSecondsAfterFinished", "completionMode", "suspend", "podReplacementPolicy",
                    "managedBy"}
_TOP_FIELDS = {
    "ServiceAccount": {"apiVersion", "kind", "metadata", "secrets", "imagePullSecrets", "automountServiceAccountToken"},
    "Role": {"apiVersion", "kind", "metadata", "rules"},
    "RoleBinding": {"apiVersion", "kind", "metadata", "subjects", "roleRef"},
    "ConfigMap": {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"},
    "CronJob": {"apiVersion", "kind", "metadata", "spec"},
}
_API_VERSIONS = {"ServiceAccount": "v1", "ConfigMap": "v1", "Role": "rbac.authorization.k8s.io/v1",
                 "RoleBinding": "rbac.authorization.k8s.io/v1", "CronJob": "batch/v1"}


def cronjob_errors(objects: list[dict]) -> list[str]:
    """What the API server would reject in cronjob-nightly.yaml, and our rules for it."""
    errors: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        kind = obj.get("kind")
        by_kind.setdefault(kind, []).append(obj)
        if kind not in _TOP_FIELDS:
            errors.append(f"unexpected kind {kind!r}")
            continue
        if obj.get("apiVersion") != _API_VERSIONS[kind]:
            errors.append(f"{kind}: apiVersion {obj.get('apiVersion')!r}, expected {_API_VERSIONS[kind]!r}")
        errors += [f"{kind}.{key}: unknown field" for key in obj.keys() - _TOP_FIELDS[kind]]
        errors += [f"{kind}: {e}" for e in metadata_errors(obj.get("metadata"), kind)]
        if (obj.get("metadata") or {}).get("namespace") != "ichd-ray":
            errors.append(f"{kind}: namespace must be ichd-ray")
    (cron,) = by_kind.get("CronJob") or [None]
    if cron is None:
        return errors + ["no CronJob"]
    spec = cron.get("spec") or {}
    errors += [f"CronJob.spec.{key}: unknown field" for key in spec.keys() - _CRONJOB_SPEC_FIELDS]
    errors += cron_errors(str(spec.get("schedule", "")))
    errors += timezone_errors(spec.get("timeZone", "Etc/UTC"))
    if spec.get("concurrencyPolicy") != "Forbid":
        errors.append("CronJob.spec.concurrencyPolicy must be Forbid")
    job = (spec.get("jobTemplate") or {}).get("spec") or {}
    errors += [f"CronJob.spec.jobTemplate.spec.{key}: unknown field" for key in job.keys() - _JOB_SPEC_FIELDS]
    template = job.get("template") or {}
    # the core/v1 PodTemplateSpec schema, as embedded in the RayJob CRD (submitterPodTemplate)
    _, rayjob_schema = crd_schema("RayJob")
    pod_template_schema = rayjob_schema["properties"]["spec"]["properties"]["submitterPodTemplate"]
    errors += [f"pod template: {e}" for e in schema_errors(template, pod_template_schema)]
    errors += [f"pod template: {p}: unknown field" for p in unknown_fields(template, pod_template_schema)]
    pod = template.get("spec") or {}
    errors += pod_errors(pod, "pod template")
    if pod.get("restartPolicy") not in ("OnFailure", "Never"):
        errors.append("pod restartPolicy must be OnFailure or Never")
    containers = pod.get("containers") or []
    if not containers or not containers[0].get("image") or not containers[0].get("command"):
        errors.append("containers[0] needs an image and a command")
    # RBAC: the pod's ServiceAccount may get and create RayJobs, nothing else
    accounts = {sa["metadata"]["name"] for sa in by_kind.get("ServiceAccount", [])}
    if pod.get("serviceAccountName") not in accounts:
        errors.append(f"serviceAccountName {pod.get('serviceAccountName')!r} is not defined in the file")
    roles = {role["metadata"]["name"]: role for role in by_kind.get("Role", [])}
    bound = [
        roles.get(binding["roleRef"]["name"])
        for binding in by_kind.get("RoleBinding", [])
        if binding["roleRef"].get("kind") == "Role"
        and binding["roleRef"].get("apiGroup") == "rbac.authorization.k8s.io"
        and any(s.get("kind") == "ServiceAccount" and s.get("name") == pod.get("serviceAccountName")
                and s.get("namespace") == "ichd-ray" for s in binding.get("subjects") or [])
    ]
    rules = [rule for role in bound if role for rule in role.get("rules") or []]
    if rules != [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "create"]}]:
        errors.append(f"the submitter's RBAC must be exactly get+create on ray.io rayjobs, got {rules}")
    # the RayJob template: mounted, rendered by the init container, applied by the main container
    config_maps = {cm["metadata"]["name"]: cm for cm in by_kind.get("ConfigMap", [])}
    mounted = [v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v]
    if not mounted or any(name not in config_maps or "rayjob.yaml" not in config_maps[name]["data"] for name in mounted):
        errors.append("the pod must mount the ConfigMap holding rayjob.yaml")
    init = " ".join(" ".join(c.get("command") or []) for c in pod.get("initContainers") or [])
    if "sed \"s/NIGHT/${night}/g\" /template/rayjob.yaml > /work/rayjob.yaml" not in init or "date -u +%Y%m%d" not in init:
        errors.append("the init container must render /work/rayjob.yaml with the UTC date")
    if containers and [*containers[0].get("command", []), *containers[0].get("args", [])] != [
        "kubectl", "apply", "--filename=/work/rayjob.yaml"
    ]:
        errors.append("containers[0] must `kubectl apply --filename=/work/rayjob.yaml`")
    return errors


def test_cronjob_nightly_has_its_required_fields() -> None:
    cron = one(CRONJOB, "CronJob")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["timeZone"] == "Etc/UTC"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] and pod["containers"][0]["command"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")


def test_cronjob_nightly_validates() -> None:
    assert cronjob_errors(docs(CRONJOB)) == []


def test_nightly_schedules_agree_02_utc() -> None:
    cron, raycron = one(CRONJOB, "CronJob")["spec"], one(RAYCRONJOB, "RayCronJob")["spec"]
    assert (cron["schedule"], cron["timeZone"]) == (raycron["schedule"], raycron["timeZone"]) == ("0 2 * * *", "Etc/UTC")


def test_nightly_rayjob_name_is_one_per_night() -> None:
    template = nightly_rayjob_template()
    assert template.count("NIGHT") == 2, "NIGHT only in the name and the night label"
    first, second = render_nightly_rayjob("20260102"), render_nightly_rayjob("20260103")
    assert first["metadata"]["name"] == "ichd-nightly-20260102" != second["metadata"]["name"]
    assert first["metadata"]["labels"]["ichd-ray/night"] == "20260102"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d[-1]["spec"].update(concurrencyPolicy="Allow"), "must be Forbid"),
        (lambda d: d[-1]["spec"].update(schedule="0 2 * * * *"), "6 fields"),
        (lambda d: d[-1]["spec"].update(schedule="61 2 * * *"), "outside 0-59"),
        (lambda d: d[-1]["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(restartPolicy="Always"),
         "OnFailure or Never"),
        (lambda d: _rename(d[-1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0], "image", "imagee"),
         "containers[0].imagee: unknown field"),
        (lambda d: d[-1]["spec"].update(concurrencyPolicyy="Forbid"), "CronJob.spec.concurrencyPolicyy: unknown field"),
        (lambda d: d[1]["rules"][0]["verbs"].append("delete"), "exactly get+create"),
        (lambda d: d[-1].update(apiVersion="batch/v1beta1"), "expected 'batch/v1'"),
    ],
    ids=["allow", "six-fields", "minute-61", "restart-always", "container-typo", "spec-typo", "rbac-delete",
         "old-api"],
)
def test_cronjob_mistakes_are_rejected(mutate, expected: str) -> None:
    objects = docs(CRONJOB)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"]
    mutate(objects)
    errors = cronjob_errors(objects)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("schedule", "ok"),
    [("0 2 * * *", True), ("*/15 0-6 1,15 JAN-MAR MON-FRI", True), ("0 2 ? * SUN", True), ("@daily", True),
     ("0 2 * * 7", False), ("0 2 0 * *", False), ("0 2 * * * *", False), ("0 2/0 * * *", False), ("@nightly", False)],
)
def test_cron_parser(schedule: str, ok: bool) -> None:
    assert (cron_errors(schedule) == []) is ok


# ------------------------------------------------------------------------------ images and Dockerfile


def _image_refs() -> list[tuple[str, str, bool]]:
    """(where, image, needs a GPU) for every image the infra runs."""
    refs = []
    for label, obj in _pod_owners():
        for where, pod in pod_specs(obj):
            for container in _containers(pod):
                gpu = "nvidia.com/gpu" in ((container.get("resources") or {}).get("limits") or {})
                refs.append((f"{label} {where} {container['name']}", container["image"], gpu))
    cluster = yaml.safe_load(AWS_CLUSTER.read_text())
    refs.append(("aws docker.image", cluster["docker"]["image"], False))
    for name, node_type in cluster["available_node_types"].items():
        image = (node_type.get("docker") or {}).get("worker_image")
        gpu = node_type["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "g6e", "p4d", "p5")
        if image or gpu:
            refs.append((f"aws {name}", image or cluster["docker"]["image"], gpu))
    return refs


def test_dockerfile_builds_a_cpu_and_a_gpu_target_from_the_ray_images() -> None:
    args, stages = dockerfile_args(), dockerfile_stages()
    ray = _pin("ray")
    assert f"ray[data,train,default]=={ray}" in _project()["dependencies"]
    assert args["RAY_VERSION"] == ray
    assert args["BASE_IMAGE_CPU"] == f"rayproject/ray:{ray}-py311"
    assert args["BASE_IMAGE_GPU"] == f"rayproject/ray:{ray}-py311-gpu"
    assert stages["cpu-torch"] == "${BASE_IMAGE_CPU}" and stages["gpu-torch"] == "${BASE_IMAGE_GPU}"
    assert stages["cpu"] == "cpu-torch" and stages["gpu"] == "gpu-torch"
    assert args["TORCH_VERSION"] == _pin("torch") and args["TORCHVISION_VERSION"] == _pin("torchvision")
    assert "https://download.pytorch.org/whl/cpu" in dockerfile_stage_text("cpu-torch")
    assert "download.pytorch.org/whl/cpu" not in dockerfile_stage_text("gpu-torch")
    for target in ("cpu", "gpu"):
        stage = dockerfile_stage_text(target)
        assert "pip install -c constraints.txt ." in stage, target
        users = re.findall(r"^USER\s+(\S+)\s*$", stage, re.MULTILINE)
        assert users and users[-1] == "1000:100", f"{target}: must end as the numeric non-root ray user"


def test_dockerfile_copies_only_named_paths_and_no_weights() -> None:
    text = DOCKERFILE.read_text()
    for line in re.findall(r"^(?:COPY|ADD)\s+(.+)$", text, re.MULTILINE):
        if "--from=" in line:
            continue  # from another stage, not from the build context
        sources = [p for p in line.split() if not p.startswith("--")][:-1]
        assert "." not in sources and "./" not in sources, f"whole-context copy: {line}"
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    assert not re.search(r"\.(safetensors|pth?|ckpt|onnx|bin)\b", text), "no model weights in the image"
    assert not re.search(r"(?i)huggingface|hf_hub|pretrained=True|model init", text)


def test_readme_build_commands_match_the_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    text = README.read_text()
    assert "docker build -f infra/Dockerfile --target cpu -t ichd-ray:cpu ." in text
    for source in (text, DOCKERFILE.read_text()):
        commands = re.findall(r"docker build -f infra/Dockerfile --target (\S+) -t ichd-ray:(\S+) \.", source)
        assert {target for target, _ in commands} >= {"cpu", "gpu"}
        for target, tag in commands:
            assert target == tag and target in stages


def test_images_follow_the_dockerfile_tag_naming() -> None:
    version, targets = _project()["version"], {"cpu", "gpu"} & dockerfile_stages().keys()
    assert targets == {"cpu", "gpu"}
    ours = re.compile(r"^(?:[^/]+/)*ichd-ray:(?P<version>[^-]+)-(?P<target>[a-z0-9]+)$")
    third_party = {"docker.io/library/busybox", "registry.k8s.io/kubectl"}
    for where, image, gpu in _image_refs():
        match = _IMAGE_REF.match(image)
        assert match, f"{where}: {image!r} is not a valid image reference"
        name = f"{match['domain']}/{match['path']}" if match["domain"] else match["path"]
        if name in third_party:
            assert match["tag"] and match["tag"] != "latest", f"{where}: pin {image}"
            continue
        ichd = ours.match(image)
        assert ichd, f"{where}: {image!r} is not <registry>/ichd-ray:<version>-<target>"
        assert ichd["version"] == version, f"{where}: {image} is not the package version {version}"
        assert ichd["target"] in targets, f"{where}: {image} names no Dockerfile target"
        assert ichd["target"] == ("gpu" if gpu else "cpu"), f"{where}: {image}"


# ------------------------------------------------------------------------------ AWS cluster launcher


def _ray_schema_path() -> Path:
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed: ray/autoscaler/ray-schema.json is unavailable")
    return Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"


def aws_cluster_errors(config: dict) -> list[str]:
    """Ray's schema, plus the checks of ray.autoscaler._private.util.validate_config and our rules."""
    schema = json.loads(_ray_schema_path().read_text())
    errors = schema_errors(config, schema)
    if errors:
        return errors
    types = config["available_node_types"]
    if config.get("head_node_type") not in types:
        errors.append("head_node_type must be one of available_node_types")
    if sum(t.get("min_workers", 0) for t in types.values()) > config["max_workers"]:
        errors.append("max_workers < sum of min_workers")
    if sum(t.get("max_workers", 0) for name, t in types.items() if name != config["head_node_type"]) > config["max_workers"]:
        errors.append("max_workers < sum of the worker types' max_workers")
    if config["provider"]["type"] != "aws":
        errors.append("provider.type must be aws")
    for name, node_type in types.items():
        node = node_type["node_config"]
        if "Arn" not in node.get("IamInstanceProfile", {}) and "Name" not in node.get("IamInstanceProfile", {}):
            errors.append(f"{name}: no IamInstanceProfile (S3 access must come from the instance role)")
        if (node_type.get("min_workers") or 0) > (node_type.get("max_workers") or 0) and name != config["head_node_type"]:
            errors.append(f"{name}: min_workers > max_workers")
    return errors


def test_aws_cluster_yaml_validates_against_rays_schema() -> None:
    assert aws_cluster_errors(load_docs(AWS_CLUSTER.read_text())[0]) == []


def test_aws_cluster_yaml_passes_rays_own_validate_config() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = load_docs(AWS_CLUSTER.read_text())[0]
    util.validate_config(config)
    util.validate_config(util.prepare_config(config))


def test_aws_cluster_shape() -> None:
    config = load_docs(AWS_CLUSTER.read_text())[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m6i.2xlarge" and head["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6")]
    cpu = [t for name, t in types.items() if t not in gpu and name != config["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert gpu[0]["docker"]["worker_image"].endswith("-gpu")
    assert cpu and config["docker"]["image"].endswith("-cpu")
    run_options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert "AWS_ACCESS_KEY_ID" not in run_options and "AWS_SECRET_ACCESS_KEY" not in run_options
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("ray start" in c for c in commands)


def test_aws_setup_command_is_valid_python() -> None:
    """The setup command's `python -c` program compiles (it writes the token where Ray looks for it)."""
    config = load_docs(AWS_CLUSTER.read_text())[0]
    (setup,) = config["setup_commands"]
    argv = shlex.split(setup.split("&&")[-1])
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "setup_commands", "exec")
    assert argv[3:] == ["~/.ray/auth_token", "~/.ray/patient_salt"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_worker=0), "Additional properties"),
        (lambda c: c["docker"].update(imagee="x"), "Additional properties"),
        (lambda c: c["available_node_types"]["ray.worker.gpu"].update(max_workers="8"), "is not of type 'integer'"),
        (lambda c: c.update(head_node_type="ray.head.default"), "head_node_type"),
        (lambda c: c["available_node_types"]["ray.worker.gpu"]["node_config"].pop("IamInstanceProfile"),
         "no IamInstanceProfile"),
        (lambda c: c.update(max_workers=8), "max_workers <"),
    ],
    ids=["min_worker", "docker-typo", "string-max", "unknown-head", "no-instance-profile", "max-workers"],
)
def test_aws_cluster_mistakes_are_rejected(mutate, expected: str) -> None:
    config = load_docs(AWS_CLUSTER.read_text())[0]
    mutate(config)
    errors = aws_cluster_errors(config)
    assert any(expected in error for error in errors), errors


# ------------------------------------------------------------------------------ credentials


def literal_credentials(text: str) -> list[str]:
    return _AWS_ACCESS_KEY.findall(text) + [m.group(0) for m in _AWS_SECRET_ASSIGNMENT.finditer(text)]


def test_no_literal_credentials_anywhere_in_infra() -> None:
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        assert literal_credentials(path.read_text()) == [], path
    for _, obj in all_manifest_objects():
        assert obj["kind"] != "Secret", "Secrets are created out of band (infra/README.md), never committed"


def test_the_credential_scan_finds_a_key() -> None:
    key = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documentation example, split so scanners skip this file
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert literal_credentials(f"value: {key}") == [key]
    assert literal_credentials(f"aws_secret_access_key = {secret}")
    text = RAYCLUSTER.read_text().replace(
        "valueFrom: {secretKeyRef: {name: ichd-ray-aws, key: AWS_ACCESS_KEY_ID}}", f"value: {key}", 1
    )
    assert literal_credentials(text) == [key]


# ------------------------------------------------------------------------------ README


def test_readme_covers_running_on_a_cluster() -> None:
    text = README.read_text()
    for needle in (
        "docker build -f infra/Dockerfile --target cpu -t ichd-ray:cpu .",
        "--target gpu",
        "create secret generic ichd-ray-aws",
        "create secret generic ichd-ray-auth-token",
        "create secret generic ichd-ray-patient-salt",
        "infra/k8s/raycluster.yaml",
        "RAY_AUTH_MODE=token ray job submit --address",
        "--working-dir . -- python jobs/train.py all",
        "infra/k8s/rayjob-train.yaml",
        "infra/k8s/raycronjob-nightly.yaml",
        "infra/k8s/cronjob-nightly.yaml",
        "ray up infra/aws/cluster.yaml",
        "Exit code 75",
    ):
        assert needle in text, needle
