"""``nn.MultiheadAttention`` rewritten with plain ``nn.Linear`` projections, so they can be quantized.

``nn.MultiheadAttention`` hands its packed ``in_proj_weight`` straight to a fused kernel, so no
layer swap can reach it. ``DecomposedMultiheadAttention`` computes the same function (checked
to 1e-6 in the tests) with four ``nn.Linear`` layers (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``) and a float softmax; ``prepare`` then quantizes those four like any other Linear.

Example:
    >>> mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    >>> decomposed = DecomposedMultiheadAttention.from_mha(mha).eval()
    >>> x = torch.randn(2, 8, 32)
    >>> torch.allclose(decomposed(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import ModelError


def _split_in_projection(mha: nn.MultiheadAttention) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(weight, bias)]`` of the query, key and value projections of ``mha``."""
    embed = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = list(mha.in_proj_weight.detach().split(embed, dim=0))
    else:
        weights = [mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()]
    biases = list(mha.in_proj_bias.detach().split(embed)) if mha.in_proj_bias is not None else [None] * 3
    return list(zip(weights, biases, strict=True))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may not attend) as ``-inf``/0, or a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class DecomposedMultiheadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out ``nn.Linear`` layers; same call as ``nn.MultiheadAttention``.

    Example:
        >>> attention = DecomposedMultiheadAttention(32, 4, batch_first=True)
        >>> x = torch.randn(2, 5, 32)                # (B, L, E)
        >>> out, weights = attention(x, x, x)
        >>> out.shape, weights.shape                 # weights averaged over heads
        (torch.Size([2, 5, 32]), torch.Size([2, 5, 5]))
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ModelError(f"embed_dim: {embed_dim} is not allowed with num_heads={num_heads}; it must be a multiple of it")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # read by nn.TransformerEncoder(Layer)'s fast-path checks: with no packed in-projection
        # they keep the layer on the path that calls this module (the fused kernel would not)
        self._qkv_same_embed_dim = False
        self.in_proj_weight = self.in_proj_bias = None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> DecomposedMultiheadAttention:
        """The same attention as ``mha`` (its weights copied), on ``mha``'s device and dtype."""
        decomposed = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                         mha.kdim, mha.vdim, mha.batch_first)
        decomposed.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        with torch.no_grad():
            for layer, (weight, bias) in zip((decomposed.q_proj, decomposed.k_proj, decomposed.v_proj),
                                             _split_in_projection(mha), strict=True):
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            decomposed.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                decomposed.out_proj.bias.copy_(mha.out_proj.bias)
        return decomposed.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, H, L, D)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _mask(self, attn_mask, key_padding_mask, is_causal, shape, dtype, device) -> torch.Tensor | None:
        batch, _, target, source = shape
        bias = None
        if attn_mask is not None:
            bias = _additive(attn_mask, dtype)
            bias = bias.reshape(batch, self.num_heads, target, source) if bias.dim() == 3 else bias
        elif is_causal:
            causal = torch.ones(target, source, dtype=torch.bool, device=device).triu(1)
            bias = _additive(causal, dtype)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, source)
            bias = padding if bias is None else bias + padding
        return bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query))  # (B, H, L, D)
        k = self._heads(self.k_proj(key))  # (B, H, S, D)
        v = self._heads(self.v_proj(value))  # (B, H, S, D)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, L, S)
        bias = self._mask(attn_mask, key_padding_mask, is_causal, scores.shape, scores.dtype, scores.device)
        if bias is not None:
            scores = scores + bias
        weights = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)  # stays float
        output = self.out_proj((weights @ v).transpose(1, 2).flatten(2))  # (B, L, E)
        if unbatched:
            output, weights = output.squeeze(0), weights.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        return output, weights.mean(dim=-3) if average_attn_weights else weights


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be decomposed (None when it can).

    Example:
        >>> unsupported_reason(nn.MultiheadAttention(8, 2, add_bias_kv=True))
        'nn.MultiheadAttention with add_bias_kv or add_zero_attn stays float (not decomposed)'
    """
    if mha.bias_k is not None or mha.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn stays float (not decomposed)"
    return None


def decompose_attention(model: nn.Module) -> dict[str, str]:
    """Replace each ``nn.MultiheadAttention`` of ``model`` in place; returns ``{name: reason}`` for those kept.

    Example:
        >>> model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "biased": nn.MultiheadAttention(8, 2, add_bias_kv=True)})
        >>> decompose_attention(model)
        {'biased': 'nn.MultiheadAttention with add_bias_kv or add_zero_attn stays float (not decomposed)'}
        >>> type(model["attn"]).__name__
        'DecomposedMultiheadAttention'
    """
    kept: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            kept[name] = reason
            continue
        if not name:
            kept["<model>"] = "the model itself is an nn.MultiheadAttention, which cannot be replaced in place; it stays float"
            continue
        model.set_submodule(name, DecomposedMultiheadAttention.from_mha(module))
    return kept


def unfuse_attention(model: nn.Module) -> list[str]:
    """Switch timm-style attention modules (a ``fused_attn`` flag) to their explicit ``q @ k^T``, softmax, ``@ v`` path.

    The fused path calls ``F.scaled_dot_product_attention``, one opaque float op; the explicit path
    computes the same function with two matmuls that ``prepare`` then quantizes. Returns the names switched.

    Example:
        >>> class Attention(nn.Module):
        ...     fused_attn = True
        >>> model = nn.Sequential(Attention())
        >>> unfuse_attention(model), model[0].fused_attn
        (['0'], False)
    """
    names = []
    for name, module in model.named_modules():
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
            names.append(name)
    return names


class AttentionScores(nn.Module):
    """``query @ key^T * scale``: its own module so that ``prepare`` traces it and quantizes the matmul.

    Example:
        >>> AttentionScores(0.5)(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 5, 4)).shape
        torch.Size([1, 2, 3, 5])
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return torch.matmul(query, key.transpose(-2, -1)) * self.scale


