"""Inputs that are not one float tensor: a float tensor beside int64 token ids, given as a dict, a tuple, or a
Hugging Face style dict batch, through ``distill`` (calibration, the teacher cache, mixing, training), ``evaluate``
and ``prepare``. References are computed here by calling the models directly."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from qdistill import quant
from qdistill.batch import call_model
from qdistill.data import make_loader
from qdistill.errors import DataError
from qdistill.evaluate import evaluate
from qdistill.kd import CachedTeacherLoader
from qdistill.kd.mixing import mix
from qdistill.recipe import TrainSpec
from qdistill.runs.student import distill
from qdistill.train import Supervised, fit
from support import MaskedTokenNet, TokenFeatureNet, token_feature_data

RECIPE = {"quant": {"weight_bits": 8, "act_bits": 8}, "train": {"epochs": 2, "lr": 2e-3}}


def _named(x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"features": x, "input_ids": ids}


@pytest.fixture(scope="module")
def splits():
    """Train, validation and test inputs ``(features, input_ids, labels)`` (different seeds)."""
    return token_feature_data(512, seed=0), token_feature_data(128, seed=1), token_feature_data(128, seed=2)


@pytest.fixture(scope="module")
def teacher(splits):
    """``TokenFeatureNet`` trained on dict batches (``Supervised`` calls it as ``model(**inputs)``)."""
    torch.manual_seed(0)
    x, ids, y = splits[0]
    model = TokenFeatureNet()
    fit(Supervised(model), make_loader(_named(x, ids), y, 32, seed=0, shuffle=True),
        TrainSpec(epochs=20, lr=5e-3, schedule="constant"), phase="teacher", show_progress=False)
    return model.eval()


def _accuracy(model, x, ids, y) -> float:
    """The reference: the model called by hand on all inputs."""
    with torch.no_grad():
        return float((model.eval()(x, ids).argmax(dim=1) == y).float().mean())


def _dtype_probe(model):
    """Records the dtype every call passes to the model's embedding."""
    seen = []
    return seen, model.embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))


def test_teacher_learned_from_both_inputs(splits, teacher):
    x, ids, y = splits[2]
    accuracy = _accuracy(teacher, x, ids, y)
    shuffled_ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    assert accuracy > 0.8
    assert _accuracy(teacher, x, shuffled_ids, y) < accuracy - 0.1  # the token ids carry part of the label


def test_distill_with_dict_inputs_caches_the_teacher_and_keeps_token_ids_integer(splits, teacher):
    (x, ids, y), (vx, vids, vy), (tx, tids, ty) = splits
    result = distill(teacher, make_loader(_named(x, ids), y, 32, seed=0, shuffle=True),
                     make_loader(_named(vx, vids), vy, 64, seed=0, shuffle=False), RECIPE,
                     test=make_loader(_named(tx, tids), ty, 64, seed=0, shuffle=False), show_progress=False)
    report = result.report
    assert report["teacher_logits"] == "cached"
    assert report["data"]["train_samples"] == 512 and report["data"]["test_samples"] == 128
    assert report["student"]["accuracy"] == pytest.approx(_accuracy(result.student, tx, tids, ty), abs=1e-9)
    assert report["teacher"]["accuracy"] == pytest.approx(_accuracy(teacher, tx, tids, ty), abs=1e-9)
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.05
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert set(report["student"]["per_layer"]) == {"embed", "proj", "head", "cat"}
    seen, hook = _dtype_probe(result.student)
    evaluate(result.student, make_loader(_named(tx, tids), ty, 64, seed=0, shuffle=False), 3)
    hook.remove()
    assert seen and set(seen) == {torch.int64}


def test_distill_with_tuple_inputs(splits, teacher):
    """Batches ``((features, input_ids), labels)``: the model is called as ``model(features, input_ids)``."""
    (x, ids, y), (vx, vids, vy), _ = splits
    train = [((x[i:i + 32], ids[i:i + 32]), y[i:i + 32]) for i in range(0, 512, 32)]
    val = [((vx, vids), vy)]
    result = distill(teacher, train, val, RECIPE, show_progress=False)
    assert result.report["teacher_logits"] == "live"  # a plain list of batches is not cacheable
    assert result.report["evaluated_on"] == "validation"
    assert result.report["student"]["accuracy"] == pytest.approx(_accuracy(result.student, vx, vids, vy), abs=1e-9)
    assert result.report["student"]["accuracy"] >= result.report["teacher"]["accuracy"] - 0.05
    # make_loader over a tuple of tensors: batches [[features, input_ids], labels], cached
    cached = distill(teacher, make_loader((x, ids), y, 32, seed=0, shuffle=True), val,
                     {**RECIPE, "train": {"epochs": 1}}, show_progress=False)
    assert cached.report["teacher_logits"] == "cached"


