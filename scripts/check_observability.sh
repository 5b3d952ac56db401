#!/usr/bin/env bash
# Checks what ships for Prometheus and Grafana against promtool and against
# a live verifier:
#   1. promtool check config deploy/prometheus/prometheus.yml
#   2. promtool check rules  deploy/prometheus/alerts.yml
#   3. promtool test rules   deploy/prometheus/alerts_test.yml, and every
#      alert there is shown both firing and silent;
#   4. every PromQL expression of deploy/grafana/casf-verifier.json passes
#      promtool's parser (written out as recording rules);
#   5. every metric name the dashboard and the alerts use is in a live scrape
#      of target/release/casf-verifier (embedded backends, loopback ports),
#      after one decision of each kind; `up` is Prometheus' own;
#   6. every metric family of that scrape is documented in docs/metrics.md,
#      and every alert's runbook link points at a heading of docs/runbooks.md.
# Any failure exits non-zero, naming what is missing. Installs promtool
# (Debian's `prometheus` package) when it is missing.
#
# Usage: scripts/check_observability.sh   (CASF_VERIFIER_BIN overrides the binary)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=${CASF_VERIFIER_BIN:-target/release/casf-verifier}
PROM=deploy/prometheus
DASHBOARD=deploy/grafana/casf-verifier.json

log() { echo "check_observability: $*" >&2; }
die() {
  echo "check_observability: FAIL: $*" >&2
  exit 1
}

# ------------------------------------------------------------------ promtool
if ! command -v promtool >/dev/null; then
  [[ $EUID -eq 0 ]] || die "promtool is missing and installing it (apt-get install prometheus) needs root"
  log "installing promtool (apt-get install prometheus)"
  # Lock timeout: another apt run (e.g. a concurrent session) may hold the lock.
  apt=(apt-get -q -y -o DPkg::Lock::Timeout=300)
  export DEBIAN_FRONTEND=noninteractive
  "${apt[@]}" update >/dev/null || die "apt-get update failed"
  "${apt[@]}" install --no-install-recommends prometheus >/dev/null ||
    die "apt-get install prometheus failed"
  command -v promtool >/dev/null || die "the prometheus package is installed but promtool is not on PATH"
fi
log "$(promtool --version 2>&1 | head -n 1)"

