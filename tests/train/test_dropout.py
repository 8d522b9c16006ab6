"""``train.dropout``: "off" trains exactly as the same model without its dropout layers would."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdistill.data import make_loader
from qdistill.recipe import TrainSpec
from qdistill.train import Supervised, fit
from qdistill.train.dropout import dropout_off


class FloatDropoutAttention(nn.Module):
    """Keeps its probability as a float attribute, as Hugging Face and ``nn.MultiheadAttention`` do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.dropout = nn.Linear(6, 3), 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.linear(x), p=self.dropout, training=self.training)


def _train(model: nn.Module, dropout: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    loader = make_loader(x, y, 16, seed=0, shuffle=True)
    fit(Supervised(model), loader, TrainSpec(epochs=2, lr=1e-2, dropout=dropout), show_progress=False)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("layer", ["module", "float_attribute"])
def test_dropout_off_trains_like_the_model_without_dropout(layer):
    torch.manual_seed(0)
    if layer == "module":
        with_dropout = nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.5))
        reference = nn.Sequential(copy.deepcopy(with_dropout[0]))  # the independent reference: no dropout at all
        keys = {"0.weight", "0.bias"}
    else:
        with_dropout = FloatDropoutAttention()
        reference = copy.deepcopy(with_dropout)
        reference.dropout = 0.0
        keys = {"linear.weight", "linear.bias"}
    on = _train(copy.deepcopy(with_dropout), "on")
    off = _train(with_dropout, "off")
    expected = _train(reference, "on")
    for key in keys:
        assert torch.equal(off[key], expected[key])
    assert any(not torch.equal(on[key], expected[key]) for key in keys)  # dropout "on" did train differently
    assert (with_dropout[1].p if layer == "module" else with_dropout.dropout) == 0.5  # restored after training


def test_dropout_off_restores_after_an_error():
    model = nn.Sequential(nn.Dropout(0.2), nn.MultiheadAttention(4, 2, dropout=0.3))
    with pytest.raises(RuntimeError), dropout_off(model) as count:
        assert (model[0].p, model[1].dropout, count) == (0.0, 0.0, 2)
        raise RuntimeError("stop")
    assert (model[0].p, model[1].dropout) == (0.2, 0.3)
