#!/usr/bin/env bash
# Interop proof with real peers: the official Python SDK (PyPI `mcp`) as the client and
# `@modelcontextprotocol/server-everything` (npm) as the upstream, directly and through
# `agentvm-sidecar proxy` (with `agentvm-sidecar exec` behind its exec tool). Everything listens on loopback; every process started here is stopped
# on exit. Prints "N passed, N failed" and exits non-zero on any failure.
#
# Packages are installed into $AGENTVM_INTEROP_DIR (default target/interop) on first use.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
dir="${AGENTVM_INTEROP_DIR:-$repo/target/interop}"
mcp_version="${MCP_PY_VERSION:-2.3.0}"
everything_version="${EVERYTHING_VERSION:-2026.8.31}"
mkdir -p "$dir"

if [ ! -x "$dir/venv/bin/python" ] || ! "$dir/venv/bin/python" -c "import mcp" 2>/dev/null; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q "mcp==$mcp_version"
fi
everything="$dir/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
if [ ! -f "$everything" ]; then
  (cd "$dir" && npm install --no-audit --no-fund --silent "@modelcontextprotocol/server-everything@$everything_version")
fi
(cd "$repo" && cargo build -q -p agentvm-sidecar)
sidecar="${CARGO_TARGET_DIR:-$repo/target}/debug/agentvm-sidecar"

free_port() { "$dir/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port="$(free_port)"
proxy_port="$(free_port)"
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
for _ in $(seq 50); do
  if "$sidecar" probe "http://127.0.0.1:$proxy_port/healthz" 2>/dev/null &&
    "$sidecar" probe "http://127.0.0.1:$exec_port/healthz" 2>/dev/null &&
    curl -s -o /dev/null "http://127.0.0.1:$up_port/mcp"; then break; fi
  sleep 0.2
done

direct="$("$dir/venv/bin/python" "$here/client.py" "http://127.0.0.1:$up_port/mcp")"
proxied="$("$dir/venv/bin/python" "$here/client.py" "http://127.0.0.1:$proxy_port/mcp" everything__ --exec)"

"$dir/venv/bin/python" - "$direct" "$proxied" "$dir/proxy.log" "$dir/workspace" <<'PY'
import json, os, sys
direct, proxied = json.loads(sys.argv[1]), json.loads(sys.argv[2])
workspace = os.path.realpath(sys.argv[4])
audit = [json.loads(l) for l in open(sys.argv[3]) if '"agentvm::audit"' in l]
checks = {
    "same protocol revision": direct["protocol"] == proxied["protocol"],
    "same tools, prefixed, plus exec":
        sorted(["exec"] + ["everything__" + t for t in direct["tools"]]) == proxied["tools"],
    "exec runs in the workspace": proxied["exec"] == [f"{workspace}\n{workspace}\n"]
        and not proxied["exec_is_error"],
    "blocked exec refused as unknown": "Unknown tool: exec" in json.dumps(proxied["exec_blocked"]),
    "same echo result": direct["echo"] == proxied["echo"] and not proxied["echo_is_error"],
    "same get-sum result": direct["sum"] == proxied["sum"],
    "unknown tool refused": "Unknown tool" in json.dumps(proxied["unknown"]),
    "one audit record per call": len(audit) == 5,
    "no argument values in audit": all("through agentvm" not in json.dumps(a) for a in audit),
}
failed = [name for name, ok in checks.items() if not ok]
for name in failed:
    print("FAIL", name)
print(f"interop: {len(checks) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
PY
