"""A narrower student starts from its teacher: each layer keeps the teacher's largest-L1 channels, its inputs follow
the previous layer's choice (through the flatten), and a teacher whose other channels are zero is reproduced exactly."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qdistill.models.convnet import MLP, ConvNet
from qdistill.models.narrow import init_from_teacher, is_chain
from qdistill.models.tiny import tiny_resnet


def _top(weight: torch.Tensor, count: int) -> np.ndarray:
    """The reference: indices of the ``count`` largest L1 norms, ascending (numpy, not the code under test)."""
    norms = np.abs(weight.detach().numpy().reshape(len(weight), -1)).sum(1)
    return np.sort(np.argsort(-norms, kind="stable")[:count])


def test_narrow_convnet_keeps_the_largest_channels_and_follows_them_through_the_flatten():
    torch.manual_seed(0)
    teacher, student = ConvNet(width=8, hidden=16), ConvNet(width=4, hidden=6)
    done = init_from_teacher(student, teacher)
    assert done == {"layers": {"features.0": "narrowed", "features.3": "narrowed", "classifier.2": "narrowed",
                               "classifier.5": "narrowed"}, "random": []}
    first = _top(teacher.features[0].weight, 4)
    assert torch.equal(student.features[0].weight, teacher.features[0].weight[first])
    assert torch.equal(student.features[0].bias, teacher.features[0].bias[first])
    second = _top(teacher.features[3].weight[:, first], 8)
    assert torch.equal(student.features[3].weight, teacher.features[3].weight[second][:, first])
    # the flatten of (16 channels, 7, 7): channel c owns inputs 49c ... 49c + 48
    inputs = np.concatenate([np.arange(49 * c, 49 * c + 49) for c in second])
    hidden = _top(teacher.classifier[2].weight[:, inputs], 6)
    assert torch.equal(student.classifier[2].weight, teacher.classifier[2].weight[hidden][:, inputs])
    assert torch.equal(student.classifier[5].weight, teacher.classifier[5].weight[:, hidden])


def test_a_teacher_whose_other_channels_are_zero_is_reproduced_exactly():
    torch.manual_seed(1)
    teacher, student = ConvNet(width=8, hidden=16, dropout=0.0), ConvNet(width=4, hidden=6, dropout=0.0)
    with torch.no_grad():  # silence half the channels of every hidden layer: the narrow student can hold the rest
        teacher.features[0].weight[4:] = 0
        teacher.features[0].bias[4:] = 0
        teacher.features[3].weight[8:] = 0
        teacher.features[3].bias[8:] = 0
        teacher.classifier[2].weight[6:] = 0
        teacher.classifier[2].bias[6:] = 0
    init_from_teacher(student, teacher)
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-5)


def test_mlp_with_narrower_hidden_layers():
    torch.manual_seed(2)
    teacher, student = MLP(64, 10, hidden=(32, 16), dropout=0.0), MLP(64, 10, hidden=(8, 4), dropout=0.0)
    with torch.no_grad():
        teacher.net[1].weight[8:] = 0
        teacher.net[1].bias[8:] = 0
        teacher.net[4].weight[4:] = 0
        teacher.net[4].bias[4:] = 0
    assert set(init_from_teacher(student, teacher)["layers"].values()) == {"narrowed"}
    x = torch.rand(3, 64)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-5)


def test_same_shapes_are_copied():
    torch.manual_seed(3)
    teacher, student = ConvNet(width=4, hidden=8), ConvNet(width=4, hidden=8)
    assert set(init_from_teacher(student, teacher)["layers"].values()) == {"copied"}
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values(), strict=True))


def test_models_with_branches_copy_only_same_shape_layers():
    teacher = tiny_resnet(in_channels=1, num_classes=10, image_size=8, width=8)
    student = tiny_resnet(in_channels=1, num_classes=10, image_size=8, width=4)
    assert not is_chain(teacher)
    done = init_from_teacher(student, teacher)
    assert done["random"] and all(kind == "copied" for kind in done["layers"].values())


def test_layers_without_a_teacher_counterpart_stay_random():
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    student = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    done = init_from_teacher(student, teacher)
    # "2" has more outputs (3) than the teacher's "2" (2), and the teacher has no "4"
    assert done["layers"] == {"0": "narrowed"} and done["random"] == ["2", "4"]
