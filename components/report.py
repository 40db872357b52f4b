"""Self-contained HTML reports (KFP's HTML artifact viewer shows one file): images are inlined as base64
PNG, curves are inline SVG, so there is nothing to fetch and no plotting library to install.

    rep = Report("Fine-tuning")
    rep.kv({"best val Dice": 0.81})
    rep.curves("Training loss", {"train": (steps, losses)}, xlabel="iteration")
    rep.image_grid([[("image", img), ("ground truth", overlay(img, gt))]])
    rep.write("report.html")
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from components.label_values import instance_ids

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
_LINE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.grid{display:grid;gap:6px;align-items:start}.grid figure{margin:0}.grid img{width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#555;text-align:center}.muted{color:#777;font-size:12px}
svg text{font-size:11px;fill:#333}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def png_data_uri(image: np.ndarray, max_side: int = 384) -> str:
    """An HxW(x3) uint8 array as a data: URI, downscaled so reports stay small."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image))
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def overlay(image: np.ndarray, instances: np.ndarray | list[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """Colour each instance over the image: `instances` is a label map (0 = background) or a list of
    boolean masks. Where masks overlap, the later one wins."""
    out = image.astype(np.float32).copy()
    if isinstance(instances, np.ndarray) and instances.ndim == 2 and instances.dtype != bool:
        masks = [instances == i for i in instance_ids(instances)]  # crowd (255) is not an instance
    else:
        masks = [np.asarray(m, dtype=bool) for m in instances]
    for i, mask in enumerate(masks):
        colour = np.array(_PALETTE[i % len(_PALETTE)], dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edge = mask & ~_erode(mask)
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:, :] &= mask[:-1, :]
    m[:-1, :] &= mask[1:, :]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    # The axis runs from the tick at or below lo to the tick at or above hi, so every point is inside.
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, max(last, first + 1) + 1)]


def line_chart_svg(series: dict[str, tuple[list, list]], *, title: str = "", xlabel: str = "",
                   ylabel: str = "", width: int = 520, height: int = 280) -> str:
    """Inline SVG line chart of {label: (xs, ys)}; NaN/None points are dropped."""
    clean = {}
    for label, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if x is not None and y is not None and math.isfinite(float(y))]
        if pts:
            clean[label] = pts
    if not clean:
        return f'<p class="muted">{_esc(title)}: no data</p>'
    left, right, top, bottom = 56, 12, 24 if title else 10, 40
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for pts in clean.values() for p in pts]
    ys = [p[1] for pts in clean.values() for p in pts]
    xticks, yticks = _nice_ticks(min(xs), max(xs)), _nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def sx(x):
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def sy(y):
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">']
    if title:
        parts.append(f'<text x="{width / 2:.0f}" y="15" text-anchor="middle" font-weight="bold">{_esc(title)}</text>')
    for t in yticks:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in xticks:
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    if xlabel:
        parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle">{_esc(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="12" y="{top + ph / 2:.0f}" text-anchor="middle" '
                     f'transform="rotate(-90 12 {top + ph / 2:.0f})">{_esc(ylabel)}</text>')
    for i, (label, pts) in enumerate(clean.items()):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{path}"/>')
        if len(pts) <= 40:
            parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colour}"/>' for x, y in pts)
        parts.append(f'<text x="{left + pw - 4}" y="{top + 14 + 14 * i}" text-anchor="end" fill="{colour}">'
                     f'{_esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def interval_chart_svg(rows: list[tuple[str, float, float, float]], *, marks: dict[str, float],
                       width: int = 560, row_height: int = 26) -> str:
    """Inline SVG of intervals, one row each: (label, mean, low, high) as a dot on a bar, with a vertical line at
    each of `marks` ({label: x}, e.g. 0 and the margin). Rows with a NaN are listed without a bar."""
    finite = [r for r in rows if all(math.isfinite(v) for v in r[1:])]
    xs = [v for r in finite for v in r[1:]] + list(marks.values())
    ticks = _nice_ticks(min(xs), max(xs)) if xs else [0.0, 1.0]
    left, right, top = 190, 16, 10
    height = top + row_height * len(rows) + 34
    pw = width - left - right

    def sx(x):
        return left + (x - ticks[0]) / ((ticks[-1] - ticks[0]) or 1) * pw

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="gain intervals">']
    bottom = top + row_height * len(rows)
    for t in ticks:
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{bottom}" stroke="#eee"/>'
                     f'<text x="{sx(t):.1f}" y="{bottom + 14}" text-anchor="middle">{t:+g}</text>')
    for i, (label, x) in enumerate(marks.items()):
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{bottom}" stroke="#999" '
                     f'stroke-dasharray="{"4 3" if i else "none"}"/><text x="{sx(x) + 3:.1f}" y="{bottom + 28}">'
                     f'{_esc(label)}</text>')
    for i, (label, mean, low, high) in enumerate(rows):
        y = top + row_height * i + row_height / 2
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{_esc(label)}</text>')
        if all(math.isfinite(v) for v in (mean, low, high)):
            colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
            parts.append(f'<line x1="{sx(low):.1f}" x2="{sx(high):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                         f'stroke="{colour}" stroke-width="3"/><circle cx="{sx(mean):.1f}" cy="{y:.1f}" r="4" '
                         f'fill="{colour}"/>')
    parts.append("</svg>")
    return "".join(parts)


