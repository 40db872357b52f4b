#!/usr/bin/env bash
# Host preflight for `make kind-up`: checks every tool and GPU setting the kind GPU cluster needs,
# prints the fix for each missing piece, and exits non-zero listing all of them (not just the first).
#
#   scripts/preflight.sh          fast checks (no containers started)
#   scripts/preflight.sh --deep   also runs a container the way kind's GPU worker will (pulls ubuntu)
#
# NVIDIA_CTK_CONFIG overrides the toolkit config path (default /etc/nvidia-container-runtime/config.toml).
set -uo pipefail

deep=0
case "${1:-}" in
  --deep) deep=1 ;;
  "") ;;
  *) echo "usage: $0 [--deep]" >&2; exit 2 ;;
esac

ctk_config="${NVIDIA_CTK_CONFIG:-/etc/nvidia-container-runtime/config.toml}"
missing=()

ok() { printf '  ok       %-46s %s\n' "$1" "$2"; }
warn() { printf '  warning  %-46s %s\n' "$1" "$2"; }
bad() {
  # $1 = what, $2 = why, $3 = fix
  printf '  MISSING  %-46s %s\n           fix: %s\n' "$1" "$2" "$3"
  missing+=("$1")
}
have() { command -v "$1" >/dev/null 2>&1; }

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

if have kind; then
  ok kind "$(kind version 2>/dev/null | head -n1)"
else
  bad kind "not on PATH (v0.29.0 or newer: the node image is kindest/node:v1.33.1)" \
    "go install sigs.k8s.io/kind@v0.29.0, or https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
fi

if have kubectl; then
  ok kubectl "$(kubectl version --client 2>/dev/null | head -n1)"
else
  bad kubectl "not on PATH (1.31 or newer; its built-in kustomize installs KFP)" \
    "https://kubernetes.io/docs/tasks/tools/"
fi

if have helm; then
  ok helm "$(helm version --short 2>/dev/null || echo present)"
else
  bad helm "not on PATH (for the NVIDIA GPU Operator route in docs/kubernetes.md and chart-based add-ons)" \
    "https://helm.sh/docs/intro/install/"
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

# --- soft limits ------------------------------------------------------------------------------------
# KFP plus kind exhaust the default inotify instances ("too many open files" in pods).
if [ -r /proc/sys/fs/inotify/max_user_instances ]; then
  inst="$(cat /proc/sys/fs/inotify/max_user_instances)"
  if [ "$inst" -lt 512 ]; then
    warn "fs.inotify.max_user_instances" "$inst < 512; fix: sudo sysctl fs.inotify.max_user_instances=512"
  fi
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
