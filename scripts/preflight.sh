#!/usr/bin/env bash
# Host preflight for `make kind-up`: checks every tool and GPU setting the kind GPU cluster needs,
# prints the fix for each missing piece, and exits non-zero listing all of them (not just the first).
#
#   scripts/preflight.sh                 fast checks (no containers started)
#   scripts/preflight.sh --deep          also runs a container the way kind's GPU worker will (pulls ubuntu)
#   scripts/preflight.sh --gpu-operator  also requires helm (the GPU Operator route in docs/kubernetes.md)
#
# NVIDIA_CTK_CONFIG overrides the toolkit config path (default /etc/nvidia-container-runtime/config.toml).
# The sizing section reads the kind GPU worker's allocatable CPU and memory (KUBE_CONTEXT, default
# kind-$KIND_CLUSTER), or the host's (nproc, MEMINFO default /proc/meminfo) before the cluster exists, and
# prints which `sam-pipeline compile` flags fit (pipelines/resources.py decides; python3, no venv needed).
set -uo pipefail

deep=0 gpu_operator=0
for arg in "$@"; do
  case "$arg" in
    --deep) deep=1 ;;
    --gpu-operator) gpu_operator=1 ;;
    *) echo "usage: $0 [--deep] [--gpu-operator]" >&2; exit 2 ;;
  esac
done

# Minimums, each with the reason it exists.
# kind v0.29.0 is the release whose node image (kindest/node:v1.33.1) manifests/kind/cluster.yaml pins.
KIND_MIN=0.29.0
# kubectl 1.31: its built-in kustomize (v5) renders the pinned KFP and Model Registry bases.
KUBECTL_MIN=1.31.0
# The finetune and evaluate images carry torch 2.14.1's CUDA 13 build from PyPI, whose CUDA 13.0
# runtime needs an R580 or newer driver on the node (NVIDIA's CUDA toolkit release notes, table of
# minimum driver versions); an older driver leaves torch.cuda.is_available() False in the pod.
DRIVER_MIN=580
# kind's known issues: below these, pods fail with "too many open files" once KFP runs.
INOTIFY_INSTANCES_MIN=512
INOTIFY_WATCHES_MIN=524288

ctk_config="${NVIDIA_CTK_CONFIG:-/etc/nvidia-container-runtime/config.toml}"
missing=()