tmp=$(mktemp -d)
verifier_pid=
cleanup() {
  if [[ -n $verifier_pid ]] && kill -0 "$verifier_pid" 2>/dev/null; then
    kill "$verifier_pid" 2>/dev/null || true
    wait "$verifier_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# promtool writes its findings to stdout and stderr; keep them for a failure.
run_promtool() {
  if ! promtool "$@" >"$tmp/promtool.out" 2>&1; then
    cat "$tmp/promtool.out" >&2
    die "promtool $*"
  fi
  log "ok: promtool $*"
}

run_promtool check config "$PROM/prometheus.yml"
run_promtool check rules "$PROM/alerts.yml"
run_promtool test rules "$PROM/alerts_test.yml"

# ------------------------------------------------- the dashboard's PromQL
# Recording rules, one per dashboard query, for promtool's parser; the
# metric names of dashboard and alerts go to $tmp/used.
python3 - "$DASHBOARD" "$PROM/alerts.yml" "$PROM/alerts_test.yml" "$tmp" <<'PY' || exit 1
import json, re, sys

dashboard_path, alerts_path, alerts_test_path, tmp = sys.argv[1:]

def fail(msg):
    print(f"check_observability: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)

dashboard = json.load(open(dashboard_path, encoding="utf-8"))

def walk(panels):
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", []))

exprs = []  # (where, expr)
rows = []
for panel in walk(dashboard.get("panels", [])):
    if panel.get("type") == "row":
        rows.append(panel.get("title"))
    for target in panel.get("targets", []):
        expr = target.get("expr", "").strip()
        if not expr:
            fail(f"dashboard panel {panel.get('title')!r} target {target.get('refId')} has no expr")
        exprs.append((f"panel {panel.get('title')!r} {target.get('refId')}", expr))
for var in dashboard.get("templating", {}).get("list", []):
    query = var.get("query")
    query = query.get("query") if isinstance(query, dict) else query
    if var.get("type") == "query" and query:
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
        if not m:
            fail(f"dashboard variable {var.get('name')}: cannot read {query!r}")
        exprs.append((f"variable {var.get('name')}", m.group(1)))
if not exprs:
    fail(f"no PromQL found in {dashboard_path}")
wanted_rows = ["Decisions", "Latency", "Dependencies", "Audit", "Replay", "SMS"]
if rows != wanted_rows:
    fail(f"dashboard rows are {rows}, expected {wanted_rows}")

with open(f"{tmp}/dashboard_rules.yml", "w", encoding="utf-8") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (where, expr) in enumerate(exprs):
        # A JSON string is a valid YAML double-quoted scalar.
        out.write(f"      # {where}\n")
        out.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(expr)}\n")

# Alert expressions, read line by line (no YAML parser in the stdlib); the
# file keeps each expr on one line, and anything else is refused.
alert_exprs = []
alert_names = []
runbooks = []
for n, line in enumerate(open(alerts_path, encoding="utf-8"), 1):
    m = re.match(r"\s*(?:- )?(alert|expr|runbook):\s*(.*?)\s*$", line)
    if not m:
        continue
    key, value = m.groups()
    if value[:1] in ("'", '"'):
        value = value[1:-1]
    if key == "alert":
        alert_names.append(value)
    elif key == "runbook":
        runbooks.append((alert_names[-1], value))
    elif not value or value[0] in "|>":
        fail(f"{alerts_path}:{n}: keep each expr on one line for this check")
    else:
        alert_exprs.append((f"alert {alert_names[-1]}", value))
if not alert_exprs or len(alert_exprs) != len(alert_names):
    fail(f"{alerts_path}: found {len(alert_names)} alerts but {len(alert_exprs)} exprs")
if len(runbooks) != len(alert_names):
    fail(f"{alerts_path}: every alert needs a runbook annotation")

# Every alert is shown firing and silent in the unit tests.
fired, silent, current = set(), set(), None
for line in open(alerts_test_path, encoding="utf-8"):
    m = re.match(r"\s*(?:- )?alertname:\s*(\S+)", line)
    if m:
        current = m.group(1)
    m = re.match(r"\s*exp_alerts:\s*(\S*)", line)
    if m and current:
        (silent if m.group(1) == "[]" else fired).add(current)
for name in alert_names:
    if name not in fired:
        fail(f"{alerts_test_path}: no test fires {name}")
    if name not in silent:
        fail(f"{alerts_test_path}: no test shows {name} silent")

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on",
            "ignoring", "group_left", "group_right", "inf", "nan", "atan2"}

def metric_names(expr):
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)        # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)       # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[:m.start()].rstrip()
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # 1e-6, 5m
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(0).lower() in KEYWORDS:
            continue
        names.add(m.group(0))
    return names

with open(f"{tmp}/used", "w", encoding="utf-8") as out:
    for where, expr in exprs + alert_exprs:
        names = metric_names(expr)
        if not names:
            fail(f"{where}: no metric name found in {expr!r}")
        for name in sorted(names):
            out.write(f"{name}\t{where}\n")
with open(f"{tmp}/runbooks", "w", encoding="utf-8") as out:
    for alert, link in runbooks:
        out.write(f"{alert}\t{link}\n")
print(f"check_observability: {len(exprs)} dashboard queries, {len(alert_exprs)} alerts", file=sys.stderr)
PY
# On a parse error, promtool names the rule; the comment above it in
# $tmp/dashboard_rules.yml (printed on failure) names the panel.
if ! promtool check rules "$tmp/dashboard_rules.yml" >"$tmp/promtool.out" 2>&1; then
  cat "$tmp/promtool.out" "$tmp/dashboard_rules.yml" >&2
  die "a dashboard query does not parse (see the rule named above)"
fi
log "ok: every dashboard query parses (promtool check rules)"

# ----------------------------------------------------------- a live scrape
[[ -x $BIN ]] || die "$BIN not found: build it first (cargo build --release --locked)"
# shellcheck source=scripts/live-verifier.sh
source "$(dirname "${BASH_SOURCE[0]}")/live-verifier.sh"
start_live_verifier "$tmp" || die "the verifier did not start"

