"""The HTML reports' charts (matplotlib to inline SVG): readable axes, outliers, labels, and
the tune report rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil

import pytest

from compress import html_report
from compress.testing import render_in_chromium


def _candidate(i, kind, bits, size, acc, passed):
    return {
        "id": i,
        "kind": kind,
        "variant": "gpfq",
        "sparsity": None,
        "method": "gpfq",
        "options": {},
        "layer_bits": {"fc1": bits[0], "fc2": bits[1]},
        "proxy_divergence": 0.0,
        "estimated_bytes": size,
        "passed": passed,
        "error": None,
        "seconds": 1.0,
        "gates": [],
        "failures": []
        if passed
        else [{"gate": "max_accuracy_drop", "measured": 0.95 - acc, "limit": 0.01, "passed": False}],
        "metrics": {
            "packed_size": size,
            "accuracy": acc,
            "input_accuracy": 0.95,
            "input_size": 200_000,
            "cosine": 0.99,
        },
    }


def tune_report() -> dict:
    cands = [
        _candidate(0, "baseline", (8, 8), 37_000, 0.945, True),
        _candidate(1, "baseline", (4, 4), 25_600, 0.945, True),
        _candidate(2, "baseline", (2, 2), 20_000, 0.866, False),
        _candidate(3, "search", (8, 3), 23_500, 0.947, True),
        _candidate(4, "search", (3, 3), 23_100, 0.925, False),
    ]
    return {
        "recipe": "toy",
        "objective": "packed_size",
        "sensitivity_metric": "kl",
        "passed": True,
        "gates": {"max_accuracy_drop": 0.01},
        "candidates": cands,
        "chosen": cands[3],
        "best": cands[3],
        "smallest_passing_baseline": cands[1],
        "missed_gates": [],
        "tuned_recipe": "out/recipe.tuned.yaml",
        "tuned_run": {"reproduced": True},
        "candidates_run": 5,
        "search_seconds": 12.0,
        "layers": [
            {"layer": "fc1", "bits": 8, "sensitivity": {"2": 0.2, "8": 1e-6, "float": 0.0}, "bytes": {"8": 900.0}},
            {"layer": "fc2", "bits": 3, "sensitivity": {"2": 0.01, "8": 1e-7, "float": 0.0}, "bytes": {"3": 300.0}},
        ],
    }


def test_log_ticks_are_several_and_readable():
    for lo, hi in ((20_000, 250_000), (25_000, 37_000), (100, 1e7), (9_000, 9_800)):
        ticks = html_report._log_ticks(lo, hi)
        assert 2 <= len(ticks) <= 6, (lo, hi, ticks)
        assert all(lo <= t <= hi for t in ticks) and ticks == sorted(set(ticks))


def test_scatter_merges_labels_of_points_on_the_same_spot():
    svg = html_report.scatter_svg(
        [
            ("input", 199_429, 0.949),
            ("prune", 195_112, 0.945),
            ("quantize", 26_144, 0.945),
            ("compress", 25_620, 0.945),
            ("export", 29_493, 0.945),
        ],
        "size",
        "accuracy",
    )
    assert svg.startswith("<svg") and "quantize, compress" in svg
    assert svg.count(">export<") == 1 and "http://www.w3.org/1999/xlink" not in svg
    ticks = re.findall(r">(\d+(?:\.\d+)? KB)<", svg)
    assert len(set(ticks)) >= 3  # not a single tick on the log axis


def test_histogram_keeps_the_body_visible_despite_an_outlier():
    samples = [0.040 + 0.0001 * (i % 20) for i in range(99)] + [5.0]
    svg = html_report.histogram_svg(samples)
    assert "1 slower (up to 5.000 ms) not drawn" in svg
    assert "p50 0.041 ms" in svg and "p90" in svg


def test_run_headline_reads_like_a_summary():
    stages = [
        {"stage": "input", "size_bytes": 199_429, "accuracy": 0.949},
        {
            "stage": "export",
            "size_bytes": 29_493,
            "final_size_bytes": 29_493,
            "accuracy": 0.945,
            "latency_p50_ms": 0.027,
            "metrics": {"float_latency_p50_ms": 0.0567},
        },
    ]
    assert html_report.headline(stages) == "199 KB → 29.5 KB (6.8×), −0.4 pt accuracy, 2.1× faster than float"


def test_tune_report_page_has_the_tradeoff_and_the_layers():
    page = html_report.render_tune_html(tune_report())
    assert page.count("<svg") == 1 and "<script" not in page
    for text in (
        "Pareto front",
        "uniform bits",
        "chosen",
        "gate: accuracy ≥ 94.00%",
        "fc1",
        "1.09× smaller than the best uniform",
    ):
        assert text in page, text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_tune_report_renders_in_headless_chromium(tmp_path):
    path = tmp_path / "report.html"
    path.write_text(html_report.render_tune_html(tune_report()))
    shot = tmp_path / "shot.png"
    proc = render_in_chromium(path.as_uri(), shot, window="1200,1400")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Trade-off: every candidate" in proc.stdout and "<svg" in proc.stdout
    png = shot.read_bytes() if shot.exists() else b""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
