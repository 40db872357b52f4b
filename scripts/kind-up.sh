#!/usr/bin/env bash
# Create (or finish setting up) the kind cluster with a GPU worker, then install the NVIDIA device
# plugin, prove a pod can use the GPU, and install Kubeflow Pipelines standalone. Idempotent: re-run
# it after a failure and it picks up where it stopped.
#
# Environment: KIND_CLUSTER (default sam-pipeline), KIND_CONFIG (default manifests/kind/cluster.yaml),
# NVIDIA_CTK_VERSION (toolkit installed inside the GPU worker, default 1.17.8-1), SAM_PYTHON (the project's
# Python, default .venv/bin/python: the GPU smoke pod is read from the compiled pipeline with it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${KIND_CLUSTER:-sam-pipeline}"
config="${KIND_CONFIG:-$root/manifests/kind/cluster.yaml}"
ctk_version="${NVIDIA_CTK_VERSION:-1.17.8-1}"
context="kind-$cluster"
if [ ! -x "${SAM_PYTHON:-$root/.venv/bin/python}" ]; then
  echo "kind-up: ${SAM_PYTHON:-$root/.venv/bin/python} not found: run 'make setup' first (the GPU check needs it)" >&2
  exit 2
fi
k() { kubectl --context "$context" "$@"; }
step() { printf '\n==> %s\n' "$*"; }

step "kind cluster '$cluster'"
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "exists; reusing it"
else
  kind create cluster --name "$cluster" --config "$config" --wait 5m
fi

# KFP's own pods carry no GPU toleration and the only worker is tainted for GPUs, so they (and the
# light pipeline steps) run on the control-plane node. kind taints it as soon as a worker exists.
step "allow ordinary workloads on the control-plane node"
k taint nodes -l node-role.kubernetes.io/control-plane node-role.kubernetes.io/control-plane:NoSchedule- 2>/dev/null \
  || echo "already untainted"

mapfile -t gpu_nodes < <(k get nodes -l nvidia.com/gpu.present=true -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
if [ ${#gpu_nodes[@]} -eq 0 ]; then
  echo "no node labelled nvidia.com/gpu.present=true; is $config the config this cluster was created with?" >&2
  exit 1
fi

for node in "${gpu_nodes[@]}"; do
  step "GPU visible inside node $node"
  if ! docker exec "$node" nvidia-smi -L; then
    echo "node $node sees no GPU: the host's docker must use the nvidia runtime by default with" >&2
    echo "accept-nvidia-visible-devices-as-volume-mounts=true (run 'make preflight'), then 'make kind-down kind-up'" >&2
    exit 1
  fi

  step "NVIDIA container toolkit $ctk_version inside $node"
  if docker exec "$node" dpkg-query -W -f='${Version}' nvidia-container-toolkit 2>/dev/null | grep -qx "$ctk_version"; then
    echo "already installed"
  else
    docker exec -e CTK_VERSION="$ctk_version" "$node" bash -euo pipefail -c '
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq gpg curl ca-certificates >/dev/null
      curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey \
        | gpg --batch --yes --dearmor -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
      curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
        | sed "s#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g" \
        > /etc/apt/sources.list.d/nvidia-container-toolkit.list
      apt-get update -qq
      apt-get install -y -qq \
        "nvidia-container-toolkit=$CTK_VERSION" "nvidia-container-toolkit-base=$CTK_VERSION" \
        "libnvidia-container-tools=$CTK_VERSION" "libnvidia-container1=$CTK_VERSION" >/dev/null
    '
  fi

  # --config-source=file, as upstream nvkind does since NVIDIA/nvkind PR #76 (pkg/nvkind/node.go,
  # ConfigureContainerRuntime): `command` reads `containerd config dump`, which on the containerd 2.x
  # of kind v0.29 nodes does not tell which schema version /etc/containerd/config.toml uses (kind
  # writes version 2), so nvidia-ctk generated a config for the wrong version. kind's file holds
  # everything nvidia-ctk needs. The pinned toolkit (1.17.8) already has the flag.
  # Unlike nvkind we also pass --set-as-default: KFP task pods cannot set runtimeClassName (the KFP
  # kubernetes platform spec has no such field), and without the nvidia runtime the GPU the device
  # plugin allocated would never be mounted into them.
  step "containerd in $node: nvidia runtime (default)"
  docker exec "$node" bash -euo pipefail -c '
    nvidia-ctk runtime configure --runtime=containerd --config-source=file --set-as-default
    systemctl restart containerd
  '
done

step "wait for nodes Ready"
k wait --for=condition=Ready nodes --all --timeout=180s

step "RuntimeClass nvidia and the NVIDIA device plugin"
k apply -k "$root/manifests/gpu"
k -n kube-system rollout status daemonset/nvidia-device-plugin-daemonset --timeout=300s

for node in "${gpu_nodes[@]}"; do
  printf 'waiting for %s to advertise nvidia.com/gpu' "$node"
  for _ in $(seq 1 60); do
    gpus="$(k get node "$node" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')"
    [ -n "$gpus" ] && [ "$gpus" != "0" ] && break
    printf '.'; sleep 2
  done
  echo
  if [ -z "$gpus" ] || [ "$gpus" = "0" ]; then
    echo "node $node advertises no nvidia.com/gpu; device plugin logs:" >&2
    k -n kube-system logs daemonset/nvidia-device-plugin-daemonset --tail=50 >&2 || true
    exit 1
  fi
  echo "$node: nvidia.com/gpu = $gpus"
done

step "GPU smoke test"
KUBE_CONTEXT="$context" "$root/scripts/gpu-check.sh"

step "Kubeflow Pipelines"
KUBE_CONTEXT="$context" "$root/scripts/kfp-install.sh"

step "ready"
echo "cluster '$cluster' is up: GPU worker(s) ${gpu_nodes[*]}, KFP in namespace kubeflow."
echo "next: make images kind-load kind-submit"
