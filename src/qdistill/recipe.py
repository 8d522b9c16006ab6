"""The Recipe: validated settings for every pipeline stage, YAML in and out.

One section per stage (model, student, data, quant, distill, train, teacher_train, export). A
recipe is validated when it is built: unknown keys, wrong types and out-of-range values raise
``RecipeError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qdistill.errors import RecipeError

ZOOS = ("torchvision", "timm")
MODEL_SOURCES = ("name", "factory", *ZOOS, "hf")
DATA_SOURCES = ("name", "npz", "factory", "image_folder", "text")
HF_KEYS = ("task", "pooling", "num_layers")  # model keys for Hugging Face models only
TEXT_DEFAULTS = {"text_field": "text", "label_field": None, "tokenizer": None, "max_length": 128}  # text data only
DEFAULT_IMAGE_SIZE = 224
IMAGE_FOLDER_DEFAULTS = {"image_size": None, "workers": 2}  # keys for image folders only
UNLABELED_SOURCES = ("npz", "image_folder", "factory", "text")


class _Section(BaseModel):
    """Strict base: unknown keys and silent type coercion (e.g. "4" for 4) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelSpec(_Section):
    """Which network and its weights: a built-in ``name``, a ``module:function`` ``factory``, or an
    architecture from the ``torchvision`` or ``timm`` model zoo (the ``vision`` extra).

    Zoo models are built without pretrained weights (nothing is ever downloaded); weights come only
    from ``checkpoint``, a local safetensors or torch state-dict file.

    ``hf``: a local Hugging Face model folder (the ``nlp`` extra, ``models.hf.load_hf``) with its
    weights; ``task`` (``embedding``: a pooled vector per text, default; ``sequence_classification``:
    class logits from a new linear head), ``pooling`` (``mean`` over the attention mask, default, or
    ``cls``) and ``num_layers`` (a shallower model keeping that many evenly spaced layers).

    Example:
        >>> ModelSpec(hf="minilm").task, ModelSpec(hf="minilm", num_layers=3).pooling
        ('embedding', 'mean')
    """

    name: str | None = None
    factory: str | None = None
    torchvision: str | None = None
    timm: str | None = None
    hf: str | None = None
    task: Literal["embedding", "sequence_classification"] | None = None
    pooling: Literal["mean", "cls"] | None = None
    num_layers: int | None = Field(None, ge=1, le=1000)
    checkpoint: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _hf_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("hf") is not None:
            return {"task": "embedding", "pooling": "mean", **{k: v for k, v in data.items() if v is not None}}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if sum(getattr(self, key) is not None for key in MODEL_SOURCES) != 1:
            raise ValueError("give exactly one of 'name' (a built-in model), 'factory' (module:function), "
                             "'torchvision' or 'timm' (an architecture of that model zoo) or 'hf' (a local "
                             "Hugging Face model folder)")
        if self.hf is None:
            for key in HF_KEYS:
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to Hugging Face models (hf: <folder>) only")
        return self

    @property
    def zoo(self) -> str | None:
        """``"torchvision"`` or ``"timm"`` when the model comes from a zoo, else None.

        Example:
            >>> ModelSpec(timm="resnet18").zoo, ModelSpec(name="mlp").zoo
            ('timm', None)
        """
        return next((zoo for zoo in ZOOS if getattr(self, zoo) is not None), None)


class UnlabeledSpec(_Section):
    """Unlabeled transfer data (``data.unlabeled``): inputs the student learns from the teacher alone (KD loss only).

    Exactly one source: ``npz`` (an array ``x``; any ``y`` is ignored), ``image_folder`` (every image under
    the folder, no classes; goes with ``data.image_folder``) or ``factory`` (``module:function`` returning an
    input tensor). ``limit`` keeps the first samples only.

    Example:
        >>> UnlabeledSpec(npz="extra.npz").limit is None
        True
    """

    npz: str | None = None
    image_folder: str | None = None
    factory: str | None = None
    text: str | None = None
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> UnlabeledSpec:
        if sum(getattr(self, key) is not None for key in UNLABELED_SOURCES) != 1:
            raise ValueError("give exactly one of 'npz' (path), 'image_folder' (path), 'factory' (module:function) "
                             "or 'text' (a .txt/.jsonl/.csv file)")
        return self


