# Kubernetes side of sam-pipeline: images, a kind cluster with a GPU worker, KFP, submit/schedule.
# Included by the top-level Makefile (`include mk/kubernetes.mk`); every variable can be overridden
# on the command line, e.g. `make images IMAGE_REGISTRY=registry.example.com/ml IMAGE_TAG=0.1.1`.
# IMAGE_TAG defaults to a hash of what goes into the images (pipelines/image_tag.py), the tag the committed
# YAML names: a change to the sources or pins gives a new tag, so KFP's cache never reuses a stale image.
# Runbook: docs/kubernetes.md.

# Repository root, resolved from this file so the targets work from any include site.
SAM_K8S_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)

IMAGE_REGISTRY ?= localhost
PYTHON3 ?= python3
IMAGE_TAG ?= $(shell cd $(SAM_K8S_ROOT) && $(PYTHON3) -m pipelines.image_tag)
IMAGE_STEPS := fetch-weights ingest-dataset finetune evaluate register-model
# Steps that run on the GPU worker; kind-load puts their (large) images only there, and they are
# built from images/torch/Dockerfile (the others from images/light/Dockerfile).
GPU_IMAGE_STEPS := finetune evaluate
# step:extra, the pyproject extra each image installs (pipelines/images.py EXTRAS; a test pins them equal).
IMAGE_EXTRAS := fetch-weights:weights ingest-dataset:ingest finetune:train evaluate:train register-model:registry
image_extra = $(patsubst $(1):%,%,$(filter $(1):%,$(IMAGE_EXTRAS)))
image_kind = $(if $(filter $(1),$(GPU_IMAGE_STEPS)),torch,light)
image_ref = $(IMAGE_REGISTRY)/sam-pipeline-$(1):$(IMAGE_TAG)

DOCKER ?= docker
KIND ?= kind
KUBECTL ?= kubectl
KIND_CLUSTER ?= sam-pipeline
KIND_CONTEXT := kind-$(KIND_CLUSTER)
SAM_PIPELINE ?= $(SAM_K8S_ROOT)/.venv/bin/sam-pipeline
# kind-submit/kind-schedule compile a package for the images `make images` built into build/, so the
# committed pipelines/sam_finetune.yaml stays as it is whatever IMAGE_REGISTRY/IMAGE_TAG say.
SAM_PACKAGE ?= $(SAM_K8S_ROOT)/build/sam_finetune.yaml
# COMPILE_ARGS: more compile flags, e.g. the GPU tasks' sizing `make preflight` prints (--cpu/--memory).
COMPILE_ARGS ?=
SAM_COMPILE ?= $(SAM_PIPELINE) compile --registry $(IMAGE_REGISTRY) --tag $(IMAGE_TAG) -o $(SAM_PACKAGE) $(COMPILE_ARGS)
KFP_LOCAL_PORT ?= 8080
KFP_HOST ?= http://localhost:$(KFP_LOCAL_PORT)
KFP_EXPERIMENT ?= sam-pipeline
# Extra arguments for submit/schedule, e.g. SUBMIT_ARGS="-p n_iterations=50 -p model_type=vit_t".
SUBMIT_ARGS ?=
SCHEDULE_ARGS ?=
# KFP recurring runs take a 6-field cron, seconds first: 03:00:00 every day.
SCHEDULE_CRON ?= 0 0 3 * * *
S3_LOCAL_PORT ?= 9000

.PHONY: images images-smoke $(addprefix image-,$(IMAGE_STEPS)) kind-load preflight kind-up kind-gpu-check \
        kind-kfp kind-model-registry kind-submit kind-schedule kind-ui kind-s3-forward kind-down

images: $(addprefix image-,$(IMAGE_STEPS)) ## build all five step images with one tag

# BuildKit reads images/<kind>/Dockerfile.dockerignore, so the context (the repo root) stays small.
$(addprefix image-,$(IMAGE_STEPS)): image-%:
	DOCKER_BUILDKIT=1 $(DOCKER) build -f $(SAM_K8S_ROOT)/images/$(call image_kind,$*)/Dockerfile \
		--build-arg EXTRA=$(call image_extra,$*) -t $(call image_ref,$*) $(SAM_K8S_ROOT)

