"""`make images-smoke`: build the step images and run each step's compiled command inside its image,
the way the KFP 2.17 launcher runs it, chained through a real S3 server on loopback.

What it does (issue 13):
  1. A stand-in for python:3.11-slim-bookworm (no registry can be reached here): a Debian bookworm root
     filesystem from `debootstrap --variant=minbase` + `docker import`, cached by the hash of its recipe.
  2. Each light image is built from images/light/Dockerfile with only the FROM line replaced.
  3. Each step's command and args are read from the compiled pipelines/sam_finetune.yaml at run time
     and run in its image with what the launcher gives a container: the executor input JSON for `{{$}}`,
     output URIs under minio://<bucket>/v2/artifacts/... read by the SDK as /minio/..., the emptyDirs
     of upstream backend/src/v2/compiler/argocompiler/container.go (2.17.0: /gcs /minio /s3 /.local
     /.cache /.config), the platform spec's emptyDirMounts and secretAsEnv, the image's non-root user,
     and a read-only root filesystem. Inputs are downloaded from and outputs uploaded to the store, as
     the launcher does (backend/src/v2/component/launcher_v2.go).
  4. The torch images (finetune, evaluate): finetune for two CPU iterations, then evaluate; then
     register-model on finetune's model. SMOKE_TORCH=0 (or --light-only) leaves them out.

Run from the repository root with the project's venv: `python scripts/images-smoke.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.kfp_components import TASK_IMAGES  # noqa: E402
from components.s3server import embedded_s3  # noqa: E402
from pipelines import images  # noqa: E402


def _sibling(name: str):
    """scripts/images-smoke-<name>.py (a hyphenated file name, so loaded by path)."""
    path = Path(__file__).with_name(f"images-smoke-{name}.py")
    spec = importlib.util.spec_from_file_location(f"images_smoke_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = _sibling("launcher")
Compiled, run_step, ARTIFACT_ROOT = launcher.Compiled, launcher.run_step, launcher.ARTIFACT_ROOT

REAL_BASE = "python:3.11-slim-bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
               "bookworm"]
# Make the stand-in behave like the real base where the Dockerfiles rely on it: `python` and `pip` on
# PATH, pip allowed to install into the system interpreter (the real base's Python is not Debian's).
POST_INSTALL = """
rm -f usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf python3 usr/bin/python
ln -sf pip3 usr/bin/pip
rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/*
"""
IMPORT_CHANGES = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                  'CMD ["python3"]']
SMOKE_TAG = "smoke-standin"


def log(msg: str) -> None:
    print(f"[images-smoke] {msg}", flush=True)


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, **kw)


class Docker:
    def __init__(self, binary: str):
        self.bin = binary
        self.env = {**os.environ, "DOCKER_BUILDKIT": "1"}

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([self.bin, *args], check=True, env=self.env, **kw)

    def has_image(self, ref: str) -> bool:
        return subprocess.run([self.bin, "image", "inspect", ref], capture_output=True).returncode == 0


# -- 1. stand-in base -------------------------------------------------------------------------------

def host_ca_bundle() -> Path | None:
    """pip's CA bundle on this host, when it names a custom one (an intercepting proxy needs it)."""
    for candidate in (os.environ.get("PIP_CERT"), pip_config("global.cert")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def pip_config(key: str) -> str | None:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return out.stdout.strip().strip("'\"") or None if out.returncode == 0 else None


def remove_rootfs(rootfs: Path) -> None:
    """Delete a (possibly half-made) root filesystem. An interrupted debootstrap leaves /proc (and may
    leave /sys or /dev) mounted inside it: unmount first, and never delete through a mount."""
    inside = lambda m: m == str(rootfs) or m.startswith(f"{rootfs}/")  # noqa: E731
    mounts = lambda: [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()  # noqa: E731
                      if inside(line.split()[1])]
    for mount in sorted(mounts(), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    if mounts():
        raise RuntimeError(f"cannot unmount {mounts()}; not deleting {rootfs}")
    shutil.rmtree(rootfs, ignore_errors=True)


def standin_base(docker: Docker, work: Path) -> str:
    ca = host_ca_bundle()
    recipe = json.dumps([DEBOOTSTRAP, MIRROR, POST_INSTALL, IMPORT_CHANGES,
                         hashlib.sha256(ca.read_bytes()).hexdigest() if ca else None])
    ref = f"localhost/sam-smoke-base:bookworm-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    log(f"base: {ref} is a STAND-IN for {REAL_BASE} (debootstrap bookworm minbase + Debian's python3 3.11); "
        f"the real base cannot be pulled here")
    if docker.has_image(ref):
        log("base: cached (same recipe)")
        return ref
    rootfs = work / "rootfs"
    remove_rootfs(rootfs)
    started = time.monotonic()
    sh(*DEBOOTSTRAP, str(rootfs), MIRROR, stdout=subprocess.DEVNULL)
    sh("sh", "-ec", POST_INSTALL, cwd=rootfs)
    changes = list(IMPORT_CHANGES)
    if ca:
        shutil.copyfile(ca, rootfs / "etc/ssl/certs/host-ca-bundle.crt")
        changes.append("ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    docker("import", *[a for c in changes for a in ("--change", c)], "-", ref, stdin=tar.stdout,
           stdout=subprocess.DEVNULL)
    if tar.wait() != 0:
        raise RuntimeError("tar of the stand-in root filesystem failed")
    remove_rootfs(rootfs)
    log(f"base: built in {time.monotonic() - started:.0f} s")
    return ref


# -- 2. images --------------------------------------------------------------------------------------

def standin_dockerfile(text: str, base: str) -> str:
    """The Dockerfile with only its FROM line replaced (tests/test_images_smoke.py checks the rest)."""
    lines = text.splitlines(keepends=True)
    froms = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    if len(froms) != 1:
        raise RuntimeError(f"expected one FROM line, found {len(froms)}")
    lines[froms[0]] = f"FROM {base}\n"
    return "".join(lines)


def build(docker: Docker, step: str, base: str, work: Path) -> str:
    kind = images.image_kind(step)
    folder = work / "dockerfiles" / kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(standin_dockerfile((ROOT / "images" / kind / "Dockerfile").read_text(), base))
    # BuildKit looks for <Dockerfile>.dockerignore next to the Dockerfile it is given.
    shutil.copyfile(ROOT / "images" / kind / "Dockerfile.dockerignore", folder / "Dockerfile.dockerignore")
    ref = images.image_refs(tag=SMOKE_TAG)[step]
    started = time.monotonic()
    docker("build", "--network", "host", "-f", str(folder / "Dockerfile"), "--build-arg",
           f"EXTRA={images.EXTRAS[step]}", "-t", ref, str(ROOT))
    log(f"{step}: built {ref} from images/{kind}/Dockerfile in {time.monotonic() - started:.0f} s")
    return ref


# -- 4. the chain -----------------------------------------------------------------------------------

@contextlib.contextmanager
def http_files(folder: Path):
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"check failed: {what}")


def make_weights(folder: Path, torch_steps: bool) -> Path:
    """finetune needs a loadable vit_t state dict; without the torch images a small real checkpoint will do
    (fetch-weights refuses a file that is not a PyTorch checkpoint, but never builds the model)."""
    import torch

    path = folder / "vit_t.pth"
    torch.manual_seed(0)
    if torch_steps:
        from components.sam.model import atomic_torch_save, build_sam

        atomic_torch_save(build_sam("vit_t").state_dict(), path)
    else:
        torch.save({"weight": torch.randn(256, 512)}, path)
    return path


def chain(docker: Docker, compiled: Compiled, refs: dict[str, str], work: Path, torch_steps: bool) -> None:
    from minio import Minio

    from components.datasets.synthetic import make_pennfudan_zip
    from components.storage import ObjectStore

    assets = work / "assets"
    shutil.rmtree(assets, ignore_errors=True)
    assets.mkdir(parents=True)
    weights = make_weights(assets, torch_steps)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    make_pennfudan_zip(assets / "PennFudanPed.zip", n_fudan=4, n_penn=4, seed=0, size_range=(64, 96))
    with embedded_s3(auth=True, log_path=str(work / "s3server.log")) as cfg, http_files(assets) as url:
        client = Minio(cfg.endpoint, access_key=cfg.access_key, secret_key=cfg.secret_key, secure=False,
                       region=cfg.region)
        if not client.bucket_exists(cfg.bucket):
            client.make_bucket(cfg.bucket)
        host = ObjectStore(cfg)
        params = {**compiled.defaults, "s3_endpoint": cfg.endpoint, "bucket": cfg.bucket, "prefix": cfg.prefix,
                  "run_id": "smoke-run", "model_type": "vit_t"}
        run = lambda step, extra, inputs: run_step(  # noqa: E731
            docker, compiled, step, refs[TASK_IMAGES[step]], {**params, **extra}, inputs, work=work, store=client,
            s3_keys=(cfg.access_key, cfg.secret_key))

        fw = run("fetch-weights", {"url": f"{url}/{weights.name}", "sha256": sha}, {})
        w = fw["artifacts"]["weights"]
        check(w["metadata"].get("sha256") == sha, "fetch-weights: weights artifact metadata names the sha256")
        check(bool(host.list(host.key("weights", "vit_t", sha))), "fetch-weights: checkpoint staged in the store")

        ing = run("ingest-dataset", {"source": f"{url}/PennFudanPed.zip", "dataset_format": "penn-fudan",
                                     "categories": compiled.defaults["dataset_categories"]}, {})
        d = ing["artifacts"]["dataset"]
        manifest = json.loads(client.get_object(*d["uri"].removeprefix("minio://").split("/", 1)).read())
        check(manifest["totals"]["images"] == 8, "ingest-dataset: the manifest counts the 8 synthetic images")
        check(host.exists(manifest["root"] + "manifest.json"), "ingest-dataset: manifest.json committed in the store")

        # check-changes on register-model's light image: no champion yet, so there is something to train.
        chk = run("check-changes", {"weights_sha256": sha}, {"dataset": d})
        check(chk["parameters"]["changed"] in (True, "true"), "check-changes: no champion yet, so changed")

        if torch_steps:
            # One embed shard on the finetune image fills the store's embedding cache; finetune reads it.
            emb = run("embed", {"device": "cpu", "shard": 0, "shards": 1}, {"weights": w, "dataset": d})
            index = emb["artifacts"]["index"]
            check(index["metadata"].get("images") == 8 and index["metadata"].get("failed") in (False, 0),
                  "embed: the one shard covers the 8 images")
            train = {"device": "cpu", "n_iterations": 2, "val_every": 1, "batch_size": 1, "n_objects_per_batch": 2}
            ft = run("finetune", train, {"weights": w, "dataset": d, "embeddings": [index]})
            check(ft["artifacts"]["model"]["metadata"].get("embeddings_computed") == 0,
                  "finetune: every embedding came from the embed shard")
            model = ft["artifacts"]["model"]
            ev = run("evaluate", {"device": "cpu"}, {"weights": w, "model": model, "dataset": d})
            metrics_json = ev["parameters"]["metrics_json"]
            scores = json.loads(metrics_json)
            check("finetuned_box_dice" in scores, "evaluate: metrics_json carries the box Dice")
            log(f"evaluate: box Dice zero-shot {scores['zero_shot_box_dice']:.3f}, "
                f"fine-tuned {scores['finetuned_box_dice']:.3f} (random weights, 2 CPU iterations)")
        else:
            # No torch image: register a plain model file, put where finetune's output would be.
            model_file = assets / "model.pt"
            model_file.write_bytes(os.urandom(256 * 1024))
            uri = f"minio://{cfg.bucket}/{ARTIFACT_ROOT}/smoke-run/finetune/standin/model"
            client.fput_object(*uri.removeprefix("minio://").split("/", 1), str(model_file))
            model = {"name": "model", "uri": uri, "metadata": {"model_type": "vit_t"},
                     "type": compiled.component("register-model")["inputDefinitions"]["artifacts"]["model"]["artifactType"]}
            metrics_json = json.dumps({"finetuned_box_dice": 0.81, "zero_shot_box_dice": 0.62, "passed": True})
        # The checkpoint's metadata as a parameter: register-model does not download the checkpoint.
        reg = run("register-model", {"metrics_json": metrics_json, "weights_metadata": fw["parameters"]["metadata"]},
                  {"model": model, "dataset": d})
        _, key = host.parse_uri(reg["parameters"]["model_uri"])
        model_size = client.stat_object(*model["uri"].removeprefix("minio://").split("/", 1)).size
        check(host.stat(key) is not None and host.stat(key).size == model_size,
              "register-model: the registered model object is the model artifact")
        log(f"register-model: version {reg['parameters']['version']} at {reg['parameters']['model_uri']}")


def pick_docker(requested: str | None) -> Docker:
    """DOCKER if set, else the first `docker` client that builds through BuildKit with the running
    engine (a client newer than the engine, like Docker 28 without buildx here, refuses)."""
    candidates = [requested] if requested else list(dict.fromkeys(
        p for p in (shutil.which("docker"), "/usr/bin/docker") if p and os.access(p, os.X_OK)))
    with tempfile.TemporaryDirectory() as probe:
        Path(probe, "Dockerfile").write_text("FROM scratch\n")
        for binary in candidates:
            if subprocess.run([binary, "build", "-q", probe], capture_output=True,
                              env={**os.environ, "DOCKER_BUILDKIT": "1"}).returncode == 0:
                return Docker(binary)
    raise SystemExit(f"images-smoke: no Docker client ({', '.join(candidates) or 'none on PATH'}) can build with "
                     f"BuildKit: is the engine running (dockerd --bridge=none)?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get(
        "SMOKE_WORK", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sam-pipeline-images-smoke")))
    ap.add_argument("--light-only", dest="torch", action="store_false", default=os.environ.get("SMOKE_TORCH") != "0",
                    help="leave out the torch images (finetune, evaluate); also SMOKE_TORCH=0")
    args = ap.parse_args(argv)
    docker = pick_docker(os.environ.get("DOCKER"))
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    compiled = Compiled(ROOT / "pipelines" / "sam_finetune.yaml")
    base = standin_base(docker, args.work)
    steps = [s for s in images.STEPS if args.torch or images.image_kind(s) == "light"]
    if not args.torch:
        log(f"torch images ({', '.join(images.TORCH_STEPS)}) left out on request (SMOKE_TORCH=0): register-model "
            f"gets a stand-in model file instead of finetune's")
    refs = {s: build(docker, s, base, args.work) for s in steps}
    chain(docker, compiled, refs, args.work, args.torch)
    log(f"ok: {len(steps)} images built on the stand-in base and their compiled steps chained in "
        f"{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
