"""The five step images: Dockerfile rules (static) and, for the light images, proof that the step's
pyproject extra alone is enough to run the step end to end.

Two Dockerfiles (images/light, images/torch) build the five images, the step's extra being the
build argument EXTRA. Here a Dockerfile is checked by parsing it, and the dependency set of a light
image by installing `<repo>[<extra>]` into a fresh virtual environment (no system site packages)
and calling the step function in it against the embedded S3 server and a local HTTP server.
Building the images and running the compiled steps inside them is tests/test_images_smoke.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from pipelines import image_tag, images
from pipelines.image_tag import source_tag

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
MK = ROOT / "mk" / "kubernetes.mk"

# step -> pyproject extra, and which Dockerfile builds it: from pipelines/images.py, the one place.
STEP_EXTRAS = images.EXTRAS
LIGHT_STEPS = tuple(s for s in images.STEPS if images.image_kind(s) == "light")
GPU_STEPS = images.TORCH_STEPS
KINDS = ("light", "torch")
BASE_IMAGE = re.compile(r"^(docker\.io/library/)?python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$")
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|ACCESSKEY|API_KEY|CREDENTIAL)", re.I)


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments may sit inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation at end of file"
    return instructions


def env_of(instructions) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for token in shlex.split(args):
                name, sep, value = token.partition("=")
                assert sep, f"ENV without '=' ({token!r}): use the key=value form"
                env[name] = value
    return env


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dockerfile(kind) -> list[tuple[str, str]]:
    path = IMAGES / kind / "Dockerfile"
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    return parse_dockerfile(path)


def test_image_dirs_are_one_per_kind():
    """The finetune and evaluate images are the same build, and so are the three light ones:
    one Dockerfile per kind, the step's extra as a build argument (issue 12, item 10)."""
    found = sorted(p.name for p in IMAGES.iterdir() if p.is_dir())
    assert found == sorted(KINDS)
    assert {images.image_kind(s) for s in images.STEPS} == set(KINDS)
    assert set(GPU_STEPS) < set(images.STEPS)


def test_steps_and_names_agree_with_pipeline_image_refs():
    """`make images` must build exactly the references the compiled pipeline names, or kind-load
    loads images no task uses; and with the extras and kinds pipelines/images.py states."""
    mk = MK.read_text()
    steps = re.search(r"^IMAGE_STEPS := (.+)$", mk, re.M).group(1).split()
    assert steps == list(images.STEPS)
    assert sorted(STEP_EXTRAS) == sorted(images.STEPS)
    pairs = re.search(r"^IMAGE_EXTRAS := (.+)$", mk, re.M).group(1).split()
    assert dict(p.split(":") for p in pairs) == STEP_EXTRAS
    assert re.search(r"^GPU_IMAGE_STEPS := (.+)$", mk, re.M).group(1).split() == list(GPU_STEPS)
    assert re.search(r"^IMAGE_REGISTRY \?= (\S+)$", mk, re.M).group(1) == images.DEFAULT_REGISTRY
    assert re.search(r"^IMAGE_TAG \?= (.+)$", mk, re.M).group(1) == \
        "$(shell cd $(SAM_K8S_ROOT) && $(PYTHON3) -m pipelines.image_tag)"
    assert "sam-pipeline-$(1):$(IMAGE_TAG)" in mk and images.IMAGE_PREFIX == "sam-pipeline-"
    assert images.image_refs()["finetune"] == f"localhost/sam-pipeline-finetune:{source_tag()}"


def test_make_images_builds_all_five_with_one_tag():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    # --no-print-directory: under `make test` (MAKELEVEL 1) make would add "Entering directory" lines.
    out = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(MK), "images", "IMAGE_REGISTRY=reg.example/ml",
                          "IMAGE_TAG=7.7.7"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    commands = out.replace("\\\n", " ").splitlines()
    assert len(commands) == len(STEP_EXTRAS)
    for s, extra in STEP_EXTRAS.items():
        [cmd] = [c for c in commands if f"-t reg.example/ml/sam-pipeline-{s}:7.7.7 " in c + " "]
        words = cmd.split()
        assert words[words.index("-f") + 1] == str(IMAGES / images.image_kind(s) / "Dockerfile")
        assert f"--build-arg EXTRA={extra} " in " ".join(words) + " "
        # The build context is the repository root.
        assert words[-1] == str(ROOT)


def test_base_image_is_pinned_by_digest(dockerfile):
    froms = [args for kw, args in dockerfile if kw == "FROM"]
    assert len(froms) == 1, "one stage is enough; a second base would need pinning too"
    assert BASE_IMAGE.match(froms[0].split()[0]), f"base must be python:3.11.x-slim-bookworm@sha256:..., got {froms[0]}"


