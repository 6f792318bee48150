"""The network policies of deploy/kuberay/networkpolicy.yaml, evaluated as Kubernetes does: who reaches which port of
which pod (the KubeRay operator, the RayJob submitter, other namespaces, the other components), and where the
README puts the operator. Least privilege (issue #13 item 13), split from tests/test_deploy_kuberay.py (the
manifests, pods, roles and the API key). No Ray cluster is started."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy_files import KUBERAY, MANIFESTS, _cluster_spec, _manifest

# The KubeRay operator runs in its own namespace (README: `helm install ... -n kuberay-system`) and calls the heads
# itself (KubeRay v1.6/v1.7, ray-operator/controllers/ray/): the dashboard (8265) for a RayJob's status
# (GetJobInfo, StopJob) and a RayService's Serve config (UpdateDeployments, GetServeDetails), and the RayService
# head's Serve proxy (8000, GET /-/healthz in updateHeadPodServeLabel). It calls no worker; the probes on the
# dashboard agent's port 52365 come from the kubelet, which no NetworkPolicy blocks.
APP_NAMESPACE = "faceattr"  # README: kubectl apply -n faceattr -f deploy/kuberay/networkpolicy.yaml
OPERATOR_NAMESPACE = "kuberay-system"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace
OPERATOR_POD_LABELS = {  # the pod template of KubeRay's Helm chart (v1.6, v1.7) with its default values
    "app.kubernetes.io/name": "kuberay-operator",
    "app.kubernetes.io/instance": "kuberay-operator",
    "app.kubernetes.io/component": "kuberay-operator",
}
OPERATOR_HEAD_PORTS = {"RayJob": {8265}, "RayService": {8265, 8000}}
PROBE_PORTS = (6379, 8000, 8080, 8265, 10001, 52365, 12345)  # GCS, Serve, metrics, dashboard, client, agent, any


def _network_policies() -> list[dict]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / "networkpolicy.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"NetworkPolicy"}
    assert all("namespace" not in d["metadata"] for d in docs)  # applied with -n faceattr
    return docs


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"extend the evaluator for {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _ingress_allowed(policies: list[dict], *, src_ns: str, src_labels: dict, dst_labels: dict, port: int,
                     dst_ns: str = APP_NAMESPACE) -> bool:
    """May a pod (src_ns, src_labels) open a TCP connection to `port` of a pod (dst_ns, dst_labels)? Kubernetes'
    rules: a pod selected by no Ingress policy accepts everything; otherwise some rule of a selecting policy must
    match the port (no `ports`: every port) and the source (no `from`: every source; a peer's podSelector alone
    means pods of the policy's namespace, namespaceSelector and podSelector in one peer must both match)."""
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], dst_labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports") or []
            for pp in ports:
                assert set(pp) <= {"port", "protocol"} and isinstance(pp["port"], int), f"extend the evaluator: {pp}"
            if ports and not any(pp["port"] == port and pp.get("protocol", "TCP") == "TCP" for pp in ports):
                continue
            peers = rule.get("from") or []
            if not peers:
                return True
            for peer in peers:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, f"extend the evaluator: {peer}"
                if "namespaceSelector" in peer:
                    ns_ok = _selects(peer["namespaceSelector"], {NAMESPACE_NAME_LABEL: src_ns})
                else:
                    ns_ok = src_ns == dst_ns
                if ns_ok and _selects(peer.get("podSelector") or {}, src_labels):
                    return True
    return False


