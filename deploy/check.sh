#!/usr/bin/env bash
# Offline checks of deploy/ (no cluster needed):
#  1. kubectl kustomize renders every overlay;
#  2. the rendered built-in kinds pass kubernetes-validate --strict;
#  3. promtool check rules passes on the PrometheusRule's rules, and their
#     unit tests (prometheus-rules.test.yaml) pass promtool test rules;
#  4. every swallow_* metric the rules and the dashboard use is exported by
#     the stages (the list is read from a running pipeline by the Rust test
#     tests/tests/deploy.rs, which also runs promtool check metrics).
# tests/tests/alerts.rs then runs the rules and the dashboard in a real
# Prometheus against the running stages and RabbitMQ's own exporter.
# Needs kubectl, promtool (Debian: prometheus) and kubernetes-validate (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for overlay in base overlays/dev overlays/production; do
  name=$(basename "$overlay")
  kubectl kustomize "deploy/k8s/$overlay" > "$out/$name.yaml"
  echo "check: kustomize renders deploy/k8s/$overlay"
done

# Split the rendered documents; validate the built-in kinds (the CRDs of the
# RabbitMQ operator, KEDA and the Prometheus operator have no schema here).
python3 - "$out" <<'PY'
import sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
builtin = {"v1", "apps/v1", "policy/v1"}
n = 0
for f in sorted(out.glob("*.yaml")):
    for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
        if doc and doc.get("apiVersion") in builtin:
            (out / "builtin").mkdir(exist_ok=True)
            (out / "builtin" / f"{f.stem}-{i}.yaml").write_text(yaml.safe_dump(doc))
            n += 1
        elif doc and doc.get("kind") == "PrometheusRule":
            (out / "rules.yaml").write_text(yaml.safe_dump(doc["spec"]))
print(f"check: {n} built-in resources to validate")
PY
python3 -m kubernetes_validate --strict --quiet "$out"/builtin/*.yaml
echo "check: kubernetes-validate --strict passes"
promtool check rules "$out/rules.yaml"
echo "check: promtool check rules passes"
cp deploy/k8s/overlays/production/prometheus-rules.test.yaml "$out/"
promtool test rules "$out/prometheus-rules.test.yaml"
echo "check: promtool test rules passes"