def test_all_images_share_one_base():
    bases = {k: [a for kw, a in parse_dockerfile(IMAGES / k / "Dockerfile") if kw == "FROM"][0] for k in KINDS}
    assert len(set(bases.values())) == 1, f"bases drifted apart: {bases}"


def test_runs_as_non_root_numeric_user(dockerfile):
    users = [args for kw, args in dockerfile if kw == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"final USER must be a numeric non-root uid (runAsNonRoot), got {users[-1]}"
    # Nothing after the last USER may need root.
    last_user = max(i for i, (kw, _) in enumerate(dockerfile) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in dockerfile[last_user:])


def test_writable_home_and_caches(dockerfile):
    env = env_of(dockerfile)
    home = env.get("HOME")
    assert home and home not in ("/", "/root"), "HOME must be a directory the runtime user owns"
    for name in ("SAM_MODELS", "TORCH_HOME", "XDG_CACHE_HOME"):
        assert env.get(name, "").startswith(home + "/"), f"{name} must live under HOME ({home})"
    runs = " ".join(args for kw, args in dockerfile if kw == "RUN")
    assert re.search(rf"useradd [^&]*--uid {users_uid(dockerfile)}\b", runs)
    assert re.search(rf"chown -R \S+ {re.escape(home)}\b", runs), "HOME must be chowned to the runtime user"
    # The KFP launcher writes artifacts under these roots; they must exist and be writable.
    for d in ("/gcs", "/minio", "/s3"):
        assert re.search(rf"mkdir -p [^&]*{d}\b", runs) and re.search(rf"chown -R [^&]*{d}\b", runs)


def users_uid(dockerfile) -> str:
    return [args for kw, args in dockerfile if kw == "USER"][-1].split(":")[0]


def test_installs_project_with_the_extra_argument_only(dockerfile):
    args = [a for kw, a in dockerfile if kw == "ARG"]
    assert args == ["EXTRA"], "EXTRA has no default: a build without the step's extra must fail"
    installs = [args for kw, args in dockerfile if kw == "RUN" and "pip install" in args]
    assert len(installs) == 1, "one pip install, of the project from the build context"
    cmd = installs[0]
    assert '"/tmp/src[$EXTRA]"' in cmd, "the project is installed with the step's extra"
    assert re.match(r'test -n "\$EXTRA" \|\|', cmd), "an empty EXTRA must stop the build"
    assert "--no-deps" not in cmd, "the extra's dependencies (kfp included) must be installed"
    assert re.search(r"\btorch\b", cmd) is None, "torch comes only through the train extra's pins"
    copies = [args.split() for kw, args in dockerfile if kw == "COPY"]
    sources = {src for c in copies for src in c[:-1] if not src.startswith("--")}
    assert sources == {"pyproject.toml", "README.md", "components", "pipelines"}
    for src in sources - {"README.md"}:  # README.md is the lead's; the build needs it (pyproject readme)
        assert (ROOT / src).exists(), f"COPY source {src} is missing from the repository"


def test_extras_exist_and_kfp_is_a_base_dependency():
    proj = pyproject()["project"]
    extras = proj["optional-dependencies"]
    for step, extra in STEP_EXTRAS.items():
        assert extra in extras, f"pyproject has no extra {extra!r} for {step}"
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in proj["dependencies"]}
    assert {"kfp", "kfp-kubernetes", "minio"} <= names
    assert "kfp==2.17.3" in proj["dependencies"]
    for step in LIGHT_STEPS:
        assert not any(d.lower().startswith("torch") for d in extras[STEP_EXTRAS[step]]), step
    assert "torch==2.14.1" in extras["train"]


def test_light_images_fail_the_build_if_torch_sneaks_in(kind, dockerfile):
    runs = [args for kw, args in dockerfile if kw == "RUN"]
    guard = any("find_spec('torch')" in r for r in runs)
    assert guard == (kind == "light")


def test_gpu_images_request_compute_capability(kind, dockerfile):
    env = env_of(dockerfile)
    if kind == "torch":
        assert "compute" in env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(",")
    # Never hard-wire devices: the device plugin decides which GPU a pod gets.
    assert "NVIDIA_VISIBLE_DEVICES" not in env