# Needs a running Docker engine (dockerd --bridge=none) and debootstrap; SMOKE_TORCH=0 leaves out the torch images.
# DOCKER is passed on only when set: by default the script picks a client that can build with BuildKit.
# SMOKE_PYTHON is the project's venv Python (moto, minio and kfp run on the host side).
SMOKE_PYTHON ?= $(SAM_K8S_ROOT)/.venv/bin/python
images-smoke: ## build the five images on a stand-in base and run their compiled steps inside them
	$(if $(filter command line environment,$(origin DOCKER)),DOCKER=$(DOCKER)) $(SMOKE_PYTHON) $(SAM_K8S_ROOT)/scripts/images-smoke.py

kind-load: ## load the images into the kind cluster (GPU images onto the GPU worker only)
	$(KIND) load docker-image --name $(KIND_CLUSTER) \
		$(foreach s,$(filter-out $(GPU_IMAGE_STEPS),$(IMAGE_STEPS)),$(call image_ref,$(s)))
	gpu_nodes="$$($(KUBECTL) --context $(KIND_CONTEXT) get nodes -l nvidia.com/gpu.present=true \
		-o jsonpath='{range .items[*]}{.metadata.name}{","}{end}')"; \
	test -n "$$gpu_nodes" || { echo "no GPU node in kind cluster $(KIND_CLUSTER)" >&2; exit 1; }; \
	$(KIND) load docker-image --name $(KIND_CLUSTER) --nodes "$${gpu_nodes%,}" \
		$(foreach s,$(GPU_IMAGE_STEPS),$(call image_ref,$(s)))

preflight: ## check docker, kind and kubectl versions, the NVIDIA driver (R580+), toolkit and inotify limits
	$(SAM_K8S_ROOT)/scripts/preflight.sh

kind-up: preflight ## kind cluster + GPU worker + device plugin + GPU smoke test + KFP 2.17.0
	KIND_CLUSTER=$(KIND_CLUSTER) $(SAM_K8S_ROOT)/scripts/kind-up.sh

kind-gpu-check: ## run nvidia-smi in a pod shaped as the compiled finetune task (no runtime class)
	KUBE_CONTEXT=$(KIND_CONTEXT) $(SAM_K8S_ROOT)/scripts/gpu-check.sh

kind-kfp: ## (re)install Kubeflow Pipelines standalone and wait until ready
	KUBE_CONTEXT=$(KIND_CONTEXT) $(SAM_K8S_ROOT)/scripts/kfp-install.sh

kind-model-registry: ## optional: Kubeflow Model Registry in namespace kubeflow
	$(KUBECTL) --context $(KIND_CONTEXT) apply -k $(SAM_K8S_ROOT)/manifests/model-registry
	$(KUBECTL) --context $(KIND_CONTEXT) -n kubeflow rollout status deployment/model-registry-deployment --timeout=600s
	@echo "model registry ready: pass -p model_registry_url=http://model-registry-service.kubeflow.svc.cluster.local:8080"

kind-submit: ## compile (build/), then submit one run to KFP in kind and wait for it
	$(SAM_COMPILE)
	KUBE_CONTEXT=$(KIND_CONTEXT) $(SAM_K8S_ROOT)/scripts/port-forward.sh kubeflow ml-pipeline-ui $(KFP_LOCAL_PORT):80 -- \
		$(SAM_PIPELINE) submit --host $(KFP_HOST) --package $(SAM_PACKAGE) --experiment $(KFP_EXPERIMENT) \
		--wait $(SUBMIT_ARGS)

kind-schedule: ## compile (build/), then create the nightly recurring run ($(SCHEDULE_CRON))
	$(SAM_COMPILE)
	KUBE_CONTEXT=$(KIND_CONTEXT) $(SAM_K8S_ROOT)/scripts/port-forward.sh kubeflow ml-pipeline-ui $(KFP_LOCAL_PORT):80 -- \
		$(SAM_PIPELINE) schedule --host $(KFP_HOST) --package $(SAM_PACKAGE) --experiment $(KFP_EXPERIMENT) \
		--cron "$(SCHEDULE_CRON)" $(SCHEDULE_ARGS)

kind-ui: ## KFP UI on http://localhost:$(KFP_LOCAL_PORT) until Ctrl-C
	$(KUBECTL) --context $(KIND_CONTEXT) -n kubeflow port-forward svc/ml-pipeline-ui $(KFP_LOCAL_PORT):80

kind-s3-forward: ## SeaweedFS S3 on localhost:$(S3_LOCAL_PORT) until Ctrl-C (staging for air-gapped runs)
	$(KUBECTL) --context $(KIND_CONTEXT) -n kubeflow port-forward svc/seaweedfs $(S3_LOCAL_PORT):9000

kind-down: ## delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)
