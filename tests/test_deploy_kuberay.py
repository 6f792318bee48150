"""The deployment configs a user runs as they are, part two: the KubeRay manifests under deploy/kuberay/
(`kubectl apply`) and least privilege (non-root pods, roles, the API key). The KubeRay CRD schema is not available offline (it is not shipped in any Python package), so the
ray.io/v1 required fields and known field names are written out below by hand from KubeRay's API types
(ray-operator/apis/ray/v1/{raycluster,rayjob,rayservice}_types.go, KubeRay v1.6: the json tags without
`omitempty` are the required ones). The Serve config inside the RayService and the runtime environments are
checked with Ray's own schema classes, and the Serve app is built (not run) from the RayService's args as
`serve deploy` would. No Ray cluster is started. (cluster.yaml: tests/test_deploy_configs.py; who
reaches which pod under the network policies: tests/test_deploy_netpol.py.)"""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import yaml

from tests.deploy_files import (
    KUBERAY,
    MANIFESTS,
    RAY_IMAGE_RE,
    ROOT,
    SERVICE_ACCOUNTS,
    _cluster_spec,
    _expected_pip,
    _manifest,
    _module_file,
    _pinned_ray_version,
)

# --------------------------------------------------------------------------------------------------
# KubeRay manifests (ray.io/v1)
# --------------------------------------------------------------------------------------------------

# Field names from KubeRay's Go API types (json tags), to catch misspellings that the API server would
# otherwise drop or refuse. Extend when a newer KubeRay field is used on purpose.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "deletionPolicy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYSERVICE_SPEC_FIELDS = {
    "rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
    "serveService", "upgradeStrategy", "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc",
}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
    "historyServerOptions", "networkPolicy", "tlsOptions",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                     "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
                       "numOfHosts"}
AUTH_MODES = {"disabled", "token"}


def _raycluster_problems(spec: dict) -> list[str]:
    """Required fields and known names of a RayClusterSpec, as KubeRay's CRD declares them."""
    problems = [f"unknown RayClusterSpec field {k!r}" for k in set(spec) - RAYCLUSTER_SPEC_FIELDS]
    if "authOptions" in spec and spec["authOptions"].get("mode", "token") not in AUTH_MODES:
        problems.append(f"authOptions.mode {spec['authOptions']['mode']!r}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [*problems, "headGroupSpec missing"]
    problems += [f"unknown headGroupSpec field {k!r}" for k in set(head) - HEAD_GROUP_FIELDS]
    problems += _pod_template_problems("headGroupSpec", head)
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        where = f"workerGroupSpecs[{i}]"
        problems += [f"unknown {where} field {k!r}" for k in set(group) - WORKER_GROUP_FIELDS]
        for field in ("groupName", "minReplicas", "maxReplicas"):
            if field not in group:
                problems.append(f"{where}.{field} missing")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= group.get("replicas", lo) <= hi):
            problems.append(f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas")
        problems += _pod_template_problems(where, group)
    return problems


def _pod_template_problems(where: str, group: dict) -> list[str]:
    problems = []
    # rayStartParams is required by the CRDs before KubeRay 1.4; `{}` is always accepted.
    if not isinstance(group.get("rayStartParams"), dict):
        problems.append(f"{where}.rayStartParams missing")
    elif any(not isinstance(v, str) for v in group["rayStartParams"].values()):
        problems.append(f"{where}.rayStartParams values must be strings")
    containers = (group.get("template") or {}).get("spec", {}).get("containers") or []
    if not containers:
        problems.append(f"{where}.template.spec.containers missing")
    for c in containers:
        if not c.get("name") or not c.get("image"):
            problems.append(f"{where}: every container needs a name and an image")
    return problems


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _gpu_limit(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in group["template"]["spec"]["containers"])


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_has_the_fields_kuberay_requires(name):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == MANIFESTS[name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    known = RAYJOB_SPEC_FIELDS if doc["kind"] == "RayJob" else RAYSERVICE_SPEC_FIELDS
    assert not set(doc["spec"]) - known, f"unknown spec fields {set(doc['spec']) - known}"
    spec = _cluster_spec(doc)
    assert _raycluster_problems(spec) == []
    assert spec["rayVersion"] == _pinned_ray_version() == "2.60.0"
    # GPU work runs on a worker group with nvidia.com/gpu limits; requests, when given, equal limits
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpu_limit(g) >= 1]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    for c in _containers(spec):
        res = c.get("resources", {})
        if "nvidia.com/gpu" in res.get("requests", {}):
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]