def test_no_secrets_and_no_network_at_start(dockerfile):
    for kw, args in dockerfile:
        if kw in ("ENV", "ARG", "LABEL"):
            for token in shlex.split(args):
                name = token.partition("=")[0]
                assert not SECRET_NAME.search(name), f"{kw} {name}: credentials come from the cluster secret"
        assert kw != "ADD", "ADD can fetch URLs; use COPY"
        if kw in ("ENTRYPOINT", "CMD"):
            assert not re.search(r"pip|curl|wget|http", args), f"{kw} must not reach the network: {args}"
    text = " ".join(args for _, args in dockerfile)
    assert not re.search(r"minio123|AKIA[0-9A-Z]{16}", text)
    # A runtime `pip install` (packages_to_install) must fail fast instead of reaching an index.
    env = env_of(dockerfile)
    assert env.get("PIP_NO_INDEX") == "1"
    last_env_no_index = max(i for i, (kw, a) in enumerate(dockerfile) if kw == "ENV" and "PIP_NO_INDEX" in a)
    pip_run = max(i for i, (kw, a) in enumerate(dockerfile) if kw == "RUN" and "pip install" in a)
    assert last_env_no_index > pip_run, "PIP_NO_INDEX must be set after the build-time install"


def test_build_context_is_trimmed(kind):
    """The context is the repo root, which holds .venv and data; the per-Dockerfile ignore file
    (BuildKit) sends only what the COPY lines use."""
    ignore = IMAGES / kind / "Dockerfile.dockerignore"
    lines = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "exclude everything first, then re-include"
    assert {"!pyproject.toml", "!README.md", "!components/", "!pipelines/"} <= set(lines)
    assert set(image_tag.INPUTS) - {"images"} == {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert image_tag.COMPILED.as_posix() in lines  # it names the tag, so it can be neither hashed nor shipped
    assert not any(ln.startswith("!.venv") or ln.startswith("!data") for ln in lines)


# ---------------------------------------------------------------------------------------------------
# Light images: the extra alone runs the step (slow: builds three virtual environments once).
# ---------------------------------------------------------------------------------------------------

VENV_CACHE = Path(os.environ.get("SAM_TEST_VENV_CACHE", Path(tempfile.gettempdir()) / "sam-pipeline-test-venvs"))


def light_venv(extra: str) -> Path:
    """A fresh venv (no system site packages) with only `<repo>[extra]`, cached under a tmp dir keyed by
    the pyproject hash. The step code itself is taken from the working tree at run time (PYTHONPATH),
    so editing components/ needs no reinstall while a change of dependencies gets a new venv."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()[:16]
    venv = VENV_CACHE / f"{extra}-{key}"
    if (venv / ".complete").exists():
        return venv
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{extra}-{key}.", dir=VENV_CACHE))
    src = building / "src"
    # A copy of just the package inputs, so pip's in-tree build never writes into the repository.
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    readme = ROOT / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.exists() else "sam-pipeline\n")
    for pkg in ("components", "pipelines"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = building / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"{src}[{extra}]"], check=True)
    (env_dir / ".complete").write_text(key)
    try:
        env_dir.rename(venv)  # venvs are relocatable enough for `bin/python -c`; losing a race is fine
    except OSError:
        pass
    shutil.rmtree(building, ignore_errors=True)
    return venv


def run_in_venv(venv: Path, code: str, *, cwd: Path, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(extra_env, PYTHONPATH=str(ROOT), PYTHONNOUSERSITE="1")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"step failed in the [{venv.name}] venv:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Printed as the last line: what the venv holds, and the step's result.
PROBE = """
import importlib.metadata as md, importlib.util, json, sys
assert sys.prefix != sys.base_prefix
installed = sorted(d.metadata["Name"].lower() for d in md.distributions())
def report(result):
    print(json.dumps({"result": result, "installed": installed,
                      "torch": importlib.util.find_spec("torch") is not None,
                      "kfp": md.version("kfp")}))
"""


def s3_env(cfg) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": cfg.access_key or "", "AWS_SECRET_ACCESS_KEY": cfg.secret_key or ""}


def check_light(out: dict, extra: str) -> None:
    assert out["torch"] is False and "torch" not in out["installed"], f"torch in the [{extra}] venv"
    assert out["kfp"] == "2.17.3" and "kfp-kubernetes" in out["installed"]
    assert "moto" not in out["installed"], "the venv must not see the test environment's packages"


@pytest.mark.slow
def test_fetch_weights_runs_with_weights_extra_only(store, http_server, tmp_path):
    import torch

    # A real (small, random) state dict: a mirror's file must load as a checkpoint, checked without torch.
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"image_encoder.w": torch.rand(64 * 1024)}, served / "vit_t_mobile_sam.pth")
    blob = (served / "vit_t_mobile_sam.pth").read_bytes()
    url = http_server(served) + "/vit_t_mobile_sam.pth"
    sha = hashlib.sha256(blob).hexdigest()
    cfg = store.config
    out_path = tmp_path / "out" / "weights.pth"
    code = PROBE + f"""
from components.steps import fetch_step
report(fetch_step(model_type="vit_t", url={url!r}, sha256={sha!r}, s3_endpoint={cfg.endpoint!r},
                  bucket={cfg.bucket!r}, prefix={cfg.prefix!r}, out_path={str(out_path)!r}))
"""
    out = run_in_venv(light_venv("weights"), code, cwd=tmp_path,
                      extra_env={**s3_env(cfg), "HOME": str(tmp_path), "SAM_MODELS": str(tmp_path / "models")})
    check_light(out, "weights")
    assert hashlib.sha256(out_path.read_bytes()).hexdigest() == sha
    assert store.list(store.key("weights", "vit_t", sha)), "checkpoint not staged under weights/vit_t/<sha256>/"


@pytest.mark.slow
def test_ingest_runs_with_ingest_extra_only(store, http_server, tmp_path):
    from components.datasets.synthetic import make_pennfudan_zip

    served = tmp_path / "served"
    served.mkdir()
    zip_path = Path(make_pennfudan_zip(served / "PennFudanPed.zip", n_fudan=4, n_penn=3, seed=0,
                                       size_range=(64, 96)))
    assert zipfile.is_zipfile(zip_path)
    url = f"{http_server(zip_path.parent)}/{zip_path.name}"
    cfg = store.config
    manifest_path = tmp_path / "out" / "manifest.json"
    code = PROBE + f"""
from components.steps import ingest_step
report(ingest_step(source={url!r}, dataset_format="penn-fudan", dataset_name="penn-fudan", split_seed=0,
                   s3_endpoint={cfg.endpoint!r}, bucket={cfg.bucket!r}, prefix={cfg.prefix!r},
                   out_manifest_path={str(manifest_path)!r}))
"""
    out = run_in_venv(light_venv("ingest"), code, cwd=tmp_path, extra_env={**s3_env(cfg), "HOME": str(tmp_path)})
    check_light(out, "ingest")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["totals"]["images"] == 7
    assert store.exists(manifest["root"] + "manifest.json")


@pytest.mark.slow
def test_register_runs_with_registry_extra_only(store, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(os.urandom(64 * 1024))
    metrics = {"finetuned_box_dice": 0.81, "zero_shot_box_dice": 0.62, "passed": True}
    cfg = store.config
    code = PROBE + f"""
from components.steps import register_step
report(register_step(model_path={str(model)!r}, metrics_json={json.dumps(metrics)!r}, model_name="sam-pennfudan",
                     model_registry_url="", run_id="run-1", s3_endpoint={cfg.endpoint!r}, bucket={cfg.bucket!r},
                     prefix={cfg.prefix!r}))
"""
    out = run_in_venv(light_venv("registry"), code, cwd=tmp_path, extra_env={**s3_env(cfg), "HOME": str(tmp_path)})
    check_light(out, "registry")
    assert "model-registry" in out["installed"]
    result = out["result"]
    assert result["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    _, key = store.parse_uri(result["model_uri"])
    assert store.stat(key).size == model.stat().st_size


# ---------------------------------------------------------------------------------------------------
# The default tag follows what goes into the images (KFP's cache key holds the image reference).
# ---------------------------------------------------------------------------------------------------

def _tree(root: Path) -> Path:
    for rel, text in {"pyproject.toml": "[project]\nname='x'\n", "README.md": "x", "components/a.py": "A = 1\n",
                      "pipelines/b.py": "B = 1\n", "images/light/Dockerfile": "FROM python@sha256:00\n",
                      "tests/t.py": "", "pipelines/sam_finetune.yaml": "image: src-0\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("rel,changes", [
    ("components/a.py", True), ("pipelines/b.py", True), ("pyproject.toml", True),
    ("images/light/Dockerfile", True), ("README.md", True),
    ("pipelines/sam_finetune.yaml", False), ("tests/t.py", False),
    ("components/__pycache__/a.cpython-311.pyc", False), ("components/x.egg-info/PKG-INFO", False)])
def test_the_default_tag_changes_exactly_when_an_image_would(tmp_path, rel, changes):
    root = _tree(tmp_path)
    before = image_tag.source_tag(root)
    assert re.fullmatch(r"src-[0-9a-f]{12}", before)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("changed\n")
    assert (image_tag.source_tag(root) != before) is changes


def test_no_source_tree_falls_back_to_the_package_version(tmp_path, monkeypatch):
    assert image_tag.source_tag(tmp_path) is None
    monkeypatch.setattr(images, "source_tag", lambda: None)
    assert images.image_refs()["evaluate"].endswith(f":{images.FALLBACK_TAG}")


def test_make_and_the_compiled_pipeline_use_the_same_derived_tag():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(MK), "image-finetune"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert f"-t localhost/sam-pipeline-finetune:{source_tag()} " in out
    compiled = (ROOT / "pipelines" / "sam_finetune.yaml").read_text()
    assert f"image: localhost/sam-pipeline-finetune:{source_tag()}\n" in compiled
