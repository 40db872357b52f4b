"""The runbook side of the cluster work, checked offline: the make fragment's targets and dry-run commands,
docs/kubernetes.md's make targets and plain `kfp` commands (parsed by the installed kfp CLI), and the
runbook's air-gapped dataset path. Split from tests/test_manifests.py, which checks the manifests."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.image_tag import source_tag

ROOT = Path(__file__).resolve().parents[1]
MK = ROOT / "mk" / "kubernetes.mk"
DOCS = ROOT / "docs" / "kubernetes.md"


# --- make fragment and runbook ---------------------------------------------------------------------

def mk_targets() -> set[str]:
    targets = set(re.findall(r"^([a-z][\w-]*):(?!=)", MK.read_text(), re.M))
    return targets | {f"image-{s}" for s in re.search(r"^IMAGE_STEPS := (.+)$", MK.read_text(), re.M).group(1).split()}


def make_dry(*args: str) -> str:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    # --no-print-directory: under `make test` (MAKELEVEL 1) make would add "Entering directory" lines.
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(MK), *args], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_targets_exist():
    required = {"images", "kind-load", "kind-up", "kind-down", "kind-submit", "kind-schedule",
                "kind-model-registry", "preflight", "kind-gpu-check"}
    assert required <= mk_targets(), required - mk_targets()


def test_kind_submit_and_schedule_commands():
    package = ROOT / "build" / "sam_finetune.yaml"
    out = make_dry("kind-submit", "SUBMIT_ARGS=-p n_iterations=5", "IMAGE_TAG=0.2.0").replace("\\\n", " ")
    # The package for the images just built goes to build/, never over the committed YAML.
    assert f"compile --registry localhost --tag 0.2.0 -o {package}" in out
    assert "port-forward.sh kubeflow ml-pipeline-ui 8080:80 --" in out
    assert re.search(rf"sam-pipeline submit --host http://localhost:8080 --package {package} .*--wait\s+-p n_iterations=5", out)
    # The sizing `make preflight` prints goes to the compile through COMPILE_ARGS.
    out = make_dry("kind-submit", "COMPILE_ARGS=--cpu finetune=1500m").replace("\\\n", " ")
    assert f"compile --registry localhost --tag {source_tag()} -o {package} --cpu finetune=1500m" in out
    out = make_dry("kind-schedule").replace("\\\n", " ")
    assert re.search(rf'schedule --host http://localhost:8080 --package {package} .*--cron "0 0 3 \* \* \*"', out)


def test_kind_load_sends_gpu_images_to_gpu_nodes_only():
    out = make_dry("kind-load", "IMAGE_TAG=1.2.3")
    light, gpu = out.split("--nodes", 1)
    for s in ("fetch-weights", "ingest-dataset", "register-model"):
        assert f"localhost/sam-pipeline-{s}:1.2.3" in light
    for s in ("finetune", "evaluate"):
        assert f"localhost/sam-pipeline-{s}:1.2.3" in gpu and s not in light
    assert "-l nvidia.com/gpu.present=true" in out


def test_runbook_only_uses_existing_targets():
    text = DOCS.read_text()
    lead_targets = {"run", "test", "compile", "setup", "demo"}
    used = set(re.findall(r"\bmake ((?:kind-|image|preflight)[\w-]*)", text))
    assert used, "the runbook should show the make targets"
    assert used <= mk_targets() | lead_targets, used - mk_targets()


def kfp_commands(text: str) -> list[list[str]]:
    """`kfp ...` invocations in the runbook's code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    cmds = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("kfp "):
                cmds.append(shlex.split(line))
    return cmds


def group_rest(group, ctx, args: list[str]) -> list[str]:
    """What a click group leaves for its subcommand: the subcommand name first (click 8.2+ keeps it
    apart in _protected_args, older click in protected_args)."""
    group.parse_args(ctx, args)
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = ctx.protected_args
    return [*protected, *ctx.args]


def test_runbook_kfp_cli_commands_parse_with_kfp_2_17(tmp_path, monkeypatch):
    """The plain `kfp` equivalents in the runbook must be valid for the installed CLI (e.g. in
    `kfp run create`, -p means pipeline id, not parameter). Parsed by the CLI's own click definitions,
    without contacting a server."""
    import click
    from kfp.cli import cli as kfp_cli

    cmds = kfp_commands(DOCS.read_text())
    assert any(c[c.index("run") + 1] == "create" for c in cmds if "run" in c), "no `kfp run create` example"
    assert any("recurring-run" in c for c in cmds), "no `kfp recurring-run create` example"
    # Package paths are checked for existence by click: give them something to find.
    monkeypatch.chdir(tmp_path)
    for argv in cmds:
        for a in argv:
            if a.endswith((".yaml", ".yml")) and not a.startswith("-"):
                (tmp_path / a).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / a).touch()
        cmd: click.Command = kfp_cli.cli
        ctx = click.Context(cmd, info_name="kfp")
        rest = group_rest(cmd, ctx, list(argv[1:]))
        while isinstance(cmd, click.Group):
            assert rest, f"{shlex.join(argv)}: no subcommand"
            name, cmd, rest = cmd.resolve_command(ctx, rest)
            if isinstance(cmd, click.Group):
                ctx = click.Context(cmd, info_name=name, parent=ctx)
                rest = group_rest(cmd, ctx, rest)
        try:
            leaf = cmd.make_context(name, rest, parent=ctx)
        except click.ClickException as e:
            pytest.fail(f"{shlex.join(argv)}: {e.format_message()}")
        params = leaf.params
        assert "=" not in (params.get("pipeline_id") or ""), (
            f"{shlex.join(argv)}: -p is --pipeline-id in `kfp run create`; parameters are bare key=value")
        if "cron_expression" in params and params["cron_expression"]:
            assert len(params["cron_expression"].split()) == 6, f"KFP cron has 6 fields (seconds first): {argv}"
        for kv in params.get("args") or ():
            assert "=" in kv, f"{shlex.join(argv)}: pipeline parameters are key=value after the options"


# --- air-gapped path of the runbook -----------------------------------------------------------------

def test_air_gapped_dataset_source_is_the_staged_uri(store, tmp_path):
    """Runbook section 3: after `sam-pipeline ingest` staged a dataset from a workstation, the pipeline's
    ingest step pointed at the printed dataset_uri (no internet) must find the same version and upload
    nothing. Also a raw zip dropped into the store works as a source."""
    from components.datasets.ingest import ingest
    from components.datasets.synthetic import make_pennfudan_zip

    zip_path = make_pennfudan_zip(tmp_path / "PennFudanPed.zip", n_fudan=3, n_penn=3, seed=1, size_range=(48, 72))
    staged = ingest(str(zip_path), "penn-fudan", "penn-fudan", store, seed=0)
    again = ingest(staged.dataset_uri, "auto", "penn-fudan", store, seed=0)
    assert (again.content_hash, again.uploaded) == (staged.content_hash, 0)
    store.put_file(store.key("incoming", "PennFudanPed.zip"), zip_path)
    dropped = ingest(store.uri(store.key("incoming", "PennFudanPed.zip")), "auto", "penn-fudan", store, seed=0)
    assert (dropped.content_hash, dropped.uploaded) == (staged.content_hash, 0)
