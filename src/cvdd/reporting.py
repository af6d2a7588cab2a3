"""``cvdd report``: a self-contained HTML page (and the same content as Markdown) for a ``cvdd distill`` run.

The report is a read-only view over the run folder written by :func:`cvdd.pipeline.distill`::

    RUN_DIR/results.json                          rows: one per (method, IPC)
    RUN_DIR/config.json                           the resolved configuration
    RUN_DIR/<method>/ipc<N>/synthetic.safetensors synthetic pixels (+ synthetic.json: committees, weights, losses)
    RUN_DIR/<method>/ipc<N>/config.json           the resolved recover settings of that set
    RUN_DIR/random-real/ipc<N>/grid.png           the random real images (only as a grid: pixels are not stored)

Everything goes into ``RUN_DIR/report/`` (or ``out``): ``report.html``, ``report.md`` and the PNG files both of
them reference by relative path, so the folder can be copied or zipped on its own. Only ``results.json`` is
required; every other piece (a set, a grid, a plot) that is missing or unreadable is skipped with a note in
the report, because a partial or older run should still give a readable page.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvdd.errors import ArtifactError

log = logging.getLogger(__name__)

#: Classes and IPC indices shown per image grid: enough to judge the images, small enough for a web page.
MAX_GRID_CLASSES = 20
MAX_GRID_IPC = 10
#: Thumbnails larger than this (ImageNet's 224 px) are downsampled; a grid of 20 x 10 stays a few MB.
MAX_THUMB_PX = 64
#: Synthetic sets larger than this are read in slices (only the shown images) instead of loaded whole:
#: ImageNet-1k at IPC 10 in float32 is 6 GB, far more than a report should hold in memory.
FULL_LOAD_LIMIT_BYTES = 256 * 2**20
#: The grid layout of :func:`cvdd.synthesis.recover.save_grid` (random real images are stored only as it).
_GRID_PAD = 2
_STAGE_ORDER = ("squeeze", "recover", "relabel", "evaluate")

# Marks the page once every image has loaded, so a headless browser can check the report renders whole.
_LOAD_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.imagesTotal = String(images.length);
  document.body.dataset.imagesLoaded = String(loaded.length);
});
</script>"""

_CSS = """body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.r { white-space: nowrap; }
th { background: #f2f2f2; }
td.r, th.r { text-align: right; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
p.note { color: #8a5a00; }"""


