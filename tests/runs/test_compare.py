"""``qdistill compare DIR [DIR ...]``: a table of runs and compare.html; a folder without report.json is a
one-line error naming it. The page's verdicts (kept the teacher's accuracy, what KD changed) against a reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qdistill.cli import main
from qdistill.report import run_row, runs_page

TEACHER = {"accuracy": 0.95, "size_bytes": 400_000}


def _report(accuracy: float, bits: int, kd: bool, size_bytes: int, latency: float | None = None) -> dict:
    report = {"recipe": {"quant": {"weight_bits": bits, "act_bits": bits}, "distill": {"alpha": 0.9 if kd else 0.0}},
              "teacher": dict(TEACHER), "teacher_logits": "cached" if kd else "unused",
              "student": {"accuracy": accuracy, "f1_macro": accuracy - 0.01, "params": 1000, "size_bytes": size_bytes,
                          "agreement_with_teacher": 0.97, "weight_bits": {"min": bits, "max": 8},
                          "act_bits": {"min": bits, "max": 8}}}
    if latency is not None:
        report["export"] = {"onnx": {"latency_us_per_sample": {"batch1": latency, "batch64": 1.0}}}
    return report


RUNS = {"w8_kd": _report(0.9480, 8, True, 100_000, latency=12.5), "w8_qat": _report(0.9410, 8, False, 100_000),
        "w2_kd": _report(0.8123, 2, True, 25_000)}


def _write_runs(root: Path) -> list[Path]:
    folders = []
    for name, report in RUNS.items():
        folder = root / "runs" / name
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(json.dumps(report))
        folders.append(folder)
    (folders[0] / "report.html").write_text("<!doctype html><title>report</title>")
    return folders


def test_compare_prints_the_table_and_writes_the_page(tmp_path, capsys):
    folders = _write_runs(tmp_path)
    out = tmp_path / "pages" / "cmp.html"
    assert main(["compare", *map(str, folders), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name, report in RUNS.items():
        line = next(line for line in printed.splitlines() if f" {name} " in line)
        assert f"{100 * report['student']['accuracy']:.2f}%" in line
    assert "12.5" in printed  # the exported run's latency
    page = out.read_text()
    links = re.findall(r'<a href="([^"#]+)">', page)
    assert links == ["../runs/w8_kd/report.html"] and (out.parent / links[0]).resolve() == (folders[0] / "report.html")


def test_compare_writes_to_the_current_folder_by_default(tmp_path, monkeypatch):
    folders = _write_runs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(folders[0]), str(folders[1])]) == 0
    assert (tmp_path / "compare.html").is_file()


def test_a_folder_without_report_json_is_a_one_line_error_naming_it(tmp_path, capsys):
    folders = _write_runs(tmp_path)
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    out = tmp_path / "cmp.html"
    assert main(["compare", str(folders[0]), str(empty), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(empty) in error and "report.json" in error
    assert not out.exists()


def test_page_verdicts_match_a_reference():
    rows = [run_row(name, report, None) for name, report in RUNS.items()]
    kept = {name for name, report in RUNS.items() if report["student"]["accuracy"] >= TEACHER["accuracy"] - 0.005}
    assert {row["run"] for row in rows if row["kept_teacher_accuracy"]} == kept == {"w8_kd"}
    page = runs_page("compare", rows)
    table = page[page.index("<h2>All runs</h2>"):]
    for name in RUNS:
        row = re.search(rf"<tr( class=\"kept\")?><td>{name}</td>", table)
        assert row and bool(row.group(1)) == (name in kept), name
    change = 100 * (RUNS["w8_kd"]["student"]["accuracy"] - RUNS["w8_qat"]["student"]["accuracy"])
    assert f"W8A8 <span class=\"good\">{change:+.2f} pp</span>" in page  # KD minus no KD at equal bits
    assert "W2A2" not in page[page.index("<b>What KD changed</b>"):page.index("</p>", page.index("<b>What KD changed</b>"))]
    assert "smallest that kept it</span><b>w8_kd</b>" in page
