#!/usr/bin/env bash
# Install Kubeflow Pipelines standalone (version pinned in manifests/kfp/*/kustomization.yaml):
# cluster-scoped resources, wait for the CRDs, then the platform-agnostic env, and wait until every
# deployment in kubeflow is Available. KUBE_CONTEXT selects the kubectl context (default: current).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
timeout="${KFP_WAIT_TIMEOUT:-1200s}"
k() {
  if [ -n "${KUBE_CONTEXT:-}" ]; then kubectl --context "$KUBE_CONTEXT" "$@"; else kubectl "$@"; fi
}

k apply -k "$root/manifests/kfp/cluster-scoped"
k wait --for=condition=Established crd --all --timeout=120s

# The first apply can race the CRDs and webhooks it creates itself; a retry is the documented cure.
for attempt in 1 2 3; do
  if k apply -k "$root/manifests/kfp/platform"; then
    break
  fi
  if [ "$attempt" = 3 ]; then
    echo "applying manifests/kfp/platform failed 3 times" >&2
    exit 1
  fi
  echo "apply failed (attempt $attempt); retrying in 15 s" >&2
  sleep 15
done

echo "waiting up to $timeout for all Kubeflow Pipelines deployments (first start pulls many images)"
if ! k -n kubeflow wait --for=condition=Available deployment --all --timeout="$timeout"; then
  echo "Kubeflow Pipelines did not become ready; pods that are not Running:" >&2
  k -n kubeflow get pods --field-selector=status.phase!=Running >&2 || true
  exit 1
fi
k -n kubeflow rollout status deployment/ml-pipeline --timeout=60s
k -n kubeflow get deployments