def test_the_hand_written_check_catches_broken_specs():
    spec = _cluster_spec(_manifest("train-rayjob.yaml"))
    assert _raycluster_problems(copy.deepcopy(spec)) == []
    broken = copy.deepcopy(spec)
    del broken["workerGroupSpecs"][0]["groupName"]
    broken["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")
    broken["workerGroupSpecs"][0]["maxReplica"] = broken["workerGroupSpecs"][0].pop("maxReplicas")
    problems = _raycluster_problems(broken)
    assert "workerGroupSpecs[0].groupName missing" in problems
    assert "workerGroupSpecs[0].maxReplicas missing" in problems
    assert "unknown workerGroupSpecs[0] field 'maxReplica'" in problems
    assert "headGroupSpec: every container needs a name and an image" in problems


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_run_the_ray_2_60_image_with_token_auth_and_irsa(name):
    doc = _manifest(name)
    spec = _cluster_spec(doc)
    for c in _containers(spec):
        match = RAY_IMAGE_RE.match(c["image"])
        assert match and match["version"] == "2.60.0" and match["py"] == "311", c["image"]
        for env in c.get("env", []):  # no literal secrets: only plain settings or secretKeyRef
            assert "KEY" not in env["name"] or "valueFrom" in env, env
    assert spec["authOptions"]["mode"] == "token"
    # S3 through the job's own IRSA-annotated ServiceAccount (train, label and serve have different rights)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert {g["template"]["spec"].get("serviceAccountName") for g in groups} == {SERVICE_ACCOUNTS[name]}
    readme = (KUBERAY / "README.md").read_text()
    assert "eks.amazonaws.com/role-arn" in readme and SERVICE_ACCOUNTS[name] in readme


def _entrypoint_module(command: str) -> str:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    return argv[2]


def _flags(command: str) -> dict[str, str | bool]:
    argv, out = shlex.split(command), {}
    for i, tok in enumerate(argv):
        if tok.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[tok[2:]] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


@pytest.mark.parametrize("name,module", [("train-rayjob.yaml", "jobs.train"), ("label-rayjob.yaml", "jobs.label")])
def test_rayjob_runs_a_module_of_this_repository_and_cleans_up(name, module):
    spec = _manifest(name)["spec"]
    assert _entrypoint_module(spec["entrypoint"]) == module
    assert _module_file(module).is_file(), f"{module} named in {name} does not exist"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0


