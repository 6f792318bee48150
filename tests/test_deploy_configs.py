"""The deployment configs a user runs as they are, part one: cluster.yaml (`ray up`, AWS), no credentials in any
deployment file, and the commands of docs/deploy.md. The KubeRay manifests under deploy/kuberay/ (`kubectl
apply`): tests/test_deploy_kuberay.py.

cluster.yaml goes through the cluster launcher's own code path (`prepare_config` fills in the AWS defaults,
`validate_config` checks Ray's JSON schema), and each node_config is checked against botocore's model of
EC2 RunInstances, which is what the launcher hands it to. No Ray cluster is started.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.deploy_files import (
    CLUSTER_YAML,
    DEPLOY_FILES,
    KUBERAY,
    RAY_IMAGE_RE,
    ROOT,
    _expected_pip,
    _module_file,
    _pinned_ray_version,
)


def _load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _launcher_validate(config: dict) -> dict:
    """What `ray up` does before it touches AWS: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --------------------------------------------------------------------------------------------------
# cluster.yaml (Ray cluster launcher, AWS)
# --------------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_the_launchers_validation():
    prepared = _launcher_validate(_load_cluster())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _misspelled_top_level_key(c):
    c["setup_comands"] = c.pop("setup_commands")


def _misspelled_node_type_key(c):
    c["available_node_types"]["gpu_worker"]["min_worker"] = c["available_node_types"]["gpu_worker"].pop(
        "min_workers")


def _unknown_head_node_type(c):
    c["head_node_type"] = "no_such_type"


def _min_workers_above_global_cap(c):
    c["max_workers"] = 0
    c["available_node_types"]["gpu_worker"]["min_workers"] = 1


def _unknown_docker_key(c):
    c["docker"]["run_option"] = c["docker"].pop("run_options")


@pytest.mark.parametrize("break_it", [_misspelled_top_level_key, _misspelled_node_type_key,
                                      _unknown_head_node_type, _min_workers_above_global_cap,
                                      _unknown_docker_key])
def test_cluster_yaml_validation_rejects_a_broken_copy(break_it):
    """The validation above can fail: a broken copy of the same file is refused."""
    import jsonschema

    broken = _load_cluster()
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _launcher_validate(broken)


def test_cluster_node_configs_are_valid_ec2_run_instances_arguments():
    """The launcher passes node_config to EC2 RunInstances; botocore's model of that call catches a
    misspelled field (InstanceTyp, IamInstanceProfile.arn) before AWS does."""
    import botocore.session
    from botocore.validate import ParamValidator

    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    validator = ParamValidator()
    for name, node_type in _load_cluster()["available_node_types"].items():
        report = validator.validate({**node_type["node_config"], "MinCount": 1, "MaxCount": 1},
                                    run_instances.input_shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    broken = validator.validate({"InstanceTyp": "g5.2xlarge", "MinCount": 1, "MaxCount": 1},
                                run_instances.input_shape)
    assert broken.has_errors()


def test_cluster_has_an_autoscaling_gpu_worker_type_and_a_head_that_keeps_work_off_it():
    config = _load_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # tasks/actors go to the workers
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])  # no GPU paid for on the head

    gpu_types = {n: t for n, t in types.items()
                 if n != config["head_node_type"] and re.match(r"g[56]\.", t["node_config"]["InstanceType"])}
    assert gpu_types, "no g5/g6 worker type"
    for name, t in gpu_types.items():
        assert isinstance(t["min_workers"], int) and isinstance(t["max_workers"], int), name
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        # the global cap must not cut the type's own maximum (4 GPU workers for `--workers 4 --gpu`)
        assert t["max_workers"] <= config["max_workers"], name
    assert max(t["max_workers"] for t in gpu_types.values()) >= 4