def _ray_pods(name: str) -> dict[str, dict]:
    """The labels of the head and of each worker group's pods (the manifest's template labels, plus KubeRay's)."""
    spec = _cluster_spec(_manifest(name))
    pods = {"head": {**spec["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"}}
    for g in spec["workerGroupSpecs"]:
        pods[g["groupName"]] = {**g["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
    return pods


def test_the_policy_evaluator_follows_kubernetes_semantics():
    def pol(*ingress):
        return [{"spec": {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress"],
                          "ingress": list(ingress)}}]

    def ok(policies, ns, labels, port=80):
        return _ingress_allowed(policies, src_ns=ns, src_labels=labels, dst_labels={"app": "x"}, port=port)

    assert ok([], "other", {})  # no policy selects the pod
    assert not ok(pol(), APP_NAMESPACE, {})  # selected, no rule: nothing
    same_ns = pol({"from": [{"podSelector": {}}], "ports": [{"port": 80}]})
    assert ok(same_ns, APP_NAMESPACE, {"any": "pod"}) and not ok(same_ns, "other", {})
    assert not ok(same_ns, APP_NAMESPACE, {}, port=81)
    any_ns = pol({"from": [{"namespaceSelector": {}}]})
    assert ok(any_ns, "other", {}, port=81)
    both = pol({"from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "op"}},
                          "podSelector": {"matchLabels": {"role": "op"}}}]})
    assert ok(both, "op", {"role": "op"}) and not ok(both, "op", {}) and not ok(both, "other", {"role": "op"})
    either = pol({"from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "op"}}},
                           {"podSelector": {"matchLabels": {"role": "op"}}}]})
    assert ok(either, "op", {}) and ok(either, APP_NAMESPACE, {"role": "op"}) and not ok(either, "other", {"role": "op"})
    assert ok(pol({"ports": [{"port": 80}]}), "other", {}) and not ok(pol({"ports": [{"port": 80}]}), "o", {}, 81)


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_kuberay_operator_reaches_each_head_on_exactly_the_ports_it_calls(name):
    """Without the dashboard the operator cannot read a RayJob's status nor push a RayService's Serve config: on a
    CNI that enforces the policies the RayService never became Ready and the RayJobs' status never changed."""
    policies, needed = _network_policies(), OPERATOR_HEAD_PORTS[MANIFESTS[name]]
    for role, labels in _ray_pods(name).items():
        reachable = {port for port in PROBE_PORTS if _ingress_allowed(
            policies, src_ns=OPERATOR_NAMESPACE, src_labels=OPERATOR_POD_LABELS, dst_labels=labels, port=port)}
        if role == "head":
            assert reachable == needed, (name, role, reachable)
        else:  # the operator calls no worker; only the head listens on 8265, the Serve workers serve 8000 to all
            assert reachable <= needed, (name, role, reachable)
        for port in needed:  # from the operator's namespace only the operator's pods (8000 of serve: everyone)
            assert _ingress_allowed(policies, src_ns=OPERATOR_NAMESPACE, src_labels={"app": "webhook-x"},
                                    dst_labels=labels, port=port) == (port == 8000), (role, port)
            for ns in ("default", "kube-system", "faceattr-dev"):  # the operator's labels elsewhere: nothing new
                assert _ingress_allowed(policies, src_ns=ns, src_labels=OPERATOR_POD_LABELS, dst_labels=labels,
                                        port=port) == (port == 8000 and MANIFESTS[name] == "RayService"), (ns, port)


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_other_pods_reach_what_they_reached_before(name):
    """The rules from before the operator's: own component everything, any pod anywhere only the serving port of
    the serve pods, any pod of the namespace (the RayJob submitter) only the batch heads' dashboard."""
    policies, component = _network_policies(), name.split("-")[0]
    pods = _ray_pods(name)
    other = {"train": "label", "label": "serve", "serve": "train"}[component]
    for labels in pods.values():
        for port in PROBE_PORTS:
            def ok(ns, src, port=port, labels=labels):
                return _ingress_allowed(policies, src_ns=ns, src_labels=src, dst_labels=labels, port=port)

            assert ok(APP_NAMESPACE, {"app.kubernetes.io/name": "faceattr", "app.kubernetes.io/component": component})
            serving = component == "serve" and port == 8000
            submitter = component != "serve" and port == 8265
            for ns in ("default", "ingress-nginx", OPERATOR_NAMESPACE):
                assert ok(ns, {"app": "anything"}) == serving, (ns, port)
                assert ok(ns, {"app.kubernetes.io/name": "faceattr", "app.kubernetes.io/component": component}) \
                    == serving, (ns, port)
            assert ok(APP_NAMESPACE, {"job-name": f"faceattr-{component}-x"}) == (serving or submitter), port
            assert ok(APP_NAMESPACE, {"app.kubernetes.io/name": "faceattr", "app.kubernetes.io/component": other}) \
                == (serving or submitter), port


def test_network_policies_cover_every_component_and_expose_only_the_api():
    docs = _network_policies()
    by_component = {d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: d for d in docs}
    assert set(by_component) == {"train", "label", "serve"}
    for component, d in by_component.items():
        assert set(d["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        operator_rules = 0
        for rule in d["spec"]["ingress"]:
            peers = rule.get("from")
            ports = {p["port"] for p in rule.get("ports", [])}
            if peers is None:  # from anywhere: only the serving port of the serve pods
                assert component == "serve" and ports == {8000}, (component, rule)
            elif any("namespaceSelector" in p for p in peers):  # the KubeRay operator's pods, in its namespace
                operator_rules += 1
                for p in peers:
                    assert p["namespaceSelector"] == {"matchLabels": {NAMESPACE_NAME_LABEL: OPERATOR_NAMESPACE}}, p
                    assert p["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "kuberay-operator"}, p
                assert ports == OPERATOR_HEAD_PORTS["RayService" if component == "serve" else "RayJob"], rule
            elif any(p.get("podSelector") == {} for p in peers):
                assert ports and ports <= {8265}, (component, rule)  # the submitter's job API only
            else:  # the component's own Ray pods
                assert all(p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
                           for p in peers), (component, rule)
        assert operator_rules == 1, component


def test_the_operator_namespace_is_where_the_readme_installs_it_and_says_where_to_change_it():
    readme = (KUBERAY / "README.md").read_text()
    (installed,) = set(re.findall(r"helm install kuberay-operator kuberay/kuberay-operator -n (\S+)", readme))
    assert installed == OPERATOR_NAMESPACE
    text = (KUBERAY / "networkpolicy.yaml").read_text()
    rule_lines = [ln for ln in text.splitlines()
                  if not ln.lstrip().startswith("#") and f"{NAMESPACE_NAME_LABEL}: {OPERATOR_NAMESPACE}" in ln]
    assert len(rule_lines) == len(_network_policies()) == 3  # the three places the comment names
    header = text.split("apiVersion:", 1)[0]
    assert "OPERATOR NAMESPACE" in header and all(f"faceattr-{c}" in header for c in ("serve", "train", "label"))
    assert "Installed the operator in another namespace?" in readme and "kuberay-system" in readme
