#!/usr/bin/env bash
# Run `nvidia-smi -L` in a pod shaped exactly as the compiled pipeline's GPU task pod (pipelines/gpu_pod.py
# reads the node selector, tolerations, nvidia.com/gpu limit, CPU and memory from the compiled YAML) and,
# like a KFP task pod, without runtimeClassName: it passes only if the nvidia runtime is containerd's
# default on the GPU node and the node can schedule the task. Exits non-zero, with the pod's events and
# logs, when the pod does not succeed: at once when it has failed or cannot start its container, otherwise
# after GPU_CHECK_TIMEOUT (default 300s; a Pending pod may still be waiting for the device plugin).
#
# Environment: KUBE_CONTEXT (default: kubectl's current context), GPU_CHECK_YAML (the compiled pipeline,
# default pipelines/sam_finetune.yaml; pass build/sam_finetune.yaml when you compiled with other flags),
# GPU_CHECK_TASK (the task whose pod shape to use, default finetune), SAM_PYTHON (the project's Python,
# default .venv/bin/python; `make setup` creates it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
compiled="${GPU_CHECK_YAML:-$root/pipelines/sam_finetune.yaml}"
task="${GPU_CHECK_TASK:-finetune}"
python="${SAM_PYTHON:-$root/.venv/bin/python}"
timeout="${GPU_CHECK_TIMEOUT:-300s}"
timeout_s="${timeout%s}"
if ! [[ "$timeout_s" =~ ^[0-9]+$ ]]; then
  echo "GPU_CHECK_TIMEOUT must be seconds, e.g. 300s, got '$timeout'" >&2
  exit 2
fi
if [ ! -x "$python" ]; then
  echo "gpu-check: $python not found: run 'make setup' first (or set SAM_PYTHON)" >&2
  exit 2
fi
pod_json="$(cd "$root" && "$python" -m pipelines.gpu_pod --yaml "$compiled" --task "$task")"
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

echo "smoke pod shaped as the '$task' task of $compiled (no runtimeClassName, as KFP task pods)"
k -n default delete pod nvidia-smi --ignore-not-found --wait=true >/dev/null
k apply -f - <<<"$pod_json"
phase="" reason=""
for (( waited = 0; ; waited += poll_s )); do
  status="$(k -n default get pod nvidia-smi \
    -o jsonpath='{.status.phase}{" "}{.status.containerStatuses[0].state.waiting.reason}')" || status=""
  read -r phase reason <<<"$status" || true
  case "$phase" in
    Succeeded) break ;;
    Failed) fail "pod nvidia-smi failed (no nvidia-smi: is nvidia containerd's default runtime on the GPU node? see its log and events below)" ;;
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
k -n default delete pod nvidia-smi --ignore-not-found >/dev/null
