"""report.html's plots and tables show the report's own numbers: labelled axes and ticks, class names, counts,
kernels, sizes, latencies, the search's choice; the page loads nothing from a network."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdistill.report import render
from qdistill.report.search_page import pareto_front

CLASSES = ["zero", "one", "two"]
REPORT = {
    "class_names": CLASSES,
    "evaluated_on": "test",
    "data": {"test_samples": 1234},
    "teacher": {"accuracy": 0.97, "f1_macro": 0.96, "params": 100, "size_bytes": 400,
                "history": [{"epoch": 1, "val_accuracy": 0.9375}]},
    "student": {"accuracy": 0.95, "f1_macro": 0.94, "params": 100, "size_bytes": 60, "agreement_with_teacher": 0.98,
                "weight_bits": {"min": 4, "max": 8}, "act_bits": {"min": 4, "max": 8},
                "per_layer": {"conv": {"weight_bits": 8, "act_bits": 8,
                                       "weight_step": {"min": 0.011, "mean": 0.0234, "max": 0.031},
                                       "act_step": {"min": 0.0567, "mean": 0.0567, "max": 0.0567}},
                              "fc": {"weight_bits": 4, "act_bits": 4, "weight_step": {"min": 0.2, "mean": 0.25, "max": 0.3},
                                     "act_step": {"min": 0.125, "mean": 0.125, "max": 0.125}}}},
    "history": [{"epoch": 1, "loss": 1.0, "kd_loss": 0.5, "task_loss": 0.4, "val_accuracy": 0.9, "lr": 0.1, "seconds": 1},
                {"epoch": 2, "loss": 0.5, "kd_loss": 0.2, "task_loss": 0.3, "val_accuracy": 0.95, "lr": 0.05, "seconds": 1},
                {"epoch": 3, "loss": 0.4, "kd_loss": 0.1, "task_loss": 0.2, "val_accuracy": 0.96, "lr": 0.01, "seconds": 1}],
    "per_class": {"teacher": [{"precision": 1.0, "recall": 0.9, "f1": 0.9473, "support": 3}] * 3,
                  "student": [{"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 3}] * 3},
    "confusion_matrix": {"teacher": [[123, 0, 0], [0, 991, 7], [0, 0, 311]],
                         "student": [[117, 6, 0], [0, 989, 9], [0, 13, 298]]},
    "export": {"onnx": {"path": "/somewhere/model.onnx", "file_bytes": 62935, "fp32_file_bytes": 214111,
                        "accuracy": 0.9166, "student_accuracy": 0.9166, "agreement_with_student": 1.0,
                        "max_abs_logit_diff": 2.86e-06, "samples": 288,
                        "integer_ops": {"conv": "QLinearConv", "fc": "QGemm"},
                        "latency_us_per_sample": {"batch1": 26.24, "batch64": 7.32},
                        "latency_threads": {"1": {"int8": {"batch1": 20.59, "batch64": 4.85},
                                                  "fp32": {"batch1": 22.41, "batch64": 5.19},
                                                  "torch_fp32": {"batch1": 149.48, "batch64": 23.93}},
                                            "all": {"int8": {"batch1": 26.24, "batch64": 7.32},
                                                    "fp32": {"batch1": 31.67, "batch64": 4.12},
                                                    "torch_fp32": {"batch1": 227.2, "batch64": 22.59}},
                                            "all_threads": 2},
                        "opset": 13},
               "packed": {"path": "/somewhere/student.qpack.safetensors", "file_bytes": 60976, "fp32_file_bytes": 212672}},
    "search": {"target_accuracy": 0.9, "teacher_accuracy": 0.95, "ladder": [[2, 2], [4, 4], [8, 8]], "target_met": True,
               "candidates": [{"weight_bits": 4, "act_bits": 4, "val_accuracy": 0.93, "accuracy": 0.92, "size_bytes": 30000,
                               "met_target": True, "epochs": 2, "seconds": 1.0},
                              {"weight_bits": 2, "act_bits": 2, "val_accuracy": 0.7, "accuracy": 0.69, "size_bytes": 15000,
                               "met_target": False, "epochs": 2, "seconds": 1.0}],
               "chosen": {"weight_bits": 4, "act_bits": 4, "val_accuracy": 0.93, "accuracy": 0.92, "size_bytes": 30000,
                          "met_target": True, "epochs": 2, "seconds": 1.0}},
}
GROUP = {"indices": [0, 1, 2], "images": np.random.default_rng(0).random((3, 1, 8, 8)), "labels": [0, 1, 2],
         "student": [0, 2, 2], "teacher": [0, 1, 2]}
SAMPLES = {"first": GROUP, "student_wrong_teacher_right": {**GROUP, "indices": [1], "images": GROUP["images"][1:2],
                                                             "labels": [1], "student": [2], "teacher": [1]}}


class _Tables(HTMLParser):
    """Every table of a page as rows of cell texts, and the attributes that could load something."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.loads: list[str] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.loads += [value for name, value in attrs if name in ("src", "href", "xlink:href") and value
                       and not value.startswith(("#", "data:"))]  # in-page references and inline data only
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def _svg(page: str, label: str) -> list[str]:
    """The texts drawn in the plot whose aria-label is ``label``."""
    match = re.search(rf'<svg class="plot" role="img" aria-label="{re.escape(label)}".*?</svg>', page, re.S)
    assert match, f"no plot {label!r}"
    return [html.unescape(text) for text in re.findall(r"<text[^>]*>([^<]*)</text>", match.group(0))]


