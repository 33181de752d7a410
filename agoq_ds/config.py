"""The ``"agoq"`` block of ``ds_config.json``.

Modelled like DeepSpeed's own sub-configs (its ``DeepSpeedConfigModel``: ``extra="forbid"``, ``"auto"``
means "use the default", one docstring per field), on a base of its own so that the config imports
without DeepSpeed. ``parse_agoq_config`` turns pydantic's errors
into messages that name the key path, the bad value and what is allowed, and suggests the nearest
key for a misspelt one.
"""

from __future__ import annotations

import difflib
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .constants import CONFIG_KEY
from .layer_classes import (
    ATTENTION_CLASSES,
    ATTENTION_MIN_BITS,
    DEFAULT_CLASS_BITS,
    LayerClass,
    resolve_class_bits,
)
from .quant.format import GROUP_SIZES

GroupSize = Literal[32, 64, 128, 256, 512, 1024, 2048, 4096]
ActivationBits = Literal[2, 4, 8, 16]
Rounding = Literal["nearest", "stochastic"]
assert GroupSize.__args__ == GROUP_SIZES  # type: ignore[attr-defined]


class AgoqConfigError(ValueError):
    """An invalid ``"agoq"`` block; the message names every bad key path and what is allowed."""


_BOUNDS = ("Ge", "Gt", "Le", "Lt")


def _numeric_rule(field: Any) -> str | None:
    """``"an integer >= 0"``, ``"a number from 2 to 16 or null"``, ...: what an ``int``/``float``
    field accepts (``None`` for any other field)."""
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
    if len(args) != 1 or args[0] not in (int, float):
        return None
    kind = "an integer" if args[0] is int else "a number"
    bounds = {
        type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata if type(m).__name__ in _BOUNDS
    }
    low = f">= {bounds['Ge']}" if "Ge" in bounds else f"> {bounds['Gt']}" if "Gt" in bounds else None
    high = f"<= {bounds['Le']}" if "Le" in bounds else f"< {bounds['Lt']}" if "Lt" in bounds else None
    if "Ge" in bounds and "Le" in bounds:
        rule = f"{kind} from {bounds['Ge']} to {bounds['Le']}"
    else:
        rule = " and ".join(filter(None, [f"{kind} {low}" if low else kind, high]))
    return rule + (" or null" if type(None) in typing.get_args(field.annotation) else "")