class _Doc:
    """The report's content, rendered at once as HTML and as Markdown so both always say the same."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []

    def heading(self, level: int, text: str) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
        self.html.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
        self.md += ["#" * level + " " + text, ""]

    def para(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.html.append(f"<p{cls}>{html.escape(text)}</p>")
        self.md += [f"*{text}*" if note else text, ""]

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool], ident: str) -> None:
        def cls(i: int) -> str:
            return ' class="r"' if right[i] else ""

        out = [f'<table id="{ident}">', "<thead><tr>"]
        out += [f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(headers)]
        out.append("</tr></thead><tbody>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>")
        out.append("</tbody></table>")
        self.html.append("\n".join(out))

        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        self.md.append("| " + " | ".join(cell(h) for h in headers) + " |")
        self.md.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
        self.md += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        self.md.append("")

    def image(self, name: str, alt: str, caption: str) -> None:
        self.html.append(
            f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        self.md += [f"![{alt}]({name})", "", f"*{caption}*", ""]

    def code(self, text: str, lang: str = "") -> None:
        self.html.append(f"<pre><code>{html.escape(text)}</code></pre>")
        self.md += [f"```{lang}", text, "```", ""]

    def render_html(self, title: str) -> str:
        body = "\n".join(self.html)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n{body}\n"
            f"{_LOAD_SCRIPT}\n</body>\n</html>\n"
        )

    def render_md(self) -> str:
        return "\n".join(self.md).rstrip() + "\n"


@dataclass
class _SetInfo:
    """One (method, IPC) entry of the run and what could be read of it."""

    method: str
    ipc: int
    folder: Path
    meta: dict[str, Any] | None = None
    recover_config: dict[str, Any] | None = None
    #: Shown thumbnails per class (rows) and IPC index (columns), uint8 HWC; None when unavailable.
    thumbs: list[list[np.ndarray]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.method} IPC {self.ipc}"

    @property
    def slug(self) -> str:
        return f"{_slug(self.method)}_ipc{self.ipc}"


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and their PNG figures for a ``cvdd distill`` run.

    Args:
        run_dir: the folder given to ``cvdd distill --out`` (it holds ``results.json``).
        out: the report folder (default ``RUN_DIR/report``); created when missing.

    Returns:
        Paths by key: ``html``, ``md``, then one per PNG written, keyed by its file stem
        (``accuracy``, ``grid_ipc10``, ``loss_cvdd_ipc10``, ``weights_cvdd_ipc10``, ``time``, ``memory``).

    Raises:
        ArtifactError: ``run_dir`` does not exist, or its ``results.json`` is missing or unreadable.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ArtifactError(f"run directory does not exist: {run}")
    rows = _load_rows(run / "results.json")
    out_dir = Path(out) if out is not None else run / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    config = _read_json(run / "config.json", notes, "the resolved configuration")
    spec = _guard(notes, "the dataset description of config.json", lambda: _spec_of(config))

    sets: list[_SetInfo] = []
    for key in _unique((str(r["method"]), int(r["ipc"])) for r in rows):
        info = _SetInfo(key[0], key[1], run / key[0] / f"ipc{key[1]}")
        _guard(info.notes, f"the images of {info.label}", lambda info=info: _read_set(info))
        if spec is None and info.meta is not None:
            # The run's config.json is missing: the first synthetic set still knows the classes and image size.
            spec = _guard(info.notes, "the dataset description", lambda info=info: _spec_of(info.meta))
        sets.append(info)
    # Random real images are read from their grid, which needs the image size: read once a spec is known.
    for info in sets:
        if info.method == "random-real" and info.thumbs is None and spec is not None:
            _guard(info.notes, f"the images of {info.label}", lambda info=info: _read_real_grid(info, spec))

    pngs: dict[str, Path] = {}
    doc = _Doc()
    dataset = str(rows[0].get("dataset", "?"))
    doc.heading(1, f"cvdd report: {dataset}")
    doc.para(_summary(run, rows, config, spec))

    doc.heading(2, "Results")
    doc.para(
        "Top-1 (%) of the student on the real test set after the final epoch, mean ± std over seeds. "
        "IOR: gain (points) over random real images at the same IPC under the identical recipe and teacher. "
        "Hard-label: the same set trained with class labels only; HLR: full-data hard-label accuracy minus it. "
        "Label bytes: stored soft labels (0 for online labels). Seconds: wall time per stage."
    )
    headers, body, right = _results_table(rows)
    doc.table(headers, body, right, "results")
    _figure(
        doc,
        pngs,
        out_dir,
        notes,
        "accuracy",
        "top-1 against IPC per method (solid: the run's labels, dashed: hard labels; error bars: std over seeds)",
        lambda p: _plot_accuracy(rows, p),
    )

    doc.heading(2, "Images")
    doc.para(
        f"Per class (rows; at most the first {MAX_GRID_CLASSES}), the first {MAX_GRID_IPC} images of each "
        "method's set side by side, random real images first."
    )
    for ipc in _unique(s.ipc for s in sets):
        shown = [s for s in sets if s.ipc == ipc and s.thumbs]
        shown.sort(key=lambda s: s.method != "random-real")
        if not shown or spec is None:
            doc.para(f"IPC {ipc}: no images could be read.", note=True)
            continue
        stem = f"grid_ipc{ipc}"
        caption = f"IPC {ipc}: " + ", ".join(s.method for s in shown) + f" ({_classes_shown(spec)})"
        _figure(doc, pngs, out_dir, notes, stem, caption, lambda p, shown=shown: _plot_grid(shown, spec, p))
    for s in sets:
        for note in s.notes:
            doc.para(note, note=True)

    recovered = [s for s in sets if s.meta is not None]
    doc.heading(2, "Recover")
    if not recovered:
        doc.para("No synthetic set in this run (random real images only).", note=True)
    else:
        headers, body, right = _recover_table(recovered)
        doc.table(headers, body, right, "recover")
    for s in recovered:
        assert s.meta is not None
        meta = s.meta
        _figure(
            doc,
            pngs,
            out_dir,
            notes,
            f"loss_{s.slug}",
            f"{s.label}: recover loss terms per expert (mean over units) against the iteration",
            lambda p, meta=meta, label=s.label: _plot_losses(meta, label, p),
        )
        _figure(
            doc,
            pngs,
            out_dir,
            notes,
            f"weights_{s.slug}",
            f"{s.label}: voter weights of each IPC index's committee ({meta.get('committee_policy', '?')} policy)",
            lambda p, meta=meta, label=s.label: _plot_weights(meta, label, p),
        )

    doc.heading(2, "Cost")
    negative = [
        f"{r['method']} IPC {r['ipc']} {k}"
        for r in rows
        for k, v in _seconds(r).items()
        if isinstance(v, (int, float)) and v < 0
    ]
    _figure(
        doc,
        pngs,
        out_dir,
        notes,
        "time",
        "wall time per stage and set (squeeze is one shared cost, repeated on every row)",
        lambda p: _plot_time(rows, p),
    )
    if negative:
        doc.para("Negative times recorded (a timing fault of the run, shown as is): " + ", ".join(negative), note=True)
    if any(_memory(r) for r in rows):
        _figure(doc, pngs, out_dir, notes, "memory", "memory recorded per set", lambda p: _plot_memory(rows, p))
    else:
        doc.para("Memory: not recorded by this run.")

    doc.heading(2, "Configuration")
    if config is not None:
        doc.code(json.dumps(config, indent=1), "json")
    doc.heading(2, "Versions")
    headers, body, right = _versions_table(config, recovered)
    doc.table(headers, body, right, "versions")
    for note in notes:
        doc.para(note, note=True)

    from cvdd.artifacts import atomic_write_text

    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    atomic_write_text(html_path, doc.render_html(f"cvdd report: {dataset}"))
    atomic_write_text(md_path, doc.render_md())
    return {"html": html_path, "md": md_path, **pngs}


# ---------------------------------------------------------------------------------------------------- reading


def _load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``results.json``; the one file a report cannot do without."""
    if not path.is_file():
        raise ArtifactError(f"no results.json in {path.parent} (is it a finished `cvdd distill` run?)")
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"unreadable {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(rows, list) or not rows:
        raise ArtifactError(f"{path} holds no result rows (expected a non-empty list)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "method" not in r or not isinstance(r.get("ipc"), int):
            raise ArtifactError(f"{path}: row {i} has no method and integer ipc")
    return rows


def _read_json(path: Path, notes: list[str], what: str) -> dict[str, Any] | None:
    """A JSON object file, or None with a note when it is missing, unreadable or not an object."""
    if not path.is_file():
        notes.append(f"Skipped {what}: {path.name} not found.")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"Skipped {what}: {path.name} is unreadable ({str(exc).splitlines()[0]}).")
        return None
    if not isinstance(data, dict):
        notes.append(f"Skipped {what}: {path.name} is not a JSON object.")
        return None
    return data