def test_cluster_runs_the_ray_2_60_python_3_11_gpu_image():
    import ray

    docker = _load_cluster()["docker"]
    match = RAY_IMAGE_RE.match(docker["image"])
    assert match, docker["image"]
    assert match["version"] == ray.__version__ == _pinned_ray_version() == "2.60.0"
    assert match["py"] == "311"
    assert docker["container_name"]
    assert "head_image" not in docker and "worker_image" not in docker  # one image, one environment


def test_cluster_reaches_s3_through_instance_profiles_and_keeps_token_auth_on():
    config = _load_cluster()
    for name, t in config["available_node_types"].items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@-]+", arn), (name, arn)
    run_options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    # the token made by `ray get-auth-token --generate` reaches every node
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # pyarrow's S3 filesystem gets the region of the cluster (and so of the bucket)
    assert f"AWS_REGION={config['provider']['region']}" in run_options


def test_cluster_installs_this_repository_and_starts_ray_the_standard_way():
    config = _load_cluster()
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert any(re.search(rf"pip install .*-e {re.escape(remote)}\b", cmd) for cmd in config["setup_commands"])
    assert ".gitignore" in config["rsync_filter"]  # .venv and caches stay on the laptop
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert config["provider"]["cache_stopped_nodes"] in (True, False)


# --------------------------------------------------------------------------------------------------
# Secrets: none, in any deployment file
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_credentials_in_deployment_files(path):
    text = path.read_text()
    for needle in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY=",
                   "RAY_AUTH_MODE=disabled"):
        assert needle not in text, f"{path.name} contains {needle}"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name} contains an AWS access key id"


# --------------------------------------------------------------------------------------------------
# docs/deploy.md
# --------------------------------------------------------------------------------------------------


def test_deploy_doc_commands_name_real_modules_and_the_projects_dependencies():
    import json

    text = (ROOT / "docs" / "deploy.md").read_text() + (KUBERAY / "README.md").read_text()
    modules = set(re.findall(r"python -m ((?:jobs|raytasks)\.\w+)", text))
    assert {"jobs.train", "jobs.label", "jobs.serve"} <= modules
    for module in modules:
        assert _module_file(module).is_file(), f"the docs run {module}, which does not exist"
    (env,) = re.findall(r"--runtime-env-json '(\{\"pip\".*?\})'", text)
    assert {p.replace(" ", "") for p in json.loads(env)["pip"]} == _expected_pip()
    for command in ("ray up cluster.yaml", "ray attach cluster.yaml", "ray dashboard cluster.yaml",
                    "ray down cluster.yaml", "ray job logs", "ray job status", "RAY_AUTH_MODE=token"):
        assert command in text, command


def test_make_cluster_up_refuses_a_placeholder_left_and_runs_ray_up_once_none_is(tmp_path):
    """Ray's own checks accept <ACCOUNT_ID> and <RAY_IMAGE_DIGEST> (`ray up` then goes on to AWS with them), so
    `make cluster-up` refuses the file while one is left outside a comment, naming its line, and runs nothing."""
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ray").write_text('#!/bin/sh\necho "ray $*"\n')
    (fake / "ray").chmod(0o755)

    def make(cluster):
        return subprocess.run(["make", "-s", "cluster-up", f"CLUSTER={cluster}", f"RAY={fake / 'ray'}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    r = make(CLUSTER_YAML)  # the file as shipped: its placeholders are still there
    assert r.returncode != 0 and "ray up" not in r.stdout
    assert "fill in the placeholders" in r.stderr and "<RAY_IMAGE_DIGEST>" in r.stdout and "<ACCOUNT_ID>" in r.stdout
    filled = tmp_path / "cluster.yaml"
    filled.write_text(CLUSTER_YAML.read_text().replace("<ACCOUNT_ID>", "123456789012")
                      .replace("<RAY_IMAGE_DIGEST>", "0" * 64))
    r = make(filled)
    assert r.returncode == 0 and r.stdout.strip() == f"ray up -y {filled}"  # the fake ray's echo, r.stderr