ok() { printf '  ok       %-46s %s\n' "$1" "$2"; }
info() { printf '  -        %-46s %s\n' "$1" "$2"; }
warn() { printf '  warning  %-46s %s\n' "$1" "$2"; }
bad() {
  # $1 = what, $2 = why, $3 = fix
  printf '  MISSING  %-46s %s\n           fix: %s\n' "$1" "$2" "$3"
  missing+=("$1")
}
have() { command -v "$1" >/dev/null 2>&1; }
# First dotted version number (digits only) in stdin, e.g. "kind v0.29.0 go1.24" -> 0.29.0.
version_in() { grep -Eo '[0-9]+(\.[0-9]+)+' | head -n1; }
# version_ge A B: A >= B, comparing up to three dot-separated numeric fields.
version_ge() {
  local IFS=.
  local -a a b
  read -r -a a <<<"$1"
  read -r -a b <<<"$2"
  for i in 0 1 2; do
    if (( 10#${a[i]:-0} != 10#${b[i]:-0} )); then
      (( 10#${a[i]:-0} > 10#${b[i]:-0} ))
      return
    fi
  done
  return 0
}

# tool_at_least TOOL MIN SHOWN_MIN WHY FIX VERSION_COMMAND...: TOOL is on PATH and the first line of its
# version command names MIN or newer; otherwise one MISSING line with WHY (why the minimum) and FIX.
tool_at_least() {
  local tool=$1 min=$2 shown=$3 why=$4 fix=$5 out ver
  shift 5
  if ! have "$tool"; then
    bad "$tool" "not on PATH ($shown or newer; $why)" "$fix"
    return
  fi
  out="$("$@" 2>/dev/null | head -n1)"
  ver="$(printf '%s\n' "$out" | version_in)"
  if [ -n "$ver" ] && version_ge "$ver" "$min"; then
    ok "$tool" "$out"
  else
    bad "$tool >= $shown" "found '${out:-no version}' ($why)" "$fix"
  fi
}

echo "sam-pipeline preflight (kind cluster with a GPU worker)"

# --- tools ---------------------------------------------------------------------------------------
if ! have docker; then
  bad docker "not on PATH" "install Docker Engine: https://docs.docker.com/engine/install/"
elif ! docker info >/dev/null 2>&1; then
  bad "docker daemon" "'docker info' failed (daemon down or no permission)" \
    "sudo systemctl start docker; sudo usermod -aG docker \"\$USER\" and log in again"
else
  ok docker "$(docker version --format '{{.Server.Version}}' 2>/dev/null || echo present)"
fi

tool_at_least kind "$KIND_MIN" "v$KIND_MIN" "the node image is kindest/node:v1.33.1" \
  "go install sigs.k8s.io/kind@v$KIND_MIN, or https://kind.sigs.k8s.io/docs/user/quick-start/#installation" \
  kind version
tool_at_least kubectl "$KUBECTL_MIN" "v${KUBECTL_MIN%.0}" "its built-in kustomize installs KFP" \
  "https://kubernetes.io/docs/tasks/tools/ (any kubectl v${KUBECTL_MIN%.0} or newer)" \
  kubectl version --client

# helm: nothing in `make kind-up` uses it; only the GPU Operator route (docs/kubernetes.md section 5).
if have helm; then
  ok "helm (GPU Operator route only)" "$(helm version --short 2>/dev/null || echo present)"
elif [ "$gpu_operator" = 1 ]; then
  bad helm "not on PATH (the GPU Operator is installed with its helm chart)" "https://helm.sh/docs/intro/install/"
else
  info "helm (GPU Operator route only)" "not on PATH; not needed for 'make kind-up'"
fi

if have git; then
  ok git "$(git --version 2>/dev/null)"
else
  bad git "not on PATH (kustomize clones the pinned KFP and Model Registry bases with it)" \
    "sudo apt-get install -y git"
fi

# --- NVIDIA driver and container toolkit -----------------------------------------------------------
if ! have nvidia-smi; then
  bad "NVIDIA driver (nvidia-smi)" "nvidia-smi not on PATH" \
    "install the NVIDIA driver: https://www.nvidia.com/download/index.aspx (then reboot)"
elif ! gpus="$(nvidia-smi -L 2>&1)" || [ -z "$gpus" ]; then
  bad "NVIDIA driver (nvidia-smi)" "'nvidia-smi -L' failed: ${gpus:-no GPU listed}" \
    "check the driver install (dmesg | grep -i nvidia); reboot after a driver upgrade"
else
  ok "NVIDIA driver (nvidia-smi)" "$(printf '%s\n' "$gpus" | head -n1)"
  # One line per GPU, all with the same driver; the first is enough.
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | version_in)"
  if [ -z "$driver" ]; then
    bad "NVIDIA driver >= R$DRIVER_MIN" "could not read the driver version (nvidia-smi --query-gpu=driver_version)" \
      "check the driver install (dmesg | grep -i nvidia)"
  elif version_ge "$driver" "$DRIVER_MIN"; then
    ok "NVIDIA driver >= R$DRIVER_MIN" "$driver (the images' torch 2.14.1 CUDA 13 build needs R$DRIVER_MIN+)"
  else
    bad "NVIDIA driver >= R$DRIVER_MIN" "driver $driver is too old: the finetune/evaluate images carry torch 2.14.1's CUDA 13 build, which needs R$DRIVER_MIN or newer (torch would not see the GPU)" \
      "install an R$DRIVER_MIN+ driver: https://www.nvidia.com/download/index.aspx (or your distribution's nvidia-driver-$DRIVER_MIN package), then reboot"
  fi
fi

if have nvidia-ctk; then
  ok "NVIDIA container toolkit" "$(nvidia-ctk --version 2>/dev/null | head -n1)"
else
  bad "NVIDIA container toolkit (nvidia-ctk)" "nvidia-ctk not on PATH" \
    "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html (apt-get install -y nvidia-container-toolkit)"
fi

if have docker && docker info >/dev/null 2>&1; then
  runtime="$(docker info --format '{{.DefaultRuntime}}' 2>/dev/null)"
  if [ "$runtime" = "nvidia" ]; then
    ok "docker default runtime" "nvidia"
  else
    bad "docker default runtime = nvidia" "default runtime is '${runtime:-unknown}'" \
      "sudo nvidia-ctk runtime configure --runtime=docker --set-as-default && sudo systemctl restart docker"
  fi
fi

# nvkind's trick: a /dev/null mount onto /var/run/nvidia-container-devices/all selects the GPUs,
# which the toolkit honours only with this flag.
if [ -r "$ctk_config" ] && grep -Eq '^[[:space:]]*accept-nvidia-visible-devices-as-volume-mounts[[:space:]]*=[[:space:]]*true' "$ctk_config"; then
  ok "accept-nvidia-visible-devices-as-volume-mounts" "true in $ctk_config"
else
  bad "accept-nvidia-visible-devices-as-volume-mounts" "not 'true' in $ctk_config" \
    "sudo nvidia-ctk config --set accept-nvidia-visible-devices-as-volume-mounts=true --in-place && sudo systemctl restart docker"
fi

# --- kernel limits ----------------------------------------------------------------------------------
# KFP plus kind exhaust the default inotify instances and watches: pods (kube-proxy, the KFP
# controllers) then fail with "too many open files" long after the cluster came up.
inotify_check() {
  # $1 = sysctl key, $2 = minimum
  local value
  if ! have sysctl; then
    warn "$1" "cannot check: sysctl not on PATH"
  elif ! value="$(sysctl -n "$1" 2>/dev/null)" || ! [[ "$value" =~ ^[0-9]+$ ]]; then
    warn "$1" "cannot check: 'sysctl -n $1' failed"
  elif [ "$value" -ge "$2" ]; then
    ok "$1" "$value"
  else
    bad "$1 >= $2" "is $value; kind pods fail with \"too many open files\"" \
      "sudo sysctl -w $1=$2 (and add '$1 = $2' to /etc/sysctl.d/99-kind.conf to keep it)"
  fi
}
inotify_check fs.inotify.max_user_instances "$INOTIFY_INSTANCES_MIN"
inotify_check fs.inotify.max_user_watches "$INOTIFY_WATCHES_MIN"

# --- sizing of the GPU tasks ---------------------------------------------------------------------------
# A task pod that requests more CPU or memory than the GPU node has left stays Pending forever.
root="$(cd "$(dirname "$0")/.." && pwd)"
kube_context="${KUBE_CONTEXT:-kind-${KIND_CLUSTER:-sam-pipeline}}"
meminfo="${MEMINFO:-/proc/meminfo}"
quantity='^[0-9]+(\.[0-9]+)?m? [0-9]+(Ki|Mi|Gi|k|M|G)?$'
alloc="" where="" host_flag=()
if have kubectl; then
  alloc="$(kubectl --context "$kube_context" get nodes -l nvidia.com/gpu.present=true \
    -o jsonpath='{.items[0].status.allocatable.cpu} {.items[0].status.allocatable.memory}' 2>/dev/null)"
  where="GPU node of $kube_context"
fi
if ! [[ "$alloc" =~ $quantity ]]; then
  # Before the cluster: a kind node's capacity is the host's (kubelet then takes off its eviction threshold).
  alloc="$(nproc 2>/dev/null) $(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1Ki/p' "$meminfo" 2>/dev/null)"
  where="host (no kind GPU node yet)" host_flag=(--host)
fi
if ! have python3; then
  warn "GPU task sizing" "cannot check: python3 not on PATH"
elif ! [[ "$alloc" =~ $quantity ]]; then
  warn "GPU task sizing" "cannot read the CPU and memory of the $where"
else
  read -r alloc_cpu alloc_memory <<<"$alloc"
  if sizing="$(cd "$root" && python3 -m pipelines.resources "${host_flag[@]}" "$alloc_cpu" "$alloc_memory" 2>&1)"; then
    ok "GPU task sizing ($where)" "the compile defaults fit"
  else
    warn "GPU task sizing ($where)" "the compile defaults would stay Pending there"
  fi
  while IFS= read -r line; do printf '           %s\n' "$line"; done <<<"$sizing"
fi

if [ "$deep" = 1 ] && [ ${#missing[@]} -eq 0 ]; then
  if out="$(docker run --rm -v /dev/null:/var/run/nvidia-container-devices/all ubuntu:24.04 nvidia-smi -L 2>&1)"; then
    ok "GPU through a /dev/null mount" "$(printf '%s\n' "$out" | head -n1)"
  else
    bad "GPU through a /dev/null mount" "docker run ... nvidia-smi -L failed: $(printf '%s\n' "$out" | tail -n1)" \
      "re-run the two toolkit fixes above, then: sudo systemctl restart docker"
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo
  summary="$(printf '%s, ' "${missing[@]}")"
  echo "preflight FAILED: ${#missing[@]} missing: ${summary%, }" >&2
  exit 1
fi
echo
echo "preflight passed: ready for 'make kind-up'"