def _spec_of(meta: dict[str, Any] | None) -> Any:
    """The dataset spec recorded in a run's config.json or an artifact's metadata, or None."""
    from cvdd.data.specs import DatasetSpec

    if not isinstance(meta, dict) or not isinstance(meta.get("dataset"), dict):
        return None
    return DatasetSpec.from_dict(meta["dataset"])


def _guard(notes: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """Run one optional piece of the report; on any failure note it and go on.

    The report is a view over artifacts that may be partial, older or hand-edited: one unreadable piece
    must cost its own section, never the whole page. The cause is logged for whoever debugs it.
    """
    try:
        return fn()
    except Exception as exc:
        log.warning("report: skipped %s: %s", what, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        notes.append(f"Skipped {what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.")
        return None


def _read_set(info: _SetInfo) -> None:
    """Metadata, recover settings and thumbnails of a synthetic set; nothing for random real images."""
    path = info.folder / "synthetic.safetensors"
    if info.method == "random-real":
        return  # random real pixels are not stored; their grid is read by _read_real_grid
    if not path.is_file():
        info.notes.append(f"{info.label}: no synthetic set at {path}.")
        return
    cfg_path = info.folder / "config.json"
    if cfg_path.is_file():
        info.recover_config = json.loads(cfg_path.read_text()).get("recover")
    if path.stat().st_size <= FULL_LOAD_LIMIT_BYTES:
        from cvdd.synthesis.recover import load_synthetic

        images, _, meta = load_synthetic(path)
        ipc, num_classes = int(meta["ipc"]), len(meta["dataset"]["classes"])
        shown = [
            [images[c * ipc + k] for k in range(min(ipc, MAX_GRID_IPC))]
            for c in range(min(num_classes, MAX_GRID_CLASSES))
        ]
    else:
        meta, shown = _read_set_slices(path)
    info.meta = meta
    info.thumbs = [[_thumb(_to_uint8(x)) for x in row] for row in shown]


def _read_set_slices(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    """Metadata and only the shown images of a large synthetic set (class-major), without loading it whole.

    The sha256 of the file is not verified here (that would read all of it); the report only displays it.
    """
    import torch
    from safetensors import safe_open

    from cvdd.artifacts import check_kind
    from cvdd.synthesis.recover import SYNTHETIC_KIND

    meta = json.loads(path.with_suffix(".json").read_text())
    spec = check_kind(meta, SYNTHETIC_KIND, path)
    ipc, cols = int(meta["ipc"]), min(int(meta["ipc"]), MAX_GRID_IPC)
    shown = []
    with safe_open(str(path), framework="pt") as f:
        sl = f.get_slice("images")
        for c in range(min(spec.num_classes, MAX_GRID_CLASSES)):
            block = sl[c * ipc : c * ipc + cols]
            block = block if block.dtype == torch.uint8 else block.float()
            shown.append(list(block))
    return meta, shown


def _read_real_grid(info: _SetInfo, spec: Any) -> None:
    """Thumbnails of the random real images, cut out of their ``grid.png`` (the pipeline keeps no pixels)."""
    from PIL import Image

    path = info.folder / "grid.png"
    if not path.is_file():
        info.notes.append(f"{info.label}: no grid.png at {path}.")
        return
    s = spec.image_size
    rows, cols = min(spec.num_classes, MAX_GRID_CLASSES), min(info.ipc, MAX_GRID_IPC)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    expected = (rows * (s + _GRID_PAD) + _GRID_PAD, cols * (s + _GRID_PAD) + _GRID_PAD)
    if arr.shape[:2] != expected:
        info.notes.append(f"{info.label}: {path} is {arr.shape[1]}x{arr.shape[0]} px, not the expected grid layout.")
        return
    pos = [_GRID_PAD + i * (s + _GRID_PAD) for i in range(max(rows, cols))]
    info.thumbs = [[_thumb(arr[pos[r] : pos[r] + s, pos[k] : pos[k] + s]) for k in range(cols)] for r in range(rows)]


def _to_uint8(x: Any) -> np.ndarray:
    """A (3, S, S) image, float in [0, 1] or uint8, as uint8 (S, S, 3), quantised as exports are."""
    from cvdd.synthesis.export import to_uint8

    return to_uint8(x[None])[0].permute(1, 2, 0).numpy()


def _thumb(arr: np.ndarray) -> np.ndarray:
    """At most MAX_THUMB_PX on a side; small images keep their pixels (the figure scales them up)."""
    if arr.shape[0] <= MAX_THUMB_PX:
        return np.ascontiguousarray(arr)
    from PIL import Image

    return np.asarray(Image.fromarray(arr).resize((MAX_THUMB_PX, MAX_THUMB_PX), Image.Resampling.BOX))


# ---------------------------------------------------------------------------------------------------- tables


def _summary(run: Path, rows: list[dict[str, Any]], config: dict[str, Any] | None, spec: Any) -> str:
    parts = [f"Run {run.resolve()}"]
    if spec is not None:
        parts.append(f"dataset {spec.name} ({spec.num_classes} classes, {spec.image_size} px)")
    first = rows[0]
    parts.append(f"student {first.get('student', '?')}, {first.get('label_mode', '?')} labels")
    parts.append(f"seeds {first.get('seeds', '?')}")
    if config is not None:
        parts.append(f"run seed {config.get('seed', '?')}")
        if isinstance(config.get("total_seconds"), (int, float)):
            parts.append(f"total {config['total_seconds']:.0f} s")
        if isinstance(config.get("full_real_hard_acc"), (int, float)):
            parts.append(f"full-data hard-label top-1 {100 * config['full_real_hard_acc']:.2f}%")
    return "; ".join(parts) + "."


def _num(x: Any) -> float | None:
    """A finite number, or None (missing keys, null IOR, NaN std of a single seed)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def mean_std(mean: float, std: float | None, seeds: int | None = None) -> str:
    """Accuracy (a fraction) as ``mean ± std`` in percent, e.g. ``45.67 ± 1.23``; one seed has no spread to show
    (``45.67 (1 seed)``, not a misleading ``± 0.00``); ``std`` None prints the mean alone."""
    if seeds == 1:
        return f"{100 * mean:.2f} (1 seed)"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _pm(mean: Any, std: Any, seeds: Any = None) -> str:
    m = _num(mean)
    if m is None:
        return "-"
    return mean_std(m, _num(std), len(seeds) if isinstance(seeds, list) else None)


def _pts(x: Any, signed: bool) -> str:
    v = _num(x)
    return "-" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def _seconds(row: dict[str, Any]) -> dict[str, Any]:
    sec = row.get("seconds")
    return sec if isinstance(sec, dict) else {}


def _stages(rows: list[dict[str, Any]]) -> list[str]:
    """Stage names of every row, the pipeline's order first, then any other in order of appearance."""
    seen = _unique(k for r in rows for k in _seconds(r))
    return [k for k in _STAGE_ORDER if k in seen] + [k for k in seen if k not in _STAGE_ORDER]


def _results_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[bool]]:
    stages = _stages(rows)
    headers = ["method", "IPC", "student", "labels", "top-1 (%)", "IOR", "hard-label top-1 (%)", "HLR"]
    headers += ["label bytes"] + [f"{k} s" for k in stages]
    right = [False, True, False, False, True, True, True, True, True] + [True] * len(stages)
    body = []
    for r in rows:
        lb = r.get("label_bytes")
        cells = [
            str(r["method"]),
            str(r["ipc"]),
            str(r.get("student", "-")),
            str(r.get("label_mode", "-")),
            _pm(r.get("acc_mean"), r.get("acc_std"), r.get("seeds")),
            _pts(r.get("ior"), signed=True),
            _pm(r.get("hard_acc_mean"), r.get("hard_acc_std"), r.get("seeds")),
            _pts(r.get("hlr"), signed=False),
            f"{int(lb):,}" if _num(lb) is not None else "-",
        ]
        for k in stages:
            v = _num(_seconds(r).get(k))
            cells.append("-" if v is None else f"{v:.1f}")
        body.append(cells)
    return headers, body, right


def _recover_table(sets: list[_SetInfo]) -> tuple[list[str], list[list[str]], list[bool]]:
    keys = ("committee_size", "voting", "temperature", "iterations", "lr", "r_bn", "init")
    headers = ["set", "policy", *keys, "experts' top-1 on the final images (%)", "recover s (all units)"]
    right = [False, False, True, False, True, True, True, True, False, False, True]
    body = []
    for s in sets:
        meta = s.meta or {}
        cfg = s.recover_config or meta.get("config") or {}
        acc: dict[str, list[float]] = {}
        for unit in meta.get("units", []):
            for name, a in (unit.get("expert_accuracy") or {}).items():
                acc.setdefault(name, []).append(float(a))
        accs = ", ".join(f"{n} {100 * sum(v) / len(v):.1f}" for n, v in acc.items())
        secs = _num(meta.get("seconds_all_units"))
        body.append(
            [s.label, str(meta.get("committee_policy", "-"))]
            + [str(cfg.get(k, "-")) for k in keys]
            + [accs or "-", "-" if secs is None else f"{secs:.1f}"]
        )
    return headers, body, right


def _versions_table(
    config: dict[str, Any] | None, sets: list[_SetInfo]
) -> tuple[list[str], list[list[str]], list[bool]]:
    """The packages that made this report, next to those recorded by the run (where it records them)."""
    import importlib.metadata as md

    import torch

    from cvdd import __version__

    def installed(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    run_torch = _unique(str(s.meta["torch_version"]) for s in sets if s.meta and "torch_version" in s.meta)
    run_cvdd = (config or {}).get("cvdd_version")
    body = [
        ["cvdd", __version__, str(run_cvdd) if run_cvdd else "not recorded"],
        ["torch", torch.__version__, ", ".join(run_torch) or "not recorded"],
        ["torchvision", installed("torchvision"), "not recorded"],
        ["matplotlib", installed("matplotlib"), "-"],
        ["python", platform.python_version(), "not recorded"],
    ]
    return ["package", "this report", "the run"], body, [False, False, False]


# ---------------------------------------------------------------------------------------------------- figures


def _figure(
    doc: _Doc,
    pngs: dict[str, Path],
    out_dir: Path,
    notes: list[str],
    stem: str,
    caption: str,
    draw: Callable[[Path], bool],
) -> None:
    """Draw one PNG and reference it from the page; a figure with nothing to show is left out."""
    path = out_dir / f"{stem}.png"
    drawn = _guard(notes, f"the figure {path.name}", lambda: draw(path))
    if drawn:
        pngs[stem] = path
        doc.image(path.name, stem, caption)


def _new_figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, without pyplot: no global backend switch, no figure registry to leak into."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> bool:
    from cvdd.artifacts import temp_sibling

    tmp = temp_sibling(path)
    # No software/date metadata: the same run gives byte-identical figures.
    fig.savefig(tmp, format="png", metadata={"Software": None})
    os.replace(tmp, path)
    return True


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """One stable colour per name (method or expert), shared by every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _plot_accuracy(rows: list[dict[str, Any]], path: Path) -> bool:
    methods = _unique(str(r["method"]) for r in rows)
    color = _colors(methods)
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    ipcs = sorted(_unique(int(r["ipc"]) for r in rows))
    plotted = False
    for m in methods:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: int(r["ipc"]))
        for key, style, suffix in (("acc", "-o", ""), ("hard_acc", "--s", " (hard labels)")):
            pts = [(int(r["ipc"]), _num(r.get(f"{key}_mean")), _num(r.get(f"{key}_std"))) for r in mine]
            pts = [(x, y, s or 0.0) for x, y, s in pts if y is not None]
            if not pts:
                continue
            x, y, s = zip(*pts)
            ax.errorbar(
                x,
                [100 * v for v in y],
                yerr=[100 * v for v in s],
                fmt=style,
                color=color[m],
                capsize=3,
                label=m + suffix,
                alpha=1.0 if key == "acc" else 0.6,
            )
            plotted = True
    if not plotted:
        return False
    if len(ipcs) > 1 and ipcs[-1] / max(ipcs[0], 1) >= 5:
        ax.set_xscale("log")
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    ax.minorticks_off()
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("top-1 (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _plot_grid(sets: list[_SetInfo], spec: Any, path: Path) -> bool:
    canvases = [_canvas(s.thumbs or []) for s in sets]
    rows = len(sets[0].thumbs or [])
    t = (sets[0].thumbs or [[np.zeros((1, 1, 3))]])[0][0].shape[0]
    # Small images are drawn at least ~48 px per thumbnail so digits and 32 px CIFAR images are legible.
    scale = max(1.0, 48 / t) / 100
    widths = [max(c.shape[1] * scale, 1.3) for c in canvases]
    fig = _new_figure(sum(widths) + 1.2, canvases[0].shape[0] * scale + 0.7)
    axes = fig.subplots(1, len(sets), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    centers = [_GRID_PAD + r * (t + _GRID_PAD) + t / 2 for r in range(rows)]
    for i, (ax, s, canvas) in enumerate(zip(axes, sets, canvases)):
        ax.imshow(canvas, interpolation="nearest")
        ax.set_title(s.method, fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks(centers if i == 0 else [], list(spec.classes[:rows]) if i == 0 else [])
        for side in ax.spines.values():
            side.set_visible(False)
    return _save(fig, path)


def _canvas(thumbs: list[list[np.ndarray]]) -> np.ndarray:
    """Thumbnails on a white canvas, one row per class, with the same padding as the pipeline's grids."""
    rows, cols = len(thumbs), max(len(r) for r in thumbs)
    t = thumbs[0][0].shape[0]
    canvas = np.full((rows * (t + _GRID_PAD) + _GRID_PAD, cols * (t + _GRID_PAD) + _GRID_PAD, 3), 255, np.uint8)
    for r, row in enumerate(thumbs):
        for k, im in enumerate(row):
            y, x = _GRID_PAD + r * (t + _GRID_PAD), _GRID_PAD + k * (t + _GRID_PAD)
            canvas[y : y + t, x : x + t] = im
    return canvas


def _plot_losses(meta: dict[str, Any], label: str, path: Path) -> bool:
    """CE and BN terms per expert against the iteration, averaged over the units that logged them."""
    sums: dict[str, dict[int, list[float]]] = {}
    for unit in meta.get("units", []):
        for rec in unit.get("records", []):
            it = rec.get("iteration")
            for key, v in rec.items():
                if key.startswith(("ce/", "bn/")) and _num(v) is not None and it is not None:
                    sums.setdefault(key, {}).setdefault(int(it), []).append(float(v))
    if not sums:
        return False
    experts = _unique(k.split("/", 1)[1] for k in sums)
    color = _colors(_expert_order(meta, experts))
    fig = _new_figure(9.0, 3.6)
    axes = fig.subplots(1, 2)
    for ax, term, title in zip(axes, ("ce", "bn"), ("cross-entropy", "BatchNorm statistics")):
        for e in experts:
            series = sums.get(f"{term}/{e}")
            if not series:
                continue
            its = sorted(series)
            ax.plot(its, [sum(series[i]) / len(series[i]) for i in its], "-o", ms=3, color=color[e], label=e)
        ys = [v for k, s in sums.items() if k.startswith(term) for vs in s.values() for v in vs]
        # The BN term spans orders of magnitude as the pixels converge; a log axis keeps the tail readable.
        if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.set_title(f"{label}: {title}", fontsize="medium")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_weights(meta: dict[str, Any], label: str, path: Path) -> bool:
    """Stacked bars: the voting weight of each expert of the committee of every IPC index."""
    committees, weights = meta.get("committees"), meta.get("weights")
    if not committees or not weights or len(committees) != len(weights):
        return False
    experts = _expert_order(meta, _unique(str(e) for c in committees for e in c))
    color = _colors(experts)
    n = len(committees)
    fig = _new_figure(min(max(4.0, 0.25 * n + 2.5), 14.0), 3.4)
    ax = fig.add_subplot()
    bottom = np.zeros(n)
    for e in experts:
        h = np.array([float(w[c.index(e)]) if e in c else 0.0 for c, w in zip(committees, weights)])
        ax.bar(range(n), h, bottom=bottom, color=color[e], label=e, width=0.8)
        bottom += h
    ax.set_xlabel("IPC index")
    ax.set_ylabel("voter weight")
    ax.set_title(label, fontsize="medium")
    ax.set_xticks(range(n) if n <= 20 else range(0, n, max(1, n // 10)))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _plot_time(rows: list[dict[str, Any]], path: Path) -> bool:
    stages = _stages(rows)
    if not stages:
        return False
    labels = [f"{r['method']} IPC {r['ipc']}" for r in rows]
    return _grouped_bars(
        labels, stages, [[_num(_seconds(r).get(k)) or 0.0 for k in stages] for r in rows], "seconds", path
    )


def _memory(row: dict[str, Any]) -> dict[str, float]:
    """Memory figures of a row, if the run recorded any (a ``memory`` dict, or ``*memory*``/``*rss*`` keys)."""
    found: dict[str, float] = {}
    mem = row.get("memory")
    if isinstance(mem, dict):
        found.update({str(k): float(v) for k, v in mem.items() if _num(v) is not None})
    for k, v in row.items():
        if k != "memory" and re.search(r"memory|rss", k) and _num(v) is not None:
            found[k] = float(v)
    return found


def _plot_memory(rows: list[dict[str, Any]], path: Path) -> bool:
    keys = _unique(k for r in rows for k in _memory(r))
    labels = [f"{r['method']} IPC {r['ipc']}" for r in rows]
    values = [[_memory(r).get(k, 0.0) for k in keys] for r in rows]
    return _grouped_bars(labels, keys, values, "as recorded", path)


def _grouped_bars(labels: list[str], groups: list[str], values: list[list[float]], unit: str, path: Path) -> bool:
    """Horizontal bars, one cluster per row of results.json and one bar per group (stage, memory key)."""
    color = _colors(groups)
    n, g = len(labels), len(groups)
    fig = _new_figure(8.0, max(2.5, 0.16 * n * g + 1.0))
    ax = fig.add_subplot()
    height = 0.8 / g
    for j, name in enumerate(groups):
        ys = [i + (j - (g - 1) / 2) * height for i in range(n)]
        ax.barh(ys, [v[j] for v in values], height=height, color=color[name], label=name)
    ax.set_yticks(range(n), labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.axvline(0, color="#444", lw=0.8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- helpers


def _unique(items: Any) -> list[Any]:
    """Items in order of first appearance, without repeats."""
    return list(dict.fromkeys(items))


def _expert_order(meta: dict[str, Any], names: list[str]) -> list[str]:
    """The pool's order first (so an expert keeps its colour across figures), then any other name."""
    pool = [str(e) for e in meta.get("pool") or []]
    return [e for e in pool if e in names] + [e for e in names if e not in pool]


def _slug(name: str) -> str:
    """A file-name-safe method name: ``sre2l++`` -> ``sre2lpp``."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name.replace("+", "p"))


def _classes_shown(spec: Any) -> str:
    n = spec.num_classes
    return f"all {n} classes" if n <= MAX_GRID_CLASSES else f"the first {MAX_GRID_CLASSES} of {n} classes"