def test_train_rayjob_has_a_gpu_for_every_training_worker():
    spec = _manifest("train-rayjob.yaml")["spec"]
    flags = _flags(spec["entrypoint"])
    assert flags["gpu"] is True
    gpus = sum(g["maxReplicas"] * _gpu_limit(g) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= int(flags["workers"])
    for flag in ("model", "data", "storage", "name", "output"):
        assert flag in flags, flag


def test_label_rayjob_can_grow_to_the_largest_actor_pool():
    spec = _manifest("label-rayjob.yaml")["spec"]
    flags = _flags(spec["entrypoint"])
    gpus = sum(g["maxReplicas"] * _gpu_limit(g) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= int(flags["max-actors"]) * float(flags["gpus-per-actor"])
    assert int(flags["min-actors"]) <= int(flags["max-actors"])
    for flag in ("checkpoint", "input", "output"):
        assert flag in flags, flag


def _check_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own validation (e.g. a remote working_dir must be a .zip)
    # the code lives in its own bucket, which no job role can write (README: roles)
    assert re.match(r"s3://YOUR_CODE_BUCKET/.+\.zip$", env["working_dir"]), env["working_dir"]
    assert "FACEATTR_API_KEY" not in env.get("env_vars", {})  # the dashboard shows runtime_env env_vars
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert {p.replace(" ", "") for p in pip} == _expected_pip()


@pytest.mark.parametrize("name", ["train-rayjob.yaml", "label-rayjob.yaml"])
def test_rayjob_runtime_env_ships_the_code_and_the_projects_dependencies(name):
    _check_runtime_env(yaml.safe_load(_manifest(name)["spec"]["runtimeEnvYAML"]))


def _serve_config() -> dict:
    return yaml.safe_load(_manifest("serve-rayservice.yaml")["spec"]["serveConfigV2"])


def _unknown_serve_keys(config: dict) -> list[str]:
    """Serve's schema ignores unknown keys, so a misspelled option would be dropped silently."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    def extra(where, d, cls):
        return [f"{where}.{k}" for k in set(d) - set(cls.model_fields)]

    out = extra("config", config, ServeDeploySchema)
    for i, app in enumerate(config.get("applications", [])):
        out += extra(f"applications[{i}]", app, ServeApplicationSchema)
        for j, dep in enumerate(app.get("deployments", [])):
            out += extra(f"applications[{i}].deployments[{j}]", dep, DeploymentSchema)
            out += extra(f"applications[{i}].deployments[{j}].autoscaling_config",
                         dep.get("autoscaling_config") or {}, AutoscalingConfig)
    return out


def test_rayservice_serve_config_is_valid_for_ray_serve_2_60():
    from ray.serve.schema import ServeDeploySchema

    config = _serve_config()
    schema = ServeDeploySchema.model_validate(config)  # Serve's own validation of a `serve deploy` file
    assert _unknown_serve_keys(config) == []
    (app,) = schema.applications
    assert app.import_path == "raytasks.serve:build_app"
    assert _module_file("raytasks.serve").is_file()
    assert app.route_prefix == "/"
    assert schema.http_options.port == 8000
    models = app.args["models"]
    assert models and all(re.match(r"s3://.+\.pt$", uri) for uri in models.values())
    _check_runtime_env(app.runtime_env)
    broken = copy.deepcopy(config)
    broken["applications"][0]["routeprefix"] = "/"
    assert _unknown_serve_keys(broken) == ["applications[0].routeprefix"]
    broken["applications"][0]["import_pth"] = broken["applications"][0].pop("import_path")
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        ServeDeploySchema.model_validate(broken)


def test_rayservice_app_builds_gpu_replicas_that_fit_the_cluster():
    """Build the application from the config's args exactly as Serve does on the cluster (no Ray needed:
    checkpoints load in the replicas, not at build time), then check what a user relies on: every model
    replica gets a GPU, and the GPU worker group can hold the largest number of replicas."""
    from ray.serve._private.build_app import build_app as build_serve_app  # what `serve deploy` runs

    from raytasks.serve import ServeArgs, build_app

    (app_config,) = _serve_config()["applications"]
    args = app_config["args"]
    ServeArgs.model_validate(args)  # the app's own argument schema (unknown keys are refused)
    built = build_serve_app(build_app(args), name=app_config["name"])
    deployments = {d.name: d for d in built.deployments}
    assert set(deployments) == {"FaceAttrAPI", *(f"model-{m}" for m in args["models"])}

    gpus_needed = 0.0
    for name in args["models"]:
        dep = deployments[f"model-{name}"]
        assert dep.ray_actor_options["num_gpus"] >= 1, name
        config = dep._deployment_config
        assert config.max_ongoing_requests >= 1 and config.max_queued_requests >= 1
        most = config.autoscaling_config.max_replicas if config.autoscaling_config else config.num_replicas
        gpus_needed += most * dep.ray_actor_options["num_gpus"]
    cluster = _manifest("serve-rayservice.yaml")["spec"]["rayClusterConfig"]
    gpus = sum(g["maxReplicas"] * _gpu_limit(g) for g in cluster["workerGroupSpecs"])
    assert gpus_needed <= gpus, f"replicas want {gpus_needed} GPUs, the worker groups offer {gpus}"


def test_rayservice_exposes_serve_and_passes_the_api_key_from_a_secret():
    doc = _manifest("serve-rayservice.yaml")
    spec = doc["spec"]["rayClusterConfig"]
    head_ports = {p["containerPort"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
                  for p in c.get("ports", [])}
    assert {6379, 8265, 8000} <= head_ports
    for c in _containers(spec):
        (api_key,) = [e for e in c.get("env", []) if e["name"] == "FACEATTR_API_KEY"]
        assert "secretKeyRef" in api_key["valueFrom"]
    assert spec["enableInTreeAutoscaling"] is True  # Serve autoscaling needs pods to grow into


def test_readme_explains_every_placeholder():
    readme = (KUBERAY / "README.md").read_text()
    text = "\n".join((KUBERAY / name).read_text() for name in MANIFESTS)
    for placeholder in set(re.findall(r"YOUR_[A-Z_]+|GIT_SHA|<[A-Z_]+>", text)):
        assert placeholder in readme, placeholder


# --------------------------------------------------------------------------------------------------
# Least privilege (issue #13 item 13): non-root pods, roles, the API key (network policies: test_deploy_netpol.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_pods_run_unprivileged(name):
    spec = _cluster_spec(_manifest(name))
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = g["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        assert g["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == name.split("-")[0]
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("privileged") and "add" not in sc["capabilities"]


def test_roles_are_split_and_the_code_bucket_is_not_writable_by_serve():
    readme = (KUBERAY / "README.md").read_text()
    (table,) = re.findall(r"\| role \| ServiceAccount \|.*?\n\n", readme, re.S)
    rows = {r.split("|")[2].strip(" `"): r for r in table.strip().splitlines()[2:]}
    assert set(rows) == set(SERVICE_ACCOUNTS.values())
    assert "models/" in rows["faceattr-serve"] and "write" not in rows["faceattr-serve"].split("|")[4]
    for sa, row in rows.items():
        assert "YOUR_CODE_BUCKET" not in row.split("|")[4], f"{sa} may write the code bucket"


def test_the_api_key_is_never_put_in_a_runtime_env():
    """The dashboard shows every runtime_env's env_vars: the key comes from a Secret in the containers'
    environment, and both docs say so (they used to disagree)."""
    (app,) = _serve_config()["applications"]
    assert "FACEATTR_API_KEY" not in (app.get("runtime_env") or {}).get("env_vars", {})
    section = (ROOT / "docs" / "api.md").read_text().split("## API key", 1)[1].split("\n## ", 1)[0]
    assert "runtime_env.env_vars` in a Serve config" not in section  # the old advice
    for text in (section, (ROOT / "docs" / "deploy.md").read_text()):
        assert "never in a `runtime_env`" in text