class DataSpec(_Section):
    """Which data: a built-in ``name``, an ``npz`` file (arrays x, y), a ``factory``, or an
    ``image_folder`` (one folder per class, as torchvision's ImageFolder), and how it is split.

    ``test_fraction`` of the samples is set aside first (default 0.2; mnist5k keeps its fixed
    1000-image test set), then ``val_fraction`` of the rest validates; the remainder trains. An
    image folder with ``train/`` (and ``val/``, ``test/``) subfolders takes its splits from them;
    a missing ``test/`` or ``val/`` is set aside from ``train/`` by the same rule.

    Image folders only: ``image_size`` (default 224: the shorter side is resized to it, then the
    centre square is cropped), ``augment`` (``standard``: random resized crop and horizontal flip
    of the training images; image tensors such as mnist5k: ``shift`` moves by up to 2 pixels,
    ``standard`` also rotates by up to 10 degrees and zooms by 0.9-1.1, ``data/images.py``), ``workers`` (DataLoader processes that decode the images) and
    ``normalize: imagenet`` (ImageNet's per-channel mean and standard deviation).

    Text (``data/text.py``, the ``nlp`` extra): ``text`` is a ``.txt`` (one text per line, no labels),
    ``.jsonl`` or ``.csv`` file; ``text_field`` names the text's field (default ``text``),
    ``label_field`` the label's (optional: without it the data is unlabeled, for embedding models);
    ``tokenizer`` is a local Hugging Face tokenizer folder (required) and ``max_length`` the tokens per
    text (padded and truncated). Batches are dicts (``input_ids``, ``attention_mask``, ``token_type_ids``);
    ``unlabeled: {text: <file>}`` adds unlabeled text, tokenized the same way.

    Scarce labels: ``label_fraction`` keeps the labels of a stratified fraction of the training split
    (chosen by ``seed``) and treats the rest as unlabeled; ``unlabeled`` adds unlabeled transfer data
    (``UnlabeledSpec``). Unlabeled samples train with the KD loss only (``kd.mixing``): every step
    adds ``round(batch_size * unlabeled_ratio)`` of them to a labelled batch.

    Example:
        >>> DataSpec(image_folder="photos").image_size
        224
        >>> DataSpec(name="mnist5k", label_fraction=0.1).label_fraction
        0.1
    """

    name: Literal["mnist5k", "digits"] | None = None
    npz: str | None = None
    factory: str | None = None
    image_folder: str | None = None
    text: str | None = None
    text_field: str = Field("text", min_length=1)
    label_field: str | None = Field(None, min_length=1)
    tokenizer: str | None = None
    max_length: int = Field(128, ge=2, le=8192)
    batch_size: int = Field(64, ge=1, le=65536)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    normalize: Literal["none", "unit", "standard", "imagenet"] = "unit"
    limit: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=1, le=4096)
    augment: Literal["none", "shift", "standard"] = "none"
    workers: int = Field(2, ge=0, le=64)
    label_fraction: float | None = Field(None, gt=0.0, le=1.0)
    unlabeled: UnlabeledSpec | None = None
    unlabeled_ratio: float = Field(1.0, gt=0.0, le=1000.0)

    @model_validator(mode="before")
    @classmethod
    def _default_image_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("image_folder") is not None and data.get("image_size") is None:
            return {**data, "image_size": DEFAULT_IMAGE_SIZE}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [key for key in DATA_SOURCES if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'name' (mnist5k | digits), 'npz' (path), 'factory' (module:function), "
                             "'image_folder' (path) or 'text' (a .txt/.jsonl/.csv file)")
        if self.name == "mnist5k" and self.test_fraction is not None and self.limit is None:
            raise ValueError("mnist5k has a fixed 1000-image test set; test_fraction applies to digits, npz, factory "
                             "data and to mnist5k with a limit")
        if self.text is None:
            for key, default in TEXT_DEFAULTS.items():
                if getattr(self, key) != default:
                    raise ValueError(f"{key} applies to text data (text: <file>) only")
            if self.unlabeled is not None and self.unlabeled.text is not None:
                raise ValueError("unlabeled.text goes with text data (data.text and data.tokenizer)")
        elif self.tokenizer is None:
            raise ValueError("text data needs tokenizer: a local Hugging Face tokenizer folder (e.g. the model's folder)")
        if self.image_folder is None:
            self._no_image_keys()
        elif self.limit is not None:
            raise ValueError("limit applies to mnist5k, digits and npz data; for an image_folder make a smaller folder")
        if self.image_folder is not None and self.augment == "shift":
            raise ValueError("augment 'shift' applies to image tensors (mnist5k, npz, factory); allowed for "
                             "image_folder: none, standard")
        if self.unlabeled is not None and self.unlabeled.image_folder is not None and self.image_folder is None:
            raise ValueError("unlabeled.image_folder goes with image_folder data (the images are decoded as RGB at "
                             "image_size); for array data give unlabeled.npz or unlabeled.factory")
        return self

    def _no_image_keys(self) -> None:
        if self.augment != "none" and self.text is not None:
            raise ValueError("augment applies to image data (image_folder, or image tensors such as mnist5k) only")
        for key, default in IMAGE_FOLDER_DEFAULTS.items():
            if getattr(self, key) != default:
                raise ValueError(f"{key} applies to image_folder data only")
        if self.normalize == "imagenet":
            raise ValueError("normalize 'imagenet' applies to image_folder data only; allowed here: none, unit, standard")


