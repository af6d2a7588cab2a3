"""``cvdd report``: the HTML and Markdown report of a tiny real ``cvdd distill`` run on the embedded digits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import cvdd
from cvdd.errors import ArtifactError, CvddError
from cvdd.reporting import write_report


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


CHROMIUM = _chromium()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, digits, digit_experts: Path) -> Path:
    """A finished distill run: random real, SRe2L++ and CV-DD at IPC 1 and 2, 2 seeds, the smallest budget."""
    out = tmp_path_factory.mktemp("report-run")
    cvdd.distill(
        digits,
        out,
        experts=digit_experts,
        ipcs=[1, 2],
        seeds=[0, 1],
        overrides={"epochs": 1},
        recover_overrides={"iterations": 4, "log_every": 2, "init_candidates": 10, "init_crops": 2},
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def report(run: Path) -> dict[str, Path]:
    return write_report(run)


class _Page(HTMLParser):
    """The parts of the page the tests check: image sources and the cells of the results table."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._in_results = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "table" and a.get("id") == "results":
            self._in_results = True
        elif self._in_results and tag == "tr":
            self.rows.append([])
        elif self._in_results and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_results = False
            self.rows = [r for r in self.rows if r]  # the header row has <th> cells only
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _md_rows(text: str) -> list[tuple[str, int]]:
    """(method, IPC) of the Markdown results table: the first table after the Results heading."""
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")][1:]  # drop the header
    return [(cells[0], int(cells[1])) for cells in (re.split(r"\s\|\s", ln.strip("| ")) for ln in lines)]


def _expected(run: Path) -> list[tuple[str, int]]:
    return [(r["method"], r["ipc"]) for r in json.loads((run / "results.json").read_text())]


def test_report_html_and_markdown_hold_every_row_and_image(run: Path, report: dict[str, Path]) -> None:
    out = run / "report"
    assert report["html"] == out / "report.html" and report["md"] == out / "report.md"
    assert {"accuracy", "grid_ipc1", "grid_ipc2", "loss_cvdd_ipc2", "weights_cvdd_ipc2", "time"} <= set(report)
    for key, path in report.items():
        assert path.is_file() and path.parent == out, key

    page = _parse(report["html"])
    expected = _expected(run)
    assert len(expected) == 6
    assert [(cells[0], int(cells[1])) for cells in page.rows] == expected
    # Every image is a relative PNG inside the report folder: the folder is self-contained.
    assert page.images and len(page.images) == len(report) - 2
    for src in page.images:
        target = (out / src).resolve()
        assert not Path(src).is_absolute() and target.parent == out.resolve() and target.is_file(), src
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = report["md"].read_text(encoding="utf-8")
    assert _md_rows(md) == expected
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == set(page.images)
    html = report["html"].read_text(encoding="utf-8")
    for text in ("random-real", "sre2l++", "cvdd", "full_real_hard_acc", "torchvision", "python"):
        assert text in html and text in md, text


def test_report_table_values_match_results_json(run: Path, report: dict[str, Path]) -> None:
    rows = json.loads((run / "results.json").read_text())
    page = _parse(report["html"])
    for row, cells in zip(rows, page.rows):
        assert cells[4] == f"{100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f}"
        assert cells[6] == f"{100 * row['hard_acc_mean']:.2f} ± {100 * row['hard_acc_std']:.2f}"
        assert cells[7] == f"{100 * row['hlr']:.2f}"
        assert cells[-1] == f"{row['seconds']['evaluate']:.1f}"


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report", "experts"))
    return dest


def test_random_real_only_run_is_reported_without_recover_figures(run: Path, tmp_path: Path) -> None:
    only = _copy_run(run, tmp_path / "rr")
    rows = [r for r in json.loads((only / "results.json").read_text()) if r["method"] == "random-real"]
    (only / "results.json").write_text(json.dumps(rows))
    shutil.rmtree(only / "cvdd")
    shutil.rmtree(only / "sre2l++")
    paths = write_report(only, tmp_path / "out")
    assert paths["html"].parent == tmp_path / "out"
    assert {"grid_ipc1", "grid_ipc2", "accuracy", "time"} <= set(paths)
    assert not any(k.startswith(("loss_", "weights_")) for k in paths)
    page = _parse(paths["html"])
    assert [(c[0], int(c[1])) for c in page.rows] == [("random-real", 1), ("random-real", 2)]
    assert all((tmp_path / "out" / src).is_file() for src in page.images)
    assert "random real images only" in paths["md"].read_text()


def test_missing_and_corrupt_pieces_are_skipped_with_a_note(run: Path, tmp_path: Path) -> None:
    broken = _copy_run(run, tmp_path / "broken")
    (broken / "config.json").unlink()  # the spec then comes from a synthetic set's metadata
    syn = broken / "cvdd" / "ipc2" / "synthetic.safetensors"
    syn.write_bytes(syn.read_bytes()[:100])  # truncated: its sha256 no longer matches
    (broken / "random-real" / "ipc1" / "grid.png").unlink()
    paths = write_report(broken)
    md = paths["md"].read_text()
    assert "Skipped the images of cvdd IPC 2" in md
    assert "random-real IPC 1: no grid.png" in md
    assert "config.json not found" in md
    assert "grid_ipc2" in paths and "loss_cvdd_ipc2" not in paths and "loss_cvdd_ipc1" in paths
    assert _md_rows(md) == _expected(run)
    assert all((broken / "report" / src).is_file() for src in _parse(paths["html"]).images)


def test_large_sets_are_read_in_slices_like_small_ones(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cvdd import reporting as rep

    whole = rep._SetInfo("cvdd", 2, run / "cvdd" / "ipc2")
    rep._read_set(whole)
    monkeypatch.setattr(rep, "FULL_LOAD_LIMIT_BYTES", 0)
    sliced = rep._SetInfo("cvdd", 2, run / "cvdd" / "ipc2")
    rep._read_set(sliced)
    assert whole.thumbs is not None and sliced.thumbs is not None and len(whole.thumbs) == 10
    assert all(np.array_equal(a, b) for ra, rb in zip(whole.thumbs, sliced.thumbs) for a, b in zip(ra, rb))
    assert whole.meta == sliced.meta


def test_missing_run_or_results_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ArtifactError, match="run directory does not exist") as err:
        write_report(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CvddError, match=r"no results\.json in") as err:
        write_report(empty)
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
    (empty / "results.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        write_report(empty)
    assert not (empty / "report").exists()


_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    assert CHROMIUM is not None
    url = report["html"].resolve().as_uri()
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, *_CHROMIUM_FLAGS]
    subprocess.run(
        [*base, f"--user-data-dir={tmp_path / 'profile1'}", f"--screenshot={shot}", "--window-size=1280,2000", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not blank: text, tables and figures drawn

    # The page's inline script counts the images that loaded (complete, non-zero natural width).
    dom = subprocess.run(
        [*base, f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=5000", "--dump-dom", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, dom[:500]
    assert int(total.group(1)) == int(loaded.group(1)) == len(report) - 2 > 0


def test_info_describes_a_distill_run(run: Path) -> None:
    import cvdd

    described = cvdd.info(run)
    assert described["kind"] == "distill results" and described["rows"] >= 1 and described["dataset"] == "digits"
