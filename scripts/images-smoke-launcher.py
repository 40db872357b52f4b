"""The KFP 2.17 launcher's side of `make images-smoke`: run one step's compiled command and args in its
image as the launcher would, then read back its outputs. Loaded by scripts/images-smoke.py.

Upstream (kubeflow/pipelines at 2.17.0): backend/src/v2/driver/driver.go (the executor input: output URIs
<pipeline root>/<task>/<salt>/<name>, parameter outputs /tmp/kfp/outputs/<name>, the output file under
/minio), backend/src/v2/compiler/argocompiler/container.go (the scratch emptyDirs), and
backend/src/v2/component/launcher_v2.go (inputs downloaded before, outputs uploaded after the command).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from components.kfp_components import TASK_IMAGES
from pipelines import images

# The launcher's scratch emptyDirs (container.go at 2.17.0); /minio is a host folder so outputs can be read.
LAUNCHER_EMPTYDIRS = ("/gcs", "/s3", "/.local", "/.cache", "/.config")
ARTIFACT_ROOT = "v2/artifacts/sam-finetune"


def log(msg: str) -> None:
    print(f"[images-smoke] {msg}", flush=True)


class Compiled:
    """The compiled pipeline: each step's container spec and its Kubernetes platform spec."""

    def __init__(self, path: Path):
        docs = list(yaml.safe_load_all(path.read_text()))
        self.spec = docs[0]
        self.platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
        self.defaults = {k: v.get("defaultValue") for k, v in
                         self.spec["root"]["inputDefinitions"]["parameters"].items()}

    def component(self, step: str) -> dict:
        return self.spec["components"][f"comp-{step}"]

    def executor(self, step: str) -> tuple[dict, dict]:
        label = self.component(step)["executorLabel"]
        return self.spec["deploymentSpec"]["executors"][label]["container"], self.platform.get(label, {})


# The pipeline's defaults come back from YAML as floats (200.0); the driver passes typed JSON values.
def _json(value):
    """A STRUCT or LIST parameter: as read back from an output parameter file (JSON text) or already parsed."""
    return json.loads(value) if isinstance(value, str) else value


CASTS = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "STRING": str, "STRUCT": _json,
         "LIST": _json}


def executor_input(comp: dict, params: dict, inputs: dict, out_root: str) -> dict:
    """The JSON the driver hands the launcher (backend/src/v2/driver/driver.go at 2.17.0: output URIs
    are <pipeline root>/<task>/<salt>/<name>; parameter outputs go to /tmp/kfp/outputs/<name>)."""
    declared = comp.get("inputDefinitions", {})
    missing = set(declared.get("parameters", {})) - set(params)
    if missing:
        raise RuntimeError(f"no value for compiled input parameter(s) {sorted(missing)}")
    artifacts = {}
    for name, spec in declared.get("artifacts", {}).items():
        # An artifact list (dsl.Collected: finetune's `embeddings`) is handed over as the list itself.
        artifacts[name] = {"artifacts": list(inputs[name]) if spec.get("isArtifactList") else [inputs[name]]}
    outputs = comp.get("outputDefinitions", {})
    return {
        "inputs": {"parameterValues": {k: CASTS.get(v["parameterType"], str)(params[k])
                                       for k, v in declared.get("parameters", {}).items()}, "artifacts": artifacts},
        "outputs": {
            "artifacts": {name: {"artifacts": [{"name": name, "type": spec["artifactType"], "metadata": {},
                                                "uri": f"minio://{out_root}/{name}"}]}
                          for name, spec in outputs.get("artifacts", {}).items()},
            "parameters": {name: {"outputFile": f"/tmp/kfp/outputs/{name}"} for name in outputs.get("parameters", {})},
            "outputFile": f"/minio/{out_root}/output_metadata.json",
        },
    }


def image_env(docker: Docker, ref: str) -> dict[str, str]:
    out = docker("image", "inspect", "--format", "{{json .Config.Env}}", ref, capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in json.loads(out))


def resolve_placeholders(items: list[str], exec_input: dict) -> list[str]:
    blob = json.dumps(exec_input)
    unknown = [s for s in items if "{{$" in s and s != "{{$}}"]
    if unknown:
        raise RuntimeError(f"placeholders this runner does not model: {unknown}")
    return [blob if s == "{{$}}" else s for s in items]