class LayerOverride(_Section):
    """Bit widths for the layers whose names match a glob in ``quant.overrides``."""

    weight_bits: int | None = Field(None, ge=2, le=8)
    act_bits: int | None = Field(None, ge=2, le=8)


class QuantSpec(_Section):
    """Quantization settings: bit widths, granularity, range initialisation, per-layer overrides.

    ``smoothing`` (SmoothQuant's migration strength ``alpha``; 0, the default, is off): the Linear
    layers that ``smoothing_layers`` names (``auto``: every Linear whose input only Linears read, such as a
    transformer's projections after LayerNorm and GELU; layers that share an input share its factors) divide their input per channel
    by ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` (maxima over the calibration batches) before
    its quantizer, and multiply the weight's input column ``j`` by ``s_j``: the float function is
    unchanged, and activation outliers move into the weights (``quant/smoothing.py``).

    Example:
        >>> QuantSpec(weight_bits=8, act_bits=8, smoothing=0.8).smoothing_layers
        'auto'
    """

    weight_bits: int = Field(4, ge=2, le=8)
    act_bits: int = Field(4, ge=2, le=8)
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    first_last_bits: int | None = Field(8, ge=2, le=8)
    init: Literal["minmax", "mse", "percentile"] = "mse"
    percentile: float = Field(99.99, gt=50.0, le=100.0)
    calibration_batches: int = Field(8, ge=1, le=10000)
    learn_scale: bool = True
    learn_input_scale: bool = False  # learn the step of the model's input data too (costs a first-layer input-gradient pass)
    overrides: dict[str, LayerOverride] = Field(default_factory=dict)
    smoothing: float = Field(0.0, ge=0.0, le=1.0)
    smoothing_layers: list[str] | Literal["auto"] = "auto"


class FeatureHint(_Section):
    """One feature-distillation pair: MSE between a student and a teacher layer's outputs."""

    student: str
    teacher: str
    weight: float = Field(1.0, ge=0.0)


class DistillSpec(_Section):
    """KD loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``.

    ``features``: feature-hint pairs, or ``auto``: the documented pair of the built-in models
    (``models.convnet.hint_layer``: the last convolution block's output of ``mnist_cnn`` and
    ``mnist_cnn_small``, the last hidden layer of ``mlp``, joined by an adapter when widths differ).

    ``student_init``: a student of another architecture (the ``student`` section, without a
    checkpoint) starts from the teacher's weights where shapes allow (``teacher``: each layer keeps
    the teacher's most important channels, ``models.narrow``) or from its own random initialisation
    (``scratch``).

    ``output``: what the model returns, which picks the KD loss, the metrics and the export gate:
    ``logits`` (softmax KD, accuracy), ``embedding`` (``cosine_weight * (1 - cos) + mse_weight * MSE``
    on the pooled vectors, plus ``relation_weight`` times the MSE between the student's and the teacher's
    in-batch cosine-similarity matrices; cosine and retrieval agreement to the teacher) or ``auto`` (from
    ``model.task`` for Hugging Face models, else ``logits``).

    ``hidden_layers``: ``[teacher_layer, student_layer]`` pairs of transformer layer indices (Hugging Face
    encoders): MSE between their hidden states over the non-padding tokens, through a learned linear
    projection when widths differ, weighted by ``hidden_weight``. ``attention_relation_weight`` > 0 adds
    MiniLM's self-attention relation KD (query-query, key-key and value-value relations of the last layers).

    Example:
        >>> DistillSpec(hidden_layers=[[5, 2]], output="embedding").hidden_layers
        [[5, 2]]
    """

    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    features: list[FeatureHint] | Literal["auto"] = Field(default_factory=list)
    student_init: Literal["teacher", "scratch"] = "teacher"
    output: Literal["auto", "logits", "embedding"] = "auto"
    cosine_weight: float = Field(1.0, ge=0.0)
    mse_weight: float = Field(0.0, ge=0.0)
    relation_weight: float = Field(0.0, ge=0.0)
    hidden_layers: list[list[int]] = Field(default_factory=list)
    hidden_weight: float = Field(1.0, ge=0.0)
    attention_relation_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _embedding_weights(self) -> DistillSpec:
        if self.cosine_weight + self.mse_weight == 0:
            raise ValueError("cosine_weight and mse_weight must not both be 0 (the embedding KD loss needs one)")
        for pair in self.hidden_layers:
            if len(pair) != 2 or min(pair) < 0:
                raise ValueError(f"hidden_layers entry {pair} must be [teacher_layer, student_layer], two indices >= 0")
        return self


