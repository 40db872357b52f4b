"""The README's picture of the pipeline, drawn from the compiled YAML (`make compile` redraws it, and a test
checks the committed picture equals a fresh drawing), so it can never show a DAG the pipeline does not have.

Tasks are boxes in rows by their longest chain of dependencies; an arrow for each direct dependency (one that no
longer chain implies); a task that runs only when an upstream output says so is dashed and names the innermost such output; a
fanned-out task (dsl.ParallelFor) says so.

    python -m pipelines.dag_picture [pipelines/sam_finetune.yaml] [docs/pipeline.svg]
"""
from __future__ import annotations

import html
import re
import sys
from pathlib import Path

from components.kfp_components import TASKS
from pipelines.local_tasks import task_graph

DEFAULT_SVG = Path(__file__).resolve().parent.parent / "docs" / "pipeline.svg"
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 250, 44, 40, 30, 16


def _gate_outputs(spec) -> dict[str, str]:
    """{producer task: its output a dsl.If reads}, from every condition in the spec."""
    outputs = {}
    dags = [spec.root.dag] + [c.dag for c in spec.components.values()]
    for dag in dags:
        for task in dag.tasks.values():
            for channel in re.findall(r"pipelinechannel--([\w.-]+)", task.trigger_policy.condition):
                producer = task.inputs.parameters[f"pipelinechannel--{channel}"].task_output_parameter
                if producer.producer_task:
                    outputs[producer.producer_task] = producer.output_parameter_key
    return outputs


def _rows(graph: dict) -> list[list[str]]:
    depth: dict[str, int] = {}

    def level(task: str) -> int:
        if task not in depth:
            depth[task] = 1 + max((level(t) for t in graph[task]["after"]), default=-1)
        return depth[task]

    rows: list[list[str]] = []
    for task in [t for t in TASKS if t in graph]:  # in the pipeline's order, so a row reads as the code does
        d = level(task)
        rows.extend([] for _ in range(d + 1 - len(rows)))
        rows[d].append(task)
    return rows


def _direct(graph: dict, task: str) -> list[str]:
    """Dependencies not implied by another dependency (the transitive reduction)."""
    after = graph[task]["after"]
    return sorted(a for a in after if not any(a in graph[b]["after"] for b in after if b != a))


def render(yaml_path: str | Path) -> str:
    from kfp import components

    spec = components.load_component_from_file(str(yaml_path)).pipeline_spec
    graph = task_graph(type("Compiled", (), {"pipeline_spec": spec}))
    gates = _gate_outputs(spec)
    rows = _rows(graph)
    width = 2 * MARGIN + max(len(r) for r in rows) * (BOX_W + GAP_X) - GAP_X
    height = 2 * MARGIN + len(rows) * (BOX_H + GAP_Y) - GAP_Y
    where = {}
    for r, row in enumerate(rows):
        offset = (width - (len(row) * (BOX_W + GAP_X) - GAP_X)) / 2
        for c, task in enumerate(row):
            where[task] = (offset + c * (BOX_W + GAP_X), MARGIN + r * (BOX_H + GAP_Y))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
             '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
             f'<rect width="{width:.0f}" height="{height:.0f}" fill="#fff"/>']
    order = [t for t in TASKS if t in graph]  # the spec's maps have no fixed order: the bytes must not vary
    for task in order:
        x, y = where[task]
        for dep in _direct(graph, task):
            dx, dy = where[dep]
            parts.append(f'<line x1="{dx + BOX_W / 2:.0f}" y1="{dy + BOX_H:.0f}" x2="{x + BOX_W / 2:.0f}" '
                         f'y2="{y:.0f}" stroke="#555" marker-end="url(#a)"/>')
    for task in order:
        info, (x, y) = graph[task], where[task]
        # The innermost condition: the outer ones are on the tasks above, and a dashed box is inside them all.
        notes = [f"if {g}.{gates.get(g, '?')}" for g in info["gated"][-1:]]
        if info.get("fan_out"):
            notes.append("one task per shard")
        dash = ' stroke-dasharray="5 3"' if info["gated"] else ""
        parts.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="#eef4fb" '
                     f'stroke="#3a6ea5"{dash}/>')
        parts.append(f'<text x="{x + BOX_W / 2:.0f}" y="{y + (17 if notes else 26):.0f}" text-anchor="middle" '
                     f'font-weight="bold">{html.escape(task)}</text>')
        if notes:
            parts.append(f'<text x="{x + BOX_W / 2:.0f}" y="{y + 33:.0f}" text-anchor="middle" fill="#555" '
                         f'font-size="10">{html.escape("; ".join(notes))}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    yaml_path = Path(args[0]) if args else Path(__file__).with_name("sam_finetune.yaml")
    out = Path(args[1]) if len(args) > 1 else DEFAULT_SVG
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(yaml_path))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
