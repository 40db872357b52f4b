#!/usr/bin/env bash
# Run a command while a kubectl port-forward to a service is open, then close it.
#   scripts/port-forward.sh NAMESPACE SERVICE LOCAL_PORT:REMOTE_PORT -- COMMAND [ARGS...]
# e.g. scripts/port-forward.sh kubeflow ml-pipeline-ui 8080:80 -- sam-pipeline submit --host http://localhost:8080
# KUBE_CONTEXT selects the kubectl context (default: the current one).
set -euo pipefail

if [ $# -lt 5 ] || [ "$4" != "--" ]; then
  echo "usage: $0 NAMESPACE SERVICE LOCAL_PORT:REMOTE_PORT -- COMMAND [ARGS...]" >&2
  exit 2
fi
namespace="$1" service="$2" ports="$3"
shift 4
local_port="${ports%%:*}"

context_args=()
if [ -n "${KUBE_CONTEXT:-}" ]; then context_args=(--context "$KUBE_CONTEXT"); fi

log="$(mktemp)"
kubectl "${context_args[@]}" -n "$namespace" port-forward "svc/$service" "$ports" >"$log" 2>&1 &
pf_pid=$!
cleanup() { kill "$pf_pid" 2>/dev/null || true; wait "$pf_pid" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

for _ in $(seq 1 60); do
  if ! kill -0 "$pf_pid" 2>/dev/null; then
    echo "port-forward to svc/$service in $namespace exited:" >&2
    cat "$log" >&2
    exit 1
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$local_port") 2>/dev/null; then
    break
  fi
  sleep 0.5
done
if ! (exec 3<>"/dev/tcp/127.0.0.1/$local_port") 2>/dev/null; then
  echo "port-forward to svc/$service did not open 127.0.0.1:$local_port within 30 s:" >&2
  cat "$log" >&2
  exit 1
fi

"$@"