class _Model(BaseModel):
    """The base of every config model: what agoq used from DeepSpeed's ``DeepSpeedConfigModel``.

    ``"auto"`` (HF/accelerate style) means "use the default": such keys are dropped before
    validation, at every level (pydantic calls an overridden ``__init__`` for nested models too),
    unless ``strict=True``; like DeepSpeed's base, a key named ``replace_method`` keeps its
    ``"auto"``. DeepSpeed's deprecated-field handling is left out: no agoq field is deprecated.
    """

    def __init__(self, strict: bool = False, **data: Any) -> None:
        if not strict:
            data = {k: v for k, v in data.items() if v != "auto" or k == "replace_method"}
        super().__init__(**data)

    model_config = ConfigDict(
        validate_default=True,
        validate_assignment=True,
        use_enum_values=True,
        populate_by_name=True,
        extra="forbid",
        arbitrary_types_allowed=True,
        protected_namespaces=(),
        use_attribute_docstrings=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true/false as 1/0 for int and float fields; in a JSON config a
        # boolean where a number belongs is a mistake (e.g. a rule's "stage": true), never a number.
        if isinstance(value, bool) and info.field_name is not None:
            rule = _numeric_rule(cls.model_fields[info.field_name])
            if rule is not None:
                raise ValueError(f"must be {rule}, not a boolean")
        return value


class ActivationRule(_Model):
    """One override of the activation bit table; later rules win over earlier ones."""

    layer_class: LayerClass | None = Field(None, alias="class")
    """Layer class this rule applies to (``null``: any class)."""
    module: str | None = None
    """``fnmatch`` pattern over module names (e.g. ``"model.layers.0.*"``; ``null``: any module)."""
    stage: int | None = Field(None, ge=0)
    """Pipeline stage this rule applies to (``null``: every stage)."""
    bits: ActivationBits
    """Bits for matching tensors; 16 keeps them unquantized."""

    @model_validator(mode="after")
    def _needs_a_selector(self) -> ActivationRule:
        if self.layer_class is None and self.module is None and self.stage is None:
            raise ValueError("a rule needs at least one of 'class', 'module', 'stage'")
        return self


class PipelinePolicyConfig(_Model):
    """How bit-widths depend on the pipeline stage (DeepSpeed 1F1B schedule)."""

    mode: Literal["off", "stage_aware"] = "off"
    """``off``: every stage uses the class table. ``stage_aware``: after one measured step, stages
    whose peak of stored activation bytes (``max(2, min(S - s, M))`` micro-batches under 1F1B times
    the measured bytes per micro-batch) exceeds the lightest stage's by more than ``tolerance`` get
    lower bits, one (module, class) at a time, least measured error per byte saved first. The
    stages exchange their measurements once (``all_gather_object``)."""
    min_bits: Literal[2, 4, 8] = 2
    """Lowest bit-width the stage-aware mode may assign."""
    tolerance: float = Field(0.15, gt=0, le=1)
    """Allowed relative spread of per-stage peak bytes (``max / min - 1``) before bits are lowered."""


class BudgetConfig(_Model):
    """Budget mode: bits chosen per layer class from measured sensitivity (beyond the paper)."""

    target_avg_bits: float | None = Field(None, ge=2, le=16)
    """Average stored bits per saved activation element to meet (scales and unquantized small
    tensors included); ``null`` = off."""
    stage_budget_bytes: int | None = Field(None, gt=0)
    """Bytes this pipeline stage may hold in stored activations at its peak (``max(2, min(S - s,
    M))`` micro-batches under 1F1B; one micro-batch without a pipeline); ``null`` = off. Both limits
    apply when both are set."""
    calibration_steps: int = Field(1, ge=1, le=100)
    """Optimizer steps whose activations are stored unquantized while each class's quantization
    error (``sum |x - Q_b(x)|^2 / sum |x|^2`` at every candidate width) is measured; then the table
    is fixed (least total error that meets the budget) and logged."""
    candidate_bits: list[Literal[2, 4, 8, 16]] = Field([2, 4, 8], min_length=1)
    """Bit-widths the allocator may choose from."""


class ActivationConfig(_Model):
    """Layer-aware quantization of the tensors autograd saves for backward (LAAQ)."""

    enabled: bool = True
    """Quantize saved activations."""
    default_bits: ActivationBits = 4
    """Bits of every layer class the policy does not single out (see ``policy``)."""
    policy: Literal["agoq", "uniform"] = "agoq"
    """``agoq``: every class whose tensors are stored at 8 bits (``classes.DEFAULT_CLASS_BITS``), the
    Linear inputs that backward rebuilds from them at ``default_bits``. ``uniform``: every class at
    ``default_bits``, except the attention classes (``attn_core``, ``attn_value``), which stay at
    ``ATTENTION_MIN_BITS`` or more: below it the softmax backward turns their errors into useless
    gradients and training goes into a wall (uniform 4-bit: held-out loss +161% after 1000 steps on
    the 10M model, a divergence at 76M on a GPU; issue 13). ``class_bits`` and ``rules`` apply on
    top of either (an explicit ``class_bits`` entry for an attention class is the way below the floor)."""
    class_bits: dict[LayerClass, ActivationBits] = {}
    """Bits per layer class, overriding the policy's table for the classes named (budget mode keeps
    these fixed)."""
    rules: list[ActivationRule] = []
    """Overrides by class, module-name pattern and/or stage; the last matching rule wins and no
    automatic mode (stage-aware, budget) changes what a rule decides."""
    exclude: list[str] = []
    """``fnmatch`` patterns of module names whose saved tensors are never quantized."""
    group_size: GroupSize = 128
    """Elements per quantization group (one scale each); with bf16 scales they cost 1/8 bit per
    element. The default policy stores 4.39 bits per element on a LLaMA block (hidden 512, 8 heads,
    MLP 1376, seq 512; scales and exact statistics included)."""
    scale_dtype: Literal["fp32", "bf16"] = "bf16"
    """Storage type of the per-group scales; bf16 halves their overhead."""
    rounding: Rounding = "nearest"
    """Rounding of activation codes (stochastic rounding is unbiased but measured noisier here)."""
    min_numel: int = Field(4096, ge=0)
    """Saved tensors with fewer elements are kept as they are. Per-row statistics (a trailing
    dimension of 1, e.g. a norm's rstd) and SDPA's log-sum-exp are always kept: each value rescales
    a whole row in backward."""
    recompute: bool = True
    """Keep a saved tensor that elementwise ops computed from tensors already stored in the same
    forward (and from parameters) as a recipe over them, recomputed in backward: 0 bytes instead of
    another quantized copy. In a LLaMA block: an RMSNorm's normalised value and output (the q/k/v and
    gate/up input), the SiLU output and the gating product (the down projection's input). Such a
    tensor is as precise as its sources; a class that asks for more bits raises its sources."""
    checkpointing: bool = True
    """Also quantize the block inputs kept by activation checkpointing: a ``PipelineModule`` that
    checkpoints with DeepSpeed's own function gets the quantizing one, and HF models with
    activation checkpointing enabled get it as their ``_gradient_checkpointing_func``."""
    pipeline: PipelinePolicyConfig = PipelinePolicyConfig()
    """Pipeline-stage policy."""
    budget: BudgetConfig = BudgetConfig()
    """Budget mode."""

    def class_table(self) -> dict[str, int]:
        """The resolved class -> bits table (before rules and pipeline policy)."""
        if self.policy == "agoq":
            base = DEFAULT_CLASS_BITS
        else:  # uniform: every class at default_bits, except that attention never goes below its floor
            base = {c: max(self.default_bits, ATTENTION_MIN_BITS) for c in ATTENTION_CLASSES}
        return resolve_class_bits(self.default_bits, {**base, **self.class_bits})


class GradientConfig(_Model):
    """8-bit gradients for ZeRO stage 0/1/2/3 (QuanGrad)."""

    enabled: bool = True
    """Use the 8-bit gradient path."""
    communication_bits: Literal[8, 32] = 8
    """Bits on the wire for gradient reduction; 32 keeps DeepSpeed's own collective."""
    storage_bits: Literal[8, 32] = 8
    """Bits of the gradient accumulation buffer between backward and ``step()``; 32 keeps fp32."""
    group_size: GroupSize = 128
    """Elements per quantization group (one fp32 scale each)."""
    rounding: Rounding = "stochastic"
    """Rounding of gradient codes (communication and storage). Stochastic rounding is unbiased, so
    errors of accumulated micro-batches average out instead of adding up."""
    min_numel: int = Field(1024, ge=0)
    """Reductions of fewer elements (a whole bucket or chunk) travel in fp32, and gradient buffers of
    fewer elements (a partition, a parameter) are kept in fp32: quantizing a few elements saves
    nothing and costs their precision."""
    check_steps: int = Field(0, ge=0)
    """Debug guard: at the first ``check_steps`` optimizer steps, keep an exact fp32 sum of every
    parameter's gradient beside agoq's and raise, naming the parameter, when agoq's gradient is all
    zero although the exact one is above the 8-bit path's resolution, or finite where the exact one
    is not. Costs a host synchronisation and an fp32 copy of the gradients while it runs; 0 (the
    default) installs nothing."""
    error_feedback: bool = False
    """Carry each rank's storage quantization residual into the next accumulation. The residual is
    held in 8 bits, as large as the gradient buffer itself (total gradient state 0.52x fp32 instead
    of 0.26x); off by default since stochastic rounding trains as well (docs/results.md)."""


class AgoqConfig(_Model):
    """The whole ``"agoq"`` block."""

    enabled: bool = True
    """Master switch; ``false`` gives stock DeepSpeed behaviour."""
    kernel_backend: Literal["auto", "cuda", "triton", "cpp", "torch"] = "auto"
    """Quantization kernels: ``auto`` picks CUDA, then Triton on GPUs, C++ on CPUs, else pure torch."""
    activation: ActivationConfig = ActivationConfig()
    """Activation quantization settings."""
    gradient: GradientConfig = GradientConfig()
    """Gradient quantization settings."""
    seed: int = Field(1234, ge=0)
    """Seed of stochastic rounding (combined with rank and step)."""
    log_summary: bool = True
    """Print the start-up summary on rank 0."""

    @property
    def activation_on(self) -> bool:
        """Whether saved activations are quantized (``enabled`` and ``activation.enabled``)."""
        return self.enabled and self.activation.enabled

    @property
    def gradient_on(self) -> bool:
        """Whether the gradient path is configured (``enabled`` and ``gradient.enabled``); it quantizes
        something when ``gradient_comm8`` or ``gradient_store8`` also holds."""
        return self.enabled and self.gradient.enabled

    @property
    def gradient_comm8(self) -> bool:
        """Whether gradients are reduced in 8 bits."""
        return self.gradient_on and self.gradient.communication_bits == 8

    @property
    def gradient_store8(self) -> bool:
        """Whether gradients are kept in 8 bits between backward and the step."""
        return self.gradient_on and self.gradient.storage_bits == 8

    @property
    def gradient_quantized(self) -> bool:
        """Whether the gradient path quantizes anything (reduction or storage): an 8-bit host is built."""
        return self.gradient_comm8 or self.gradient_store8


def _submodel(annotation: Any) -> type[_Model] | None:
    """The config model inside an annotation such as ``X``, ``list[X]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, _Model):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _model_for(loc: tuple[Any, ...]) -> type[_Model]:
    """The config model that owns the last key of ``loc`` (list indices are skipped)."""
    model: type[_Model] = AgoqConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _submodel(field.annotation) if field is not None else None
        model = inner or model
    return model


_NUMERIC_ERRORS = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "int_parsing",
        "int_type",
        "int_from_float",
        "float_parsing",
        "float_type",
        "finite_number",
    }
)
"""pydantic error types of a number that is malformed or out of range: the message names the range."""


def _allowed(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] in _NUMERIC_ERRORS:
        loc = tuple(p for p in err["loc"] if p != "[key]")
        field = _model_for(loc).model_fields.get(loc[-1]) if loc and isinstance(loc[-1], str) else None
        rule = _numeric_rule(field) if field is not None else None
        if rule is not None:
            return f"must be {rule}"
    if "expected" in ctx:
        return "must be one of " + str(ctx["expected"]).replace("'", "")
    msg = err["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:]


def _annotation_at(loc: tuple[Any, ...]) -> Any:
    """The type annotation of the value at ``loc`` (through model fields by name or alias, list
    items and dict values), ``Optional`` removed; ``None`` when ``loc`` leaves the models."""

    def strip(ann: Any) -> Any:
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0] if type(None) in typing.get_args(ann) and len(args) == 1 else ann

    ann: Any = AgoqConfig
    for part in loc:
        ann = strip(ann)
        if isinstance(ann, type) and issubclass(ann, _Model) and isinstance(part, str):
            fields = [f for name, f in ann.model_fields.items() if part in (name, f.alias)]
            if not fields:
                return None
            ann = fields[0].annotation
        elif typing.get_origin(ann) is list and isinstance(part, int):
            ann = typing.get_args(ann)[0]
        elif typing.get_origin(ann) is dict and isinstance(part, str):
            ann = typing.get_args(ann)[1]
        else:
            return None
    return strip(ann)


def _key(part: Any) -> str:
    """One step of a key path: ``.name``, ``[3]``, or ``["odd\nkey"]`` for keys that would garble a line."""
    if isinstance(part, int):
        return f"[{part}]"
    text = str(part)
    return f".{text}" if text and text.isprintable() else f"[{json.dumps(text)}]"


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if p != "[key]")
    path = CONFIG_KEY + "".join(_key(p) for p in loc)
    if err["type"] == "extra_forbidden":
        model = _model_for(loc)
        keys = sorted(f.alias or name for name, f in model.model_fields.items())
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        return f"{path}: unknown key{hint} Allowed keys: {', '.join(keys)}"
    if err["type"] == "enum":
        return f"{path}={json.dumps(err['input'])}: must be one of {', '.join(c.value for c in LayerClass)}"
    value = err.get("input")
    shown = json.dumps(value) if isinstance(value, str | int | float | bool | None) else repr(value)
    annotation = _annotation_at(loc)
    choices = [str(c) for c in typing.get_args(annotation)] if typing.get_origin(annotation) is Literal else []
    one_of = f"must be one of {', '.join(choices[:-1])} or {choices[-1]}" if choices else ""
    if err["type"] == "missing":
        return f"{path}: required key is missing" + (f"; {one_of}" if one_of else "")
    if one_of:
        # Whatever pydantic says (a wrong type, an integer too large to parse, ...): list the choices.
        return f"{path}={shown}: {one_of}"
    return f"{path}={shown}: {_allowed(err)}"


def parse_agoq_config(block: Any) -> AgoqConfig:
    """Validate the ``"agoq"`` block (a dict, ``True``/``None`` for all defaults) into ``AgoqConfig``.

    Raises ``AgoqConfigError`` listing every problem, each with its key path and the allowed values.
    """
    if block is None or block is True:
        block = {}
    if block is False:
        block = {"enabled": False}
    if not isinstance(block, dict):
        raise AgoqConfigError(f"{CONFIG_KEY}={block!r}: must be an object (a JSON dict), true or false")
    try:
        return AgoqConfig(**block)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise AgoqConfigError('invalid "agoq" config:\n  ' + "\n  ".join(lines)) from None


def agoq_block(ds_config: dict[str, Any] | None) -> Any:
    """The raw ``"agoq"`` block of a DeepSpeed config dict, or ``None`` when there is none."""
    if not isinstance(ds_config, dict):
        return None
    return ds_config.get(CONFIG_KEY)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the ``"agoq"`` block (for editors and docs)."""
    schema = AgoqConfig.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = 'agoq-ds "agoq" block of ds_config.json'
    return schema
