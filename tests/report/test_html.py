"""report.html: a well-formed, self-contained page with every section the report has data for."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np

from qdistill.report import render

REPORT = {
    "teacher": {"accuracy": 0.97, "f1_macro": 0.96, "params": 100, "size_bytes": 400},
    "student": {"accuracy": 0.95, "f1_macro": 0.94, "params": 100, "size_bytes": 60, "agreement_with_teacher": 0.98,
                "weight_bits": {"min": 4, "max": 8, "histogram": {"4": 2, "8": 2}},
                "act_bits": {"min": 4, "max": 8, "histogram": {"4": 2, "8": 2}},
                "per_layer": {"conv<1>": {"weight_bits": 8, "act_bits": 8}}, "unquantized_layers": ["norm: <float>"]},
    "evaluated_on": "test",
    "history": [{"epoch": 1, "loss": 1.0, "kd_loss": 0.5, "task_loss": 0.4, "val_accuracy": 0.9, "lr": 0.1, "seconds": 1},
                {"epoch": 2, "loss": 0.5, "kd_loss": 0.2, "task_loss": 0.3, "val_accuracy": 0.95, "lr": 0.05, "seconds": 1}],
    "per_class": {"teacher": [{"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}] * 2,
                  "student": [{"precision": 0.5, "recall": 1.0, "f1": 0.66, "support": 3}] * 2},
    "confusion_matrix": {"teacher": [[3, 0], [0, 3]], "student": [[3, 0], [1, 2]]},
    "export": {"onnx": {"path": "model.onnx", "file_bytes": 1234}},
}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            assert not (name in ("src", "href") and value and value.startswith("http")), "no network resources"

    def handle_data(self, data):
        self.text.append(data)


def test_page_has_every_section_and_is_self_contained():
    group = {"indices": list(range(10)), "images": np.random.rand(10, 1, 8, 8), "labels": [0] * 10,
             "student": [0, 1] * 5, "teacher": [0] * 10}
    page = render(REPORT, {"first": group, "student_wrong_teacher_right": group})
    parser = _Collector()
    parser.feed(page)
    text = " ".join(parser.text)
    for heading in ("Teacher and student", "test", "Training", "First ten test samples", "Per-class precision, recall and F1",
                    "Confusion matrices", "Layers", "Export"):
        assert heading in text, heading
    assert "weights at 4-8 bits" in text
    # loss, accuracy, learning rate, two prediction grids, per-class bars, confusion, bits per layer
    assert parser.tags.count("svg") >= 8
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "conv&lt;1&gt;" in page and "norm: &lt;float&gt;" in page  # names are escaped


def test_sections_without_data_are_left_out():
    page = render({"teacher": {"accuracy": 0.9}, "student": {"accuracy": 0.8}})
    assert "Training" not in page and "Export" not in page and "Confusion matrices" not in page