class WeightedValues(nn.Module):
    """``weights @ value``: its own module so that ``prepare`` traces it and quantizes the matmul.

    Example:
        >>> WeightedValues()(torch.ones(1, 2, 3, 5), torch.ones(1, 2, 5, 4)).shape
        torch.Size([1, 2, 3, 4])
    """

    def forward(self, weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.matmul(weights, value)


SOFTMAX_NOTE = ("Q.K^T and attention.V are quantized matmuls; the additive attention mask and the softmax stay float "
                "(the mask holds the dtype's minimum, which no 8-bit grid represents; ONNX Runtime has no integer softmax)")


class ExplicitSelfAttention(nn.Module):
    """A Hugging Face encoder self-attention (BERT family, eager) with its two matmuls in child modules.

    Transformers' ``BertSelfAttention.forward`` takes ``**kwargs`` and calls the attention through a
    function table, so torch.fx cannot trace it and its ``Q.K^T`` and ``attention.V`` stay float. This
    module keeps the same ``query``/``key``/``value`` layers and call (``hidden_states, attention_mask,
    **kwargs`` -> ``(output, weights)``); the mask addition and the softmax stay float (the mask holds
    the dtype's minimum, which no 8-bit grid represents), the two matmuls become ``QuantMatMul``.
    """

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear, head_size: int, scale: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.query, self.key, self.value = query, key, value
        self.head_size, self.dropout = head_size, dropout
        self.scores = AttentionScores(scale)
        self.weighted = WeightedValues()

    @classmethod
    def from_hf(cls, module: nn.Module) -> ExplicitSelfAttention:
        """The same attention as a transformers ``BertSelfAttention``-style ``module`` (its layers reused)."""
        return cls(module.query, module.key, module.value, module.attention_head_size, module.scaling,
                   module.dropout.p).train(module.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, H, L, D)
        return x.unflatten(-1, (-1, self.head_size)).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        query = self._heads(self.query(hidden_states))
        key = self._heads(self.key(hidden_states))
        value = self._heads(self.value(hidden_states))
        scores = self.scores(query, key)
        if attention_mask is not None:
            scores = scores + attention_mask  # additive mask, float
        weights = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        output = self.weighted(weights, value).transpose(1, 2).flatten(2)
        return output, weights


def share_projection_inputs(model: nn.Module, make_quantizer) -> int:
    """Query, key and value of each ``ExplicitSelfAttention`` read one tensor: give them one input quantizer.

    torch.fx cannot trace the module (its forward takes ``**kwargs``), so ``sharing.share_quantizers`` never
    sees that the three read the same ``hidden_states``. Shared, the export quantizes that tensor once
    (one ``QuantizeLinear`` per layer instead of three). ``make_quantizer(bits)`` makes the shared one, at the
    widest of the three widths; returns how many attentions were changed.

    Example:
        >>> from qdistill.quant.modules import ActivationQuantizer, QuantLinear
        >>> from qdistill.quant.quantizer import Quantizer
        >>> layers = [QuantLinear.from_float(nn.Linear(8, 8), Quantizer(8, signed=True, channels=8), ActivationQuantizer(8)) for _ in range(3)]
        >>> attention = ExplicitSelfAttention(*layers, head_size=4, scale=0.5)
        >>> share_projection_inputs(attention, ActivationQuantizer), attention.query.input_quantizer is attention.value.input_quantizer
        (1, True)
    """
    changed = 0
    for module in model.modules():
        if not isinstance(module, ExplicitSelfAttention):
            continue
        layers = (module.query, module.key, module.value)
        quantizers = [getattr(layer, "input_quantizer", None) for layer in layers]
        if any(quantizer is None for quantizer in quantizers) or len({id(q) for q in quantizers}) == 1:
            continue
        shared = make_quantizer(max(quantizer.bits for quantizer in quantizers))
        for layer in layers:
            layer.input_quantizer = shared
        changed += 1
    return changed


def hf_attention_reason(module: nn.Module) -> str | None:
    """Why a transformers self-attention ``module`` cannot become ``ExplicitSelfAttention``; None when it can.

    Example:
        >>> hf_attention_reason(nn.Linear(2, 2)) is None
        False
    """
    needed = ("query", "key", "value", "attention_head_size", "scaling", "dropout", "config")
    if not all(hasattr(module, name) for name in needed) or not type(module).__name__.endswith("SelfAttention"):
        return "not a transformers encoder self-attention"
    if getattr(module, "is_decoder", False) or getattr(module, "is_causal", False):
        return "a decoder (causal, cached) self-attention stays as it is; its matmuls stay float"
    if getattr(module.config, "_attn_implementation", "eager") != "eager":
        return ("its attention runs as one fused kernel (attn_implementation="
                f"{module.config._attn_implementation!r}); load with attn_implementation='eager' to quantize its matmuls")
    return None


def explicit_hf_attention(model: nn.Module) -> dict[str, str]:
    """Replace transformers encoder self-attentions (``*SelfAttention`` with query/key/value) in place.

    Returns ``{name: what stays float}``: the self-attentions kept as they are (all of them float) and,
    for those replaced, the mask addition and softmax.

    Example:
        >>> explicit_hf_attention(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    kept: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not type(module).__module__.startswith("transformers.") or not type(module).__name__.endswith("SelfAttention"):
            continue
        reason = hf_attention_reason(module)
        if reason is not None:
            kept[name or "<model>"] = reason
        elif name:
            model.set_submodule(name, ExplicitSelfAttention.from_hf(module))
            kept[name] = SOFTMAX_NOTE
    return kept


RESIDUAL_NOTE = ("transformer residual stream: the residual addition and the LayerNorm after it (and their inputs) stay "
                 "float; the stream has outlier channels that one per-tensor 8-bit grid cannot hold (mean cosine to the "
                 "float model 0.90 with quantized LayerNorm inputs), as ONNX Runtime quantize_dynamic and Optimum also "
                 "leave them float; the Linear layers after them quantize their own inputs")


def residual_stream_modules(model: nn.Module) -> list[str]:
    """Names of the transformers modules that add into a transformer's residual stream and normalise it.

    These are the modules of a Hugging Face encoder with a ``LayerNorm`` child (BERT's ``BertSelfOutput``,
    ``BertOutput``, ``BertEmbeddings``): each adds its branch (or the embeddings) into the stream and
    applies the LayerNorm. Only models whose attention ``explicit_hf_attention`` replaced are considered.

    Example:
        >>> residual_stream_modules(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
        []
    """
    if not any(isinstance(module, ExplicitSelfAttention) for module in model.modules()):
        return []
    return [name for name, module in model.named_modules()
            if name and type(module).__module__.startswith("transformers.")
            and any(isinstance(child, nn.LayerNorm) for child in module.children())]


GELU_NOTE = ("GELU of a transformer's feed-forward block stays float: ONNX Runtime runs a quantized GELU as a table "
             "lookup (Cast + Gather on int64 codes), measured about 6x slower than its float Gelu kernel on MiniLM at "
             "batch 32 x 128 tokens; the Linear before it writes float, the Linear after it quantizes its own input")


def is_transformers_activation(module: nn.Module) -> bool:
    """A Hugging Face transformers activation module (``transformers.activations.GELUActivation``, ...).

    Example:
        >>> is_transformers_activation(nn.GELU())
        False
    """
    return type(module).__module__.startswith("transformers.")