def run_step(docker: Docker, compiled: Compiled, step: str, ref: str, params: dict, inputs: dict, *,
             work: Path, store, s3_keys: tuple[str, str]) -> dict:
    """Run one compiled step; return {"executor_output": ..., "artifacts": {name: runtime artifact},
    "parameters": {name: value}}."""
    container, platform = compiled.executor(step)
    compiled_ref = container["image"]
    expected = images.image_refs()[TASK_IMAGES[step]]  # embed and check-changes run on another step's image
    if compiled_ref != expected:
        raise RuntimeError(f"{step}: compiled image {compiled_ref} is not {expected}")
    bucket = params.get("bucket", compiled.defaults["bucket"])
    out_root = f"{bucket}/{ARTIFACT_ROOT}/smoke-run/{step}/{hashlib.sha256(step.encode()).hexdigest()[:8]}"
    exec_input = executor_input(compiled.component(step), params, inputs, out_root)
    home = image_env(docker, ref).get("HOME", "/home/sam")
    # Every emptyDir is a fresh world-writable node folder (docker's tmpfs would take the image folder's
    # owner and mode instead). /minio and /tmp/kfp/outputs are read back afterwards, as the launcher does.
    # A read-only root also needs HOME writable (the weights cache SAM_MODELS lives there): a pod with
    # readOnlyRootFilesystem needs an emptyDir there too.
    scratch = {"/minio": "minio", "/tmp/kfp/outputs": "kfp-outputs", home: "home",
               **{d: d.strip("/") for d in LAUNCHER_EMPTYDIRS}}
    scratch.update({m["mountPath"]: m["volumeName"] for m in platform.get("emptyDirMounts", [])
                    if m["mountPath"] != "/dev/shm"})
    shutil.rmtree(work / "run" / step, ignore_errors=True)
    mounts = []
    for path, name in scratch.items():
        folder = work / "run" / step / name
        folder.mkdir(parents=True)
        folder.chmod(0o777)
        mounts += ["-v", f"{folder}:{path}"]
    minio_dir, outputs_dir = work / "run" / step / "minio", work / "run" / step / "kfp-outputs"
    # The launcher downloads each input artifact from the store to the path the SDK derives from its URI.
    for art in [a for value in inputs.values() for a in (value if isinstance(value, list) else [value])]:
        local = minio_dir / art["uri"].removeprefix("minio://")
        local.parent.mkdir(parents=True, exist_ok=True)
        store.fget_object(*art["uri"].removeprefix("minio://").split("/", 1), str(local))
        for p in [local, *local.parents]:
            if p == minio_dir:
                break
            p.chmod(0o777 if p.is_dir() else 0o644)
    env = []
    for secret in platform.get("secretAsEnv", []):
        for item in secret["keyToEnv"]:
            value = {"accesskey": s3_keys[0], "secretkey": s3_keys[1]}[item["secretKey"]]
            env += ["-e", f"{item['envVar']}={value}"]
    shm = [m for m in platform.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
    if shm:  # the compiled Memory emptyDir for PyTorch's DataLoader workers
        mounts += ["--shm-size", shm[0].get("sizeLimit", "64Mi").replace("Gi", "g").replace("Mi", "m")]
    cmd = resolve_placeholders(container["command"], exec_input) + resolve_placeholders(container["args"], exec_input)
    started = time.monotonic()
    # /tmp is writable scratch (the compiled command runs `mktemp -d`); the rest of the root is read-only.
    proc = subprocess.run([docker.bin, "run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
                           "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *mounts, *env,
                           "--entrypoint", cmd[0], ref, *cmd[1:]], capture_output=True, text=True)
    # The step's whole output stays next to its folders; a failure shows its end.
    (work / "run" / step / "log.txt").write_text(proc.stdout + proc.stderr)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    if proc.returncode != 0:
        raise RuntimeError(f"{step}: compiled command exited {proc.returncode} in {ref}:\n{tail}")
    log(f"{step}: compiled command ok in {time.monotonic() - started:.0f} s")
    result = read_outputs(exec_input, minio_dir, outputs_dir, store, step)
    return result


def read_outputs(exec_input: dict, minio_dir: Path, outputs_dir: Path, store, step: str) -> dict:
    """What the launcher does after the command: read the executor output, upload the artifacts."""
    out_file = minio_dir / exec_input["outputs"]["outputFile"].removeprefix("/minio/")
    if not out_file.is_file():
        raise RuntimeError(f"{step}: no executor output file {exec_input['outputs']['outputFile']}")
    executor_output = json.loads(out_file.read_text())
    artifacts = {}
    for name, spec in exec_input["outputs"]["artifacts"].items():
        art = dict(spec["artifacts"][0])
        produced = executor_output.get("artifacts", {}).get(name, {}).get("artifacts", [{}])[0]
        art["metadata"] = produced.get("metadata", {})
        local = minio_dir / art["uri"].removeprefix("minio://")
        if not local.is_file():
            # The launcher tolerates a missing file (launcher_v2.go uploadOutputArtifacts); a Metrics
            # artifact is only its metadata. Any other artifact is what the next step reads: require it.
            if spec["artifacts"][0]["type"].get("schemaTitle") == "system.Metrics":
                artifacts[name] = art
                continue
            raise RuntimeError(f"{step}: output artifact {name} was not written to /minio/{local.relative_to(minio_dir)}")
        store.fput_object(*art["uri"].removeprefix("minio://").split("/", 1), str(local))
        artifacts[name] = art
    parameters = dict(executor_output.get("parameterValues", {}))
    for name in exec_input["outputs"]["parameters"]:
        if name not in parameters and (outputs_dir / name).is_file():
            parameters[name] = (outputs_dir / name).read_text()
        if name not in parameters:
            raise RuntimeError(f"{step}: output parameter {name} was not written")
    return {"executor_output": executor_output, "artifacts": artifacts, "parameters": parameters}