class TrainSpec(_Section):
    """Optimiser, learning-rate schedule, stopping and checkpoint settings of one training run."""

    epochs: int = Field(5, ge=1, le=100000)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(5.0e-4, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "cosine", "step", "exponential", "linear"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(1, ge=1)
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    tensorboard: bool = False  # write TensorBoard scalars under DIR/tb/ (needs qdistill[tensorboard])
    compile: bool = False  # train through torch.compile (inductor; on the CPU it needs a C++ compiler)
    # the model's dropout while it trains (train/dropout.py): "auto" is off for a student that distils an embedding
    # model (its only target is the teacher's output on the same input) and on otherwise
    dropout: Literal["auto", "on", "off"] = "auto"
    # after training, re-estimate BatchNorm running statistics over this many training batches with the final
    # weights (train/batchnorm.py; for teacher_train: students' BatchNorms are folded into their layers)
    bn_recalibration_batches: int = Field(0, ge=0, le=100000)

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainSpec:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self


class ExportSpec(_Section):
    """Which deployment files ``run`` writes after training."""

    onnx: bool = True
    packed: bool = True


class SearchBudget(_Section):
    """``search.budget``: what the mixed-precision student must fit (every key given applies).

    ``size_bytes``: theoretical size (weights at their widths plus scales, report.json
    ``student.size_bytes``); ``latency_us``: ONNX Runtime latency per sample (batch 1, one thread),
    measured on each trained candidate; ``target_accuracy``: validation accuracy to reach with the
    smallest student.
    """

    size_bytes: int | None = Field(None, ge=1)
    latency_us: float | None = Field(None, gt=0.0)
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _something(self) -> SearchBudget:
        if self.size_bytes is None and self.latency_us is None and self.target_accuracy is None:
            raise ValueError("give at least one of size_bytes, latency_us, target_accuracy")
        return self


def _widths(values: list[int], key: str) -> None:
    if not values or not all(2 <= bits <= 8 for bits in values) or len(set(values)) != len(values):
        raise ValueError(f"{key} {values} must list distinct widths, each from 2 to 8 (the widths export keeps integer)")


class SearchSpec(_Section):
    """``qdistill search``: ``uniform`` tries bit widths in ``candidates`` (a binary search, smallest
    first) until the accuracy target is met; ``mixed`` measures each layer's sensitivity and allocates
    per-layer widths from ``weight_bits`` and ``act_bits`` under ``budget``, training ``points``
    allocations. ``mode`` defaults to ``mixed`` when a budget is given, else ``uniform``.

    The target is ``target_accuracy`` (or ``budget.target_accuracy``) when given, else the teacher's
    accuracy minus ``max_accuracy_drop`` percentage points (when no size or latency budget is given).

    Example:
        >>> SearchSpec(budget={"size_bytes": 100000}).mode, SearchSpec().mode
        ('mixed', 'uniform')
    """

    mode: Literal["uniform", "mixed"] = "uniform"
    candidates: list[list[int]] = Field(default_factory=lambda: [[2, 2], [3, 3], [4, 4], [4, 8], [8, 8]],
                                        min_length=1)
    max_accuracy_drop: float = Field(0.5, ge=0.0, le=100.0)
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    budget: SearchBudget | None = None
    weight_bits: list[int] = Field(default_factory=lambda: [2, 4, 8])
    act_bits: list[int] = Field(default_factory=lambda: [4, 8])
    points: int = Field(3, ge=1, le=20)
    sensitivity_batches: int = Field(4, ge=1, le=1000)
    latency: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") is None:
            return {**data, "mode": "mixed" if data.get("budget") is not None else "uniform"}
        return data

    @model_validator(mode="after")
    def _bits_in_range(self) -> SearchSpec:
        for candidate in self.candidates:
            if len(candidate) != 2 or not all(2 <= bits <= 8 for bits in candidate):
                raise ValueError(f"candidate {candidate} must be [weight_bits, act_bits], each from 2 to 8")
        _widths(self.weight_bits, "weight_bits")
        _widths(self.act_bits, "act_bits")
        if self.budget is not None and self.mode == "uniform":
            raise ValueError("budget applies to mode mixed (per-layer widths); uniform searches use target_accuracy")
        if self.budget is not None and self.budget.target_accuracy is not None and self.target_accuracy is not None:
            raise ValueError("give the accuracy target once: budget.target_accuracy or target_accuracy")
        if self.budget is not None and self.budget.latency_us is not None and not self.latency:
            raise ValueError("budget.latency_us needs latency: true (each candidate's latency is measured)")
        return self


def _default_teacher_train() -> TrainSpec:
    return TrainSpec(epochs=10, lr=1.0e-3, schedule="constant")


class Recipe(_Section):
    """All settings of one qdistill job, validated when built.

    Example:
        >>> recipe = Recipe(quant={"weight_bits": 4, "act_bits": 4})
        >>> recipe = Recipe.from_yaml("recipes/mnist_w4a4.yaml")
        >>> recipe.with_overrides(["train.epochs=2"]).train.epochs
        2
    """

    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="mnist_cnn"))
    student: ModelSpec | None = None
    data: DataSpec = Field(default_factory=lambda: DataSpec(name="mnist5k"))
    quant: QuantSpec = Field(default_factory=QuantSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    teacher_train: TrainSpec = Field(default_factory=_default_teacher_train)
    export: ExportSpec = Field(default_factory=ExportSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise RecipeError(_describe(error)) from None

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Build from a plain mapping (e.g. parsed YAML); a non-mapping is a ``RecipeError``."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe: expected a mapping of sections, got {type(data).__name__}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and validate a YAML recipe file."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; give the path of a YAML recipe")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            reason = str(error).splitlines()[0]
            raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {reason}") from None
        if data is None:
            raise RecipeError(f"recipe file {str(path)!r} is empty; a recipe is a YAML mapping of sections "
                              f"({', '.join(cls.model_fields)})")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (every default filled in)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text that ``from_yaml`` reads back to an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, assignments: list[str]) -> Recipe:
        """A copy with ``section.key=value`` assignments applied (values parsed as YAML)."""
        data = self.to_dict()
        for assignment in assignments:
            key, separator, raw_value = assignment.partition("=")
            if not separator or not key:
                raise RecipeError(f"override {assignment!r}: expected key.sub=value, e.g. train.epochs=3")
            _set_path(data, key.split("."), yaml.safe_load(raw_value), assignment)
        return Recipe.from_dict(data)


def _set_path(data: dict, keys: list[str], value: Any, assignment: str) -> None:
    node = data
    for depth, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            where = ".".join(keys[: depth + 1])
            raise RecipeError(f"override {assignment!r}: {where} is not a section")
    node[keys[-1]] = value



def _describe(error: ValidationError) -> str:
    """One line naming the field, the value and what is allowed, from pydantic's first error."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "recipe"
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        section = ".".join(str(part) for part in first["loc"][:-1])
        allowed = _allowed_keys(section)
        return f"recipe: unknown key {where!r}; allowed keys{' in ' + section if section else ''}: {allowed}"
    message = first["msg"]
    message = message.removeprefix("Value error, ")
    return f"recipe field {where}: {value!r} is not allowed ({message})"


def _allowed_keys(section: str) -> str:
    model: type[BaseModel] = Recipe
    for part in section.split(".") if section else []:
        field = model.model_fields.get(part)
        inner = _model_of(field.annotation) if field else None
        if inner is None:
            return "(see the design's recipe format)"
        model = inner
    return ", ".join(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_of(argument)
        if found is not None:
            return found
    return None
