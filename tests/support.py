"""Models and factories that exist only for the tests (importable as ``support`` through pytest's pythonpath)."""

from __future__ import annotations

import torch
from torch import nn

from qdistill.models import convnet
from qdistill.models.tiny import BasicBlock


class UntraceableNet(nn.Module):
    """A small conv net torch.fx cannot trace (a data-dependent branch): prepare's fallback path.

    Example:
        >>> prepare(UntraceableNet(), {"weight_bits": 8}).qdistill_unquantized["<graph>"]   # the reason
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = BasicBlock(4, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, x):  # (B, 1, H, W) -> (B, 10)
        x = self.block(self.stem(x))
        if x.mean() > 10:  # data-dependent Python: torch.fx cannot trace the model
            x = x * 0
        return self.head(x.mean(dim=(2, 3)))


class _Wrapped(nn.Module):
    """The built-in MNIST CNN whose output is post-processed by ``wrap``."""

    def __init__(self, wrap, **kwargs) -> None:
        super().__init__()
        self.net = convnet.mnist_cnn(**kwargs)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.net(x))


def tuple_output_model(**kwargs) -> nn.Module:
    """Returns ``(logits, features)``, as many torchvision/HF models do."""
    return _Wrapped(lambda logits: (logits, logits.detach()), **kwargs)


def dict_output_model(**kwargs) -> nn.Module:
    """Returns ``{"logits": ...}``."""
    return _Wrapped(lambda logits: {"logits": logits}, **kwargs)


def softmax_output_model(**kwargs) -> nn.Module:
    """Returns probabilities instead of logits."""
    return _Wrapped(lambda logits: torch.softmax(logits, dim=1), **kwargs)


def unlabeled_digits() -> torch.Tensor:
    """``data.unlabeled.factory`` for digits-shaped inputs: 12 constant images (used as returned)."""
    return torch.full((12, 1, 8, 8), 0.5)


def unlabeled_wrong_shape() -> torch.Tensor:
    """``data.unlabeled.factory`` whose samples do not match digits' (1, 8, 8)."""
    return torch.zeros(3, 1, 4, 4)


class TokenFeatureNet(nn.Module):
    """Two inputs: float features ``(B, F)`` and int64 token ids ``(B, S)`` (through ``nn.Embedding``).

    Called as ``model(features, input_ids)`` or ``model(**{"features": ..., "input_ids": ...})``;
    the token embeddings are mean-pooled over the sequence, so any sequence length fits.
    """

    def __init__(self, vocab: int = 12, features: int = 6, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(features, width)
        self.act = nn.ReLU()
        self.head = nn.Linear(2 * width, classes)

    def forward(self, features, input_ids):
        pooled = self.embed(input_ids).mean(dim=1)
        return self.head(torch.cat([self.act(self.proj(features)), pooled], dim=1))


def token_feature_data(samples: int, seed: int = 0, features: int = 6, vocab: int = 12,
                       length: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, input_ids, labels)``: the class is the argmax of the first three features plus how often
    each class's tokens (``id % 3``) occur, so a model must read both inputs to learn it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    ids = torch.randint(0, vocab, (samples, length), generator=generator)
    counts = torch.stack([(ids % 3 == k).float().mean(dim=1) for k in range(3)], dim=1)
    labels = (x[:, :3] + 8 * (counts - 1 / 3)).argmax(dim=1)
    return x, ids, labels


def token_feature_net(**kwargs) -> nn.Module:
    """``model.factory`` for ``TokenFeatureNet`` (keyword arguments as its constructor's)."""
    return TokenFeatureNet(**kwargs)


class MaskedTokenNet(nn.Module):
    """Token ids with an optional attention mask (as Hugging Face encoders take them): masked mean pooling.

    Its forward has ``attention_mask=None``, so ``prepare`` must keep the mask an input when batches give it.
    """

    def __init__(self, vocab: int = 12, width: int = 16, classes: int = 3, length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(length, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.embed(input_ids) + self.position(positions)
        if attention_mask is None:
            return self.head(hidden.mean(dim=1))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))


def calibrated(quantizer, scale: float, zero: int):
    """``quantizer`` with its step, zero point and initialised flag set by hand (a calibrated grid)."""
    with torch.no_grad():
        quantizer.scale.fill_(scale)
        quantizer.zero_point.fill_(zero)
        quantizer.initialized.fill_(True)
    return quantizer