def history_curves(history: dict) -> list[tuple[str, dict, str, str]]:
    """Pick loss and validation-Dice curves out of a training history of parallel lists.

    Accepts the shapes the trainer may write: {"train_loss": [...], "iteration": [...]},
    {"val_dice": [...], "val_iteration": [...]}, or lists of {"iteration": i, "loss": l} records.
    """
    def column(*names):
        for n in names:
            if n in history and isinstance(history[n], list) and history[n]:
                return history[n]
        return None

    charts = []
    loss = column("train_loss", "loss")
    if loss is not None:
        steps = column("iteration", "train_iteration", "step", "steps") or list(range(1, len(loss) + 1))
        if len(steps) != len(loss):
            steps = list(range(1, len(loss) + 1))
        charts.append(("Training loss", {"train loss": (steps, loss)}, "iteration", "loss"))
    dice = column("val_dice", "val_box_dice")
    if dice is not None:
        steps = column("val_iteration", "val_step", "val_steps") or list(range(1, len(dice) + 1))
        if len(steps) != len(dice):
            steps = list(range(1, len(dice) + 1))
        charts.append(("Validation Dice (higher is better)", {"val Dice": (steps, dice)}, "iteration", "Dice"))
    return charts


class Report:
    def __init__(self, title: str):
        self.title = title
        self._body: list[str] = []

    def heading(self, text: str) -> "Report":
        self._body.append(f"<h2>{_esc(text)}</h2>")
        return self

    def paragraph(self, text: str, muted: bool = False) -> "Report":
        self._body.append(f'<p{" class=muted" if muted else ""}>{_esc(text)}</p>')
        return self

    def kv(self, values: dict) -> "Report":
        rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(_fmt(v))}</td></tr>" for k, v in values.items())
        self._body.append(f"<table>{rows}</table>")
        return self

    def table(self, headers: list[str], rows: list[list], max_rows: int | None = None) -> "Report":
        shown = rows if max_rows is None else rows[:max_rows]
        head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(c))}</td>" for c in r) + "</tr>" for r in shown)
        self._body.append(f"<table><tr>{head}</tr>{body}</table>")
        if len(shown) < len(rows):
            self.paragraph(f"{len(rows) - len(shown)} more rows not shown", muted=True)
        return self

    def curves(self, title: str, series: dict[str, tuple[list, list]], xlabel: str = "", ylabel: str = "") -> "Report":
        self._body.append(line_chart_svg(series, title=title, xlabel=xlabel, ylabel=ylabel))
        return self

    def intervals(self, rows: list[tuple[str, float, float, float]], marks: dict[str, float]) -> "Report":
        self._body.append(interval_chart_svg(rows, marks=marks))
        return self

    def history(self, history: dict | None) -> "Report":
        charts = history_curves(history or {})
        if not charts:
            return self.paragraph("no training history was recorded", muted=True)
        for title, series, xl, yl in charts:
            self.curves(title, series, xl, yl)
        return self

    def image_grid(self, rows: list[list[tuple[str, np.ndarray]]], max_side: int = 320) -> "Report":
        """Rows of (caption, HxWx3 uint8) cells, inlined as PNG."""
        if not rows:
            return self
        cols = max(len(r) for r in rows)
        cells = []
        for row in rows:
            for caption, img in row:
                cells.append(f'<figure><img alt="{_esc(caption)}" src="{png_data_uri(img, max_side)}">'
                             f"<figcaption>{_esc(caption)}</figcaption></figure>")
            cells.extend("<div></div>" for _ in range(cols - len(row)))
        self._body.append(f'<div class="grid" style="grid-template-columns:repeat({cols},1fr)">'
                          + "".join(cells) + "</div>")
        return self

    def html(self) -> str:
        return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
                f"<title>{_esc(self.title)}</title><style>{_CSS}</style></head>"
                f"<body><h1>{_esc(self.title)}</h1>{''.join(self._body)}</body></html>\n")

    def write(self, path: str | Path) -> Path:
        from components.files import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
        return Path(path)