def test_distill_with_hugging_face_style_dict_batches(splits, teacher):
    """Dict samples with ``labels`` beside the inputs, collated by a plain DataLoader (teacher runs live)."""
    (x, ids, y), (vx, vids, vy), _ = splits
    samples = [{"features": x[i], "input_ids": ids[i], "labels": y[i]} for i in range(512)]
    train = DataLoader(samples, batch_size=32, shuffle=False)
    val = DataLoader([{"features": vx[i], "input_ids": vids[i], "labels": vy[i]} for i in range(128)], batch_size=64)
    assert sorted(next(iter(train))) == ["features", "input_ids", "labels"]
    result = distill(teacher, train, val, RECIPE, show_progress=False)
    assert result.report["teacher_logits"] == "live"
    assert result.report["student"]["accuracy"] == pytest.approx(_accuracy(result.student, vx, vids, vy), abs=1e-9)


def test_teacher_cache_holds_the_teachers_logits_of_each_batch(splits, teacher):
    x, ids, y = splits[1]
    loader = make_loader(_named(x, ids), y, 48, seed=3, shuffle=True)
    cached = CachedTeacherLoader.wrap(loader, teacher)
    assert cached is not None
    batches = list(cached)
    assert [len(labels) for _, labels, _ in batches] == [48, 48, 32]
    for (inputs, labels), (cached_inputs, cached_labels, logits) in zip(loader, batches, strict=True):
        assert cached_inputs["input_ids"].dtype == torch.int64
        assert torch.equal(cached_inputs["input_ids"], inputs["input_ids"]) and torch.equal(cached_labels, labels)
        with torch.no_grad():
            expected = teacher(inputs["features"], inputs["input_ids"])
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_mix_joins_named_inputs_key_by_key():
    generator = torch.Generator().manual_seed(0)
    labelled = {"features": torch.randn(3, 6, generator=generator), "input_ids": torch.randint(0, 9, (3, 5), generator=generator)}
    unlabeled = {"features": torch.randn(2, 6, generator=generator).double(), "input_ids": torch.randint(0, 9, (2, 5), generator=generator)}
    inputs, labels = mix((labelled, torch.tensor([0, 1, 2])), (unlabeled,))
    assert torch.equal(inputs["input_ids"], torch.cat([labelled["input_ids"], unlabeled["input_ids"]]))
    assert inputs["features"].dtype == torch.float32
    torch.testing.assert_close(inputs["features"], torch.cat([labelled["features"], unlabeled["features"].float()]))
    assert labels.tolist() == [0, 1, 2, -1, -1]
    longer = {**unlabeled, "input_ids": torch.zeros(2, 7, dtype=torch.long)}
    with pytest.raises(DataError, match=r"unlabeled data: samples are .*input_ids \(2, 7\) int64.*\(pad token"):
        mix((labelled, torch.tensor([0, 1, 2])), (longer,))


def test_distill_mixes_unlabeled_dict_inputs(splits, teacher):
    (x, ids, y), (vx, vids, vy), _ = splits
    unlabeled_x, unlabeled_ids, _ = token_feature_data(96, seed=5)
    result = distill(teacher, make_loader(_named(x[:128], ids[:128]), y[:128], 32, seed=0, shuffle=True),
                     make_loader(_named(vx, vids), vy, 64, seed=0, shuffle=False), {**RECIPE, "train": {"epochs": 1}},
                     unlabeled=make_loader(_named(unlabeled_x, unlabeled_ids), None, 32, seed=1, shuffle=True),
                     show_progress=False)
    assert result.report["data"]["unlabeled_samples"] == 96
    assert result.report["teacher_logits"] == "cached"


def test_prepare_keeps_an_optional_argument_the_batches_give():
    """``forward(input_ids, attention_mask=None)`` called with a mask: the quantized student must use the mask."""
    torch.manual_seed(0)
    model = MaskedTokenNet().eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (16, 10), generator=generator)
    mask = torch.ones(16, 10, dtype=torch.long)
    mask[:, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    student = quant.prepare(model, {"weight_bits": 8, "act_bits": 8}, calibration_data=[batch])
    with torch.no_grad():
        masked, unmasked = call_model(model, batch), model(ids)
        quantized = call_model(student.eval(), batch)
    error = (quantized - masked).abs().max()
    assert error < 0.1 * (masked - unmasked).abs().max()
    assert quant.layer_table(student)["head"] == {"weight_bits": 8, "act_bits": 8}


def test_bad_inputs_are_one_line_data_errors(splits, teacher):
    (x, ids, y), _, _ = splits
    ragged = [({"features": x[:4], "input_ids": ids[:3]}, y[:4])]
    with pytest.raises(DataError, match=r"train data: the inputs of one batch have different batch sizes "
                                        r"\(features \(4, 6\), input_ids \(3, 10\) int64\)"):
        distill(teacher, ragged, ragged, RECIPE, show_progress=False)
    listed = [({"features": x[:4], "input_ids": ids[:4].tolist()}, y[:4])]
    with pytest.raises(DataError, match=r"train data: input 'input_ids' is a list; allowed: a tensor"):
        distill(teacher, listed, listed, RECIPE, show_progress=False)
    with pytest.raises(DataError, match=r"data: inputs of features \(4, 6\), input_ids \(4, 10\) float32? do not fit "
                                        r"the teacher|data: inputs of features \(4, 6\), input_ids \(4, 10\) do not fit"):
        floats = [({"features": x[:4], "input_ids": ids[:4].float()}, y[:4])]
        distill(teacher, floats, floats, RECIPE, show_progress=False)
