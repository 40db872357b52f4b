#!/usr/bin/env bash
# Run `nvidia-smi -L` in a pod that requests nvidia.com/gpu: 1 with the pipeline's node selector and
# toleration (manifests/gpu/checks/nvidia-smi-pod.yaml). Exits non-zero, with the pod's events and
# logs, when the pod does not succeed: at once when it has failed or cannot start its container,
# otherwise after GPU_CHECK_TIMEOUT (default 300s; a Pending pod may still be waiting for the device
# plugin). KUBE_CONTEXT selects the kubectl context (default: the current one).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pod_manifest="$root/manifests/gpu/checks/nvidia-smi-pod.yaml"
timeout="${GPU_CHECK_TIMEOUT:-300s}"
timeout_s="${timeout%s}"
if ! [[ "$timeout_s" =~ ^[0-9]+$ ]]; then
  echo "GPU_CHECK_TIMEOUT must be seconds, e.g. 300s, got '$timeout'" >&2
  exit 2
fi
poll_s=2
# Container states that never recover on their own: waiting them out only delays the diagnosis.
fatal_reasons=" ErrImagePull ImagePullBackOff InvalidImageName CreateContainerError CreateContainerConfigError RunContainerError "
k() {
  if [ -n "${KUBE_CONTEXT:-}" ]; then kubectl --context "$KUBE_CONTEXT" "$@"; else kubectl "$@"; fi
}
fail() {
  echo "GPU check FAILED: $*" >&2
  k -n default describe pod nvidia-smi >&2 || true
  k -n default logs pod/nvidia-smi >&2 || true
  exit 1
}

k delete -f "$pod_manifest" --ignore-not-found --wait=true >/dev/null
k apply -f "$pod_manifest"
phase="" reason=""
for (( waited = 0; ; waited += poll_s )); do
  status="$(k -n default get pod nvidia-smi \
    -o jsonpath='{.status.phase}{" "}{.status.containerStatuses[0].state.waiting.reason}')" || status=""
  read -r phase reason <<<"$status" || true
  case "$phase" in
    Succeeded) break ;;
    Failed) fail "pod nvidia-smi failed (no GPU in the container? see its log and events below)" ;;
  esac
  if [ -n "$reason" ] && [[ "$fatal_reasons" == *" $reason "* ]]; then
    fail "pod nvidia-smi cannot run its container: $reason"
  fi
  if (( waited >= timeout_s )); then
    fail "pod nvidia-smi did not succeed within $timeout (phase ${phase:-unknown}${reason:+, $reason})"
  fi
  sleep "$poll_s"
done
echo "GPU check passed; the pod saw:"
k -n default logs pod/nvidia-smi
k delete -f "$pod_manifest" --ignore-not-found >/dev/null
