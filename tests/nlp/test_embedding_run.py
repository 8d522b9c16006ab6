"""`qdistill run` with an embedding model on unlabeled text, end to end through the real command.

A small random BERT (tests/nlp/conftest.py) keeps the runs fast; the metrics in report.json are checked
against cosines computed here with torch on the saved student and the teacher loaded by transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qdistill.cli import main
from qdistill.evaluate import embed
from qdistill.kd.hidden import HiddenStateKD
from qdistill.models.hf import load_hf
from qdistill.recipe import Recipe
from qdistill.runs.rundir import load_run
from qdistill.runs.stages import prepare_data

from .conftest import tiny_bert_folder

transformers = pytest.importorskip("transformers")
RECIPE = Path(__file__).parents[2] / "recipes" / "nlp" / "minilm_embedding_w8a8.yaml"
SENTENCES = Path(__file__).parents[2] / "recipes" / "nlp" / "pydoc_sentences.txt"


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("".join(SENTENCES.read_text().splitlines(keepends=True)[:60]))
    return str(path)


def _run(tmp_path, model: str, tokenizer: str, text: str, *overrides: str, command: str = "run") -> tuple[int, Path]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    code = main([command, str(RECIPE), "--out", str(out), "--no-progress", f"model.hf={model}",
                 f"data.tokenizer={tokenizer}", f"data.text={text}", "data.max_length=16", "train.epochs=1",
                 "train.lr=1.0e-3", *overrides])
    return code, out


def _reference_cosines(out: Path, teacher_folder: str) -> torch.Tensor:
    """Cosine of each test text's student and teacher embedding, from transformers' BertModel and torch alone."""
    recipe = Recipe.from_yaml(out / "recipe.yaml")
    test = prepare_data(recipe).test
    student = load_run(out)
    bert = transformers.AutoModel.from_pretrained(teacher_folder, local_files_only=True).eval()
    teacher = []
    with torch.no_grad():
        for (inputs,) in test:
            hidden = bert(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            teacher.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.nn.functional.cosine_similarity(embed(student, test).double(), torch.cat(teacher).double(), dim=1)


def test_embedding_recipe_runs_label_free_and_reports_embedding_metrics(tmp_path, minilm, tiny_bert, texts, capsys):
    code, out = _run(tmp_path, tiny_bert, minilm, texts)
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    student = report["student"]
    assert report["output_kind"] == "embedding" and report["label_free"] is True
    assert "accuracy" not in student and "accuracy" not in report["teacher"]
    assert "history" not in report["teacher"] and not (out / "teacher.safetensors").exists()  # the folder is the teacher
    assert report["data"]["unlabeled_samples"] == report["data"]["train_samples"] > 0
    cosines = _reference_cosines(out, tiny_bert)
    assert student["embedding_samples"] == len(cosines) == report["data"]["test_samples"]
    assert student["mean_cosine"] == pytest.approx(float(cosines.mean()), abs=1e-5)
    assert student["min_cosine"] == pytest.approx(float(cosines.min()), abs=1e-5)
    assert 0.0 <= student["agreement_at_1"] <= 1.0 and 0.0 <= student["agreement_at_10"] <= 1.0
    onnx = report["export"]["onnx"]
    assert onnx["output_kind"] == "embedding" and onnx["mean_cosine"] >= 0.999  # the embedding gate ran
    assert (out / "student.qpack.safetensors").is_file()
    html = (out / "report.html").read_text()
    assert "mean cosine" in html and "agreement@10" in html


def test_embedding_kd_moves_the_student_towards_the_teacher(tmp_path, minilm, tiny_bert, texts, capsys):
    """More training (lr > 0) ends closer to the teacher than none at all (2-bit weights start far away)."""
    results = {}
    for lr in ("1.0e-9", "2.0e-3"):
        code, out = _run(tmp_path, tiny_bert, minilm, texts, "quant.weight_bits=2", "train.epochs=4", f"train.lr={lr}",
                         "export.onnx=false", "export.packed=false")
        assert code == 0, capsys.readouterr().err
        results[lr] = json.loads((out / "report.json").read_text())["student"]["mean_cosine"]
    assert results["2.0e-3"] > results["1.0e-9"] + 0.005, results


def test_smaller_hf_student_keeps_teacher_layers_and_hidden_kd_is_logged(tmp_path, minilm, tiny_bert, texts, capsys):
    code, out = _run(tmp_path, tiny_bert, minilm, texts, f"student={{hf: {tiny_bert}, num_layers: 1}}",
                     "distill.hidden_layers=[[1, 0]]", "distill.attention_relation_weight=1.0", "export.onnx=false")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["student_init"] == {"from": "hf_folder", "teacher_layers": [1]}
    history = report["history"][0]
    assert history["feature:hidden:1->0_loss"] > 0 and history["feature:attention_relation_loss"] >= 0
    assert report["student"]["params"] < report["teacher"]["params"]


def test_unlabeled_text_joins_the_transfer_set(tmp_path, minilm, tiny_bert, texts, capsys):
    extra = tmp_path / "more.txt"
    extra.write_text("".join(SENTENCES.read_text().splitlines(keepends=True)[100:140]))
    code, out = _run(tmp_path, tiny_bert, minilm, texts, f"data.unlabeled={{text: {extra}}}", "export.onnx=false",
                     "export.packed=false")
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "report.json").read_text())["data"]
    assert data["unlabeled_samples"] == data["train_samples"] + 40


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.target_accuracy=0.9"], "train.target_accuracy: an embedding model has no accuracy"),
    (["distill.hidden_layers=[[5, 0]]"], "distill.hidden_layers: teacher layer 5 does not exist"),
    (["distill.cosine_weight=0"], "cosine_weight and mse_weight must not both be 0"),
])
def test_bad_embedding_settings_are_one_line_errors(tmp_path, minilm, tiny_bert, texts, capsys, overrides, message):
    code, _ = _run(tmp_path, tiny_bert, minilm, texts, *overrides)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_search_refuses_an_embedding_model(tmp_path, minilm, tiny_bert, texts, capsys):
    code, _ = _run(tmp_path, tiny_bert, minilm, texts, command="search")
    err = capsys.readouterr().err
    assert code == 2 and "embeddings, which have no accuracy" in err, err


def test_classifier_recipe_with_labels_still_trains_its_teacher(tmp_path, minilm, tiny_bert, capsys):
    lines = SENTENCES.read_text().splitlines()[:60]
    text = tmp_path / "labelled.jsonl"
    text.write_text("".join(json.dumps({"text": line, "label": int("the" in line.lower().split())}) + "\n"
                            for line in lines))
    code, out = _run(tmp_path, tiny_bert, minilm, str(text), "model.task=sequence_classification",
                     "distill.output=auto", "data.label_field=label", "teacher_train.epochs=1", "export.onnx=false")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["output_kind"] == "logits" and 0.0 <= report["student"]["accuracy"] <= 1.0
    assert report["teacher"]["history"] and "mean_cosine" not in report["student"]


def test_hidden_state_projection_when_widths_differ(tmp_path, tiny_bert):
    narrow = tiny_bert_folder(tmp_path / "narrow", hidden=16, layers=1)
    kd = HiddenStateKD(load_hf(tiny_bert), load_hf(narrow), [(1, 0)])
    assert isinstance(kd.projections[0], torch.nn.Linear) and kd.projections[0].weight.shape == (32, 16)
