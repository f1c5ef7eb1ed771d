"""The plotting module: the only importer of matplotlib, itself free to import, and its shared styles."""

import ast
import math
import subprocess
import sys
from pathlib import Path

from efficient_attn_tasks import plots
from efficient_attn_tasks.bench import train_report
from efficient_attn_tasks.plots import Line, Panel

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, wherever it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_the_plotting_module_imports_matplotlib():
    importers = sorted(str(path.relative_to(ROOT)) for package in ("efficient_attn", "efficient_attn_tasks")
                       for path in (ROOT / package).rglob("*.py")
                       if any(name.split(".")[0] == "matplotlib" for name in imported_modules(path)))
    assert importers == ["efficient_attn_tasks/plots.py"]


def test_the_modules_that_plot_import_without_matplotlib():
    modules = ["efficient_attn_tasks.plots", "efficient_attn_tasks.report.lines",
               "efficient_attn_tasks.report.curve_bands",
               "efficient_attn_tasks.run.curves", "efficient_attn_tasks.bench.report",
               "efficient_attn_tasks.approx.report", "efficient_attn_tasks.approx.scaling"]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_bounds_clip_accuracies_only():
    assert plots.bounds("val/acc") == plots.bounds("accuracy") == (0.0, 1.0)
    assert plots.bounds("val/bleu") == (-math.inf, math.inf)


def test_the_reference_is_black_and_thicker_and_colours_cycle():
    assert plots.colour(Line("softmax", [], [], index=3, reference=True)) == "black"
    assert plots.width(Line("softmax", [], [], reference=True), 1.5) == 2.5
    assert plots.colour(Line("favor", [], [], index=12)) == "C2"


def test_the_train_benchmark_draws_its_reference_black(tmp_path, monkeypatch):
    rows = [{"attention": name, "L": L, "status": "ok", "tokens_per_s": 1000.0 / L, "attention_share": 0.5,
             "peak_cuda_mib": None, "peak_rss_mib": 100.0 + L} for name in ("softmax", "favor") for L in (64, 128)]
    drawn = []
    monkeypatch.setattr(train_report, "against_length", lambda panels, path, title: drawn.extend(panels))
    train_report.plot(rows, tmp_path / "t.png", "title")
    assert [panel.title for panel in drawn] == ["training throughput",
                                               "share of step time in the core attention (fwd+bwd)", "peak memory"]
    for panel in drawn:
        assert [(line.label, line.reference, list(line.xs)) for line in panel.lines] == [
            ("softmax", True, [64, 128]), ("favor", False, [64, 128])]


def test_a_figure_is_written_where_asked_and_its_path_returned(tmp_path):
    panels = [Panel([Line("a", [1, 2, 4], [1.0, 2.0, 3.0], lo=[0.5, 1.5, 2.5], hi=[1.5, 2.5, 3.5])],
                    xlabel="x", ylabel="y", title="one"), Panel(note="nothing recorded", title="two")]
    out = plots.run_curves(panels, tmp_path / "new" / "dir" / "f.png", "title")
    assert out == tmp_path / "new" / "dir" / "f.png" and out.read_bytes().startswith(PNG)