python3 - "$base" "$tmp" "$verifier_pid" <<'PY' || { tail -n 20 "$tmp/verifier.log" >&2; exit 1; }
import json, os, sys, time, urllib.error, urllib.request

base, tmp, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])

def fail(msg):
    print(f"check_observability: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)

deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        fail("the verifier exited before it was ready")
    if time.monotonic() > deadline:
        fail("the verifier was not ready within 30 s")
    time.sleep(0.2)

def verify(request_id, tool, mode, role, args=None, patient="pat-obs-1"):
    body = json.dumps({
        "request_id": request_id, "tool": tool, "mode": mode, "role": role,
        "subject": {"patient_id": patient}, "args": args or {},
        "context": {"tenant_id": "clinic-a"},
    }).encode()
    req = urllib.request.Request(f"{base}/verify", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        fail(f"/verify {request_id}: HTTP {e.code} {e.read()[:200]!r}")

stamp = str(time.time_ns())
appointment = ("cliniccloud.create_appointment", "ALLOW", "receptionist", {"slot": "2026-12-01T09:00"})
checks = [
    ("allow", appointment, "ALLOW"),
    ("deny", ("stripe.generate_invoice", "READ_ONLY", "billing", {"amount": 120}), "DENY"),
    ("read", ("cliniccloud.list_appointments", "ALLOW", "receptionist", {}), None),
    ("allow", appointment, "ALLOW"),  # a replay: the stored decision
    ("allow", appointment[:3] + ({"slot": "2026-12-02T09:00"},), "DENY"),  # a mismatch
    ("sms-1", ("twilio.send_sms", "ALLOW", "nurse", {"body": "hi"}), "ALLOW"),
    ("sms-2", ("twilio.send_sms", "ALLOW", "nurse", {"body": "hi"}), "DENY"),  # burst limit
]
for suffix, (tool, mode, role, args), expected in checks:
    answer = verify(f"obs-{stamp}-{suffix}", tool, mode, role, args)
    if expected and answer.get("decision") != expected:
        fail(f"/verify {suffix}: expected {expected}, got {answer}")

with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
    text = r.read().decode()
open(f"{tmp}/scrape", "w", encoding="utf-8").write(text)

samples, families = {}, set()
for line in text.splitlines():
    if line.startswith("# TYPE "):
        families.add(line.split()[2])
    elif line and not line.startswith("#"):
        name = line.split("{", 1)[0].split(" ", 1)[0]
        samples[name] = samples.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
missing = []
for line in open(f"{tmp}/used", encoding="utf-8"):
    name, where = line.rstrip("\n").split("\t")
    if name != "up" and name not in samples:
        missing.append(f"{name} (used by {where})")
if missing:
    fail("metric names not in a live scrape of the verifier:\n  " + "\n  ".join(sorted(set(missing))))

for name, least in [("casf_verify_total", 7), ("casf_replay_hit_total", 1),
                    ("casf_replay_mismatch_total", 1), ("casf_sms_limited_total", 1),
                    ("casf_verify_duration_seconds_count", 7)]:
    if samples.get(name, 0) < least:
        fail(f"scrape: {name} is {samples.get(name)}, expected at least {least} after the requests")

metrics_doc = open("docs/metrics.md", encoding="utf-8").read()
undocumented = sorted(f for f in families if f"`{f}" not in metrics_doc)
if undocumented:
    fail("metric families missing from docs/metrics.md: " + ", ".join(undocumented))

import re
def slug(heading):
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))
anchors = {slug(l.lstrip("#")) for l in open("docs/runbooks.md", encoding="utf-8") if l.startswith("#")}
for line in open(f"{tmp}/runbooks", encoding="utf-8"):
    alert, link = line.rstrip("\n").split("\t")
    path, _, anchor = link.partition("#")
    if path != "docs/runbooks.md" or anchor not in anchors:
        fail(f"alert {alert}: runbook {link} is not a heading of docs/runbooks.md")

used = {l.split("\t")[0] for l in open(f"{tmp}/used", encoding="utf-8")}
print(f"check_observability: ok: {len(used)} metric names used, all in the live scrape "
      f"({len(families)} families, all documented)", file=sys.stderr)
PY
log "all checks passed"