def _table_with(parser: _Tables, heading: str) -> list[list[str]]:
    return next(table for table in parser.tables if table and table[0] and table[0][0] == heading)


@pytest.fixture(scope="module")
def page() -> str:
    return render(REPORT, SAMPLES)


def test_training_plots_have_labelled_axes_ticks_and_legends(page):
    loss = _svg(page, "loss parts per epoch")
    assert {"epoch", "mean loss per batch", "total", "KD", "task"} <= set(loss)
    assert {"1", "2", "3"} <= set(loss)  # integer epoch ticks
    accuracy = _svg(page, "validation accuracy per epoch")
    assert "validation accuracy (%)" in accuracy and "teacher, end of its training" in accuracy
    ticks = [float(text) for text in accuracy if re.fullmatch(r"\d+(\.\d+)?", text) and float(text) > 3]
    assert ticks and min(ticks) <= 90.0 and max(ticks) >= 95.0  # the y ticks span the history in percent
    assert "learning rate (epoch's first step)" in _svg(page, "learning rate per epoch")


def test_per_class_plot_names_every_class_and_table_shows_f1_changes(page):
    texts = _svg(page, "per-class precision, recall and F1")
    assert set(CLASSES) <= set(texts) and {"precision", "recall", "F1", "class", "teacher", "student"} <= set(texts)
    rows = _table_with(_parse(page), "class")
    change = f"{100 * (0.6667 - 0.9473):+.2f} pp"
    assert [row[0] for row in rows[1:]] == CLASSES and all(row[-1] == change for row in rows[1:])


def test_confusion_heat_map_shows_every_nonzero_count(page):
    texts = _svg(page, "confusion matrices")
    counts = [str(count) for matrix in REPORT["confusion_matrix"].values() for row in matrix for count in row if count]
    for count in set(counts):
        assert texts.count(count) >= counts.count(count), count
    assert {"predicted class", "true class", "teacher", "student", "test samples"} <= set(texts)


def test_prediction_grids_caption_true_student_and_teacher_classes(page):
    first = _svg(page, "first ten test samples")
    assert ["#1: true one", "student two", "teacher one"] == first[3:6]
    assert "#1: true one" in _svg(page, "student wrong, teacher right")


def test_layers_show_bits_and_step_sizes(page):
    rows = _table_with(_parse(page), "layer")
    assert rows[1][:3] == ["conv", "8", "8"] and rows[1][3].startswith("0.0234") and rows[1][4] == "0.0567"
    assert rows[2][:3] == ["fc", "4", "4"] and "0.2-0.3" in rows[2][3]
    assert {"step size (log scale)", "conv", "fc"} <= set(_svg(page, "step sizes per layer"))


def test_export_is_tables_and_latency_bars(page):
    parser = _parse(page)
    files = _table_with(parser, "file")
    assert files[1] == ["int8 ONNX", "model.onnx", "62,935 B (61.5 KiB)", "fp32 ONNX", "214,111 B (209.1 KiB)",
                        f"{214111 / 62935:.1f}x"]
    assert files[2][0] == "packed low-bit weights" and files[2][2].startswith("60,976 B")
    kernels = [table for table in parser.tables if table[0][:2] == ["layer", "ONNX operator"]][0]
    assert [row[:2] for row in kernels[1:]] == [["conv", "QLinearConv"], ["fc", "QGemm"]]
    parity = dict(_table_with(parser, "check")[1:])
    assert parity["samples compared (validation split)"] == "288" and parity["ONNX int8 accuracy"] == "91.66%"
    latency = _table_with(parser, "batch, threads")
    assert latency[1] == ["batch 1, 1 thread", "20.59", "22.41", "149.48"]
    assert latency[4] == ["batch 64, 2 threads", "7.32", "4.12", "22.59"]
    bars = _svg(page, "latency per sample")
    assert {"ONNX Runtime int8", "ONNX Runtime fp32", "PyTorch fp32 (eager)", "149", "227"} <= set(bars)
    assert "{" not in "".join(cell for table in parser.tables for row in table for cell in row)  # no JSON dump


def test_search_plot_marks_the_chosen_candidate(page):
    texts = _svg(page, "search: size against accuracy")
    assert {"chosen: w4a4", "target (validation)", "w2a2", "w4a4", "accuracy (%)", "student size (KiB, theoretical)",
            "Pareto front"} <= set(texts)
    rows = _table_with(_parse(page), "candidate")
    assert [row[0] for row in rows[1:]] == ["w4a4", "w2a2"] and rows[1][-1] == "chosen" and rows[2][-1] == ""


def test_page_is_self_contained(page):
    parser = _parse(page)
    assert parser.loads == [] and not {"script", "link", "iframe", "img"} & parser.tags
    assert "@import" not in page and not re.search(r"url\((?!#)", page)  # only in-page references (clip paths)


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 100)), min_size=1, max_size=12))
def test_pareto_front_is_the_undominated_points(points):
    def dominated(point):
        return any(o[0] <= point[0] and o[1] >= point[1] and o != point for o in points)
    expected = sorted({point for point in points if not dominated(point)})
    assert sorted(set(pareto_front(points))) == expected
