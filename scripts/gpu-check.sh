#!/usr/bin/env bash
# Run `nvidia-smi -L` in a pod that requests nvidia.com/gpu: 1 with the pipeline's node selector and
# toleration (manifests/gpu/checks/nvidia-smi-pod.yaml). Exits non-zero, with the pod's events, when
# the pod does not succeed. KUBE_CONTEXT selects the kubectl context (default: the current one).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pod_manifest="$root/manifests/gpu/checks/nvidia-smi-pod.yaml"
timeout="${GPU_CHECK_TIMEOUT:-300s}"
k() {
  if [ -n "${KUBE_CONTEXT:-}" ]; then kubectl --context "$KUBE_CONTEXT" "$@"; else kubectl "$@"; fi
}

k delete -f "$pod_manifest" --ignore-not-found --wait=true >/dev/null
k apply -f "$pod_manifest"
if ! k -n default wait --for=jsonpath='{.status.phase}'=Succeeded pod/nvidia-smi --timeout="$timeout"; then
  echo "GPU check FAILED: pod nvidia-smi did not succeed within $timeout" >&2
  k -n default describe pod nvidia-smi >&2 || true
  k -n default logs pod/nvidia-smi >&2 || true
  exit 1
fi
echo "GPU check passed; the pod saw:"
k -n default logs pod/nvidia-smi
k delete -f "$pod_manifest" --ignore-not-found >/dev/null
