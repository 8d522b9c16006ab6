"""The demo's KD and no-KD runs come in twins that train identically but for ``distill.alpha`` (same seeds, epochs,
learning rate, labelled batches; the no-KD twin skips the ONNX export its KD twin makes), cover the half-width and
10%-label students, and the page pairs each twin with its own."""

from __future__ import annotations

from qdistill.report import run_row
from qdistill.report.runs_page import kd_pairs, runs_page
from qdistill.runs.demo import add_kd_gains, demo_recipe, demo_runs

NAMES = ["w8a8", "w4a4", "w2a2", "small_w4a4", "w4a4_10pct", "small_w4a4_10pct"]


def test_every_kd_run_has_a_twin_that_differs_in_alpha_alone():
    for quick in (True, False):
        runs = dict(demo_runs(demo_recipe(quick)))
        assert list(runs) == [f"{name}_{kind}" for name in NAMES for kind in ("kd", "qat")]
        for name in NAMES:
            kd, qat = runs[f"{name}_kd"].to_dict(), runs[f"{name}_qat"].to_dict()
            assert kd["distill"]["alpha"] > 0 and qat["distill"]["alpha"] == 0
            kd["distill"].pop("alpha"), qat["distill"].pop("alpha")
            assert qat["export"]["onnx"] is False  # the KD twin exports this architecture at these bits
            kd["export"].pop("onnx"), qat["export"].pop("onnx")
            assert kd == qat, name
        assert [name for name, recipe in runs.items() if recipe.export.onnx] == (
            [] if quick else ["w8a8_kd", "w4a4_kd", "w2a2_kd"])


def test_scarce_label_and_half_width_runs():
    runs = dict(demo_runs(demo_recipe(False)))
    base = demo_recipe(False)
    for name, recipe in runs.items():
        assert recipe.train == base.train and recipe.data.seed == base.data.seed  # one budget for every student
        assert (recipe.student is not None) == name.startswith("small_")
        assert recipe.data.label_fraction == (0.1 if "_10pct" in name else None)
    assert runs["w4a4_10pct_kd"].data.unlabeled_ratio == 9  # each epoch: the 320 labelled and 2880 unlabeled once


def test_kd_gain_is_kd_minus_its_twin():
    rows = add_kd_gains([{"run": "teacher", "accuracy": 0.95}, {"run": "w4a4_10pct_kd", "accuracy": 0.93},
                         {"run": "w4a4_10pct_qat", "accuracy": 0.955}, {"run": "w4a4_kd", "accuracy": 0.96}])
    assert [row.get("kd_gain_pp") for row in rows] == [None, -2.5, None, None]  # w4a4_kd has no twin here


def _report(accuracy: float, alpha: float, labelled: int, unlabeled: int) -> dict:
    return {"recipe": {"quant": {"weight_bits": 4, "act_bits": 4}, "distill": {"alpha": alpha}},
            "teacher": {"accuracy": 0.96, "size_bytes": 4000}, "data": {"labelled_samples": labelled, "unlabeled_samples": unlabeled},
            "student": {"accuracy": accuracy, "size_bytes": 1000, "params": 100, "weight_bits": {"min": 4, "max": 4},
                        "act_bits": {"min": 4, "max": 4}}, "teacher_logits": "cached" if alpha else "unused"}


def test_the_page_pairs_each_kd_run_with_the_no_kd_run_of_its_labels():
    rows = [run_row("w4a4_kd", _report(0.961, 0.9, 3200, 0)), run_row("w4a4_qat", _report(0.958, 0.0, 3200, 0)),
            run_row("w4a4_10pct_kd", _report(0.950, 0.9, 320, 2880)), run_row("w4a4_10pct_qat", _report(0.930, 0.0, 320, 0))]
    assert [(plain["run"], kd["run"]) for plain, kd in kd_pairs(rows)] == [("w4a4_qat", "w4a4_kd"),
                                                                           ("w4a4_10pct_qat", "w4a4_10pct_kd")]
    page = runs_page("demo", rows)
    assert "w4a4_10pct_kd: W4A4 (320 labels + 2880 unlabeled) <span class=\"good\">+2.00 pp</span>" in page
    assert "w4a4_kd: W4A4 <span class=\"good\">+0.30 pp</span>" in page
