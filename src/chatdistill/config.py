"""Typed recipe for `chatdistill distill`: YAML file + dotted overrides, validated with pydantic.

Field descriptions double as documentation; errors name the field and the file. The resolved config
is saved beside every output (`chatdistill_config.yaml`).
"""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chatdistill import atomic
from chatdistill.distill.divergences import DIVERGENCES
from chatdistill.errors import UserError

# A registered divergence, or "sft" for cross-entropy on the reference answers only.
LOSS_KINDS = (*DIVERGENCES, "sft")
LossKind = Literal[LOSS_KINDS]


class _Strict(BaseModel):
    # inf and nan pass `gt`/`le` bounds in ways that train on NaNs: every number must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    train: str | None = Field(None, description="training rows: JSONL or Parquet chat data")
    validation: str | None = Field(None, description="validation rows; default: split of train")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of train held out by conv.")
    max_length: int = Field(512, ge=8, description="tokens per conversation after truncation")


class LossConfig(_Strict):
    kind: LossKind = Field("fkl", description="divergence to the teacher, or sft for CE only")
    beta: float = Field(0.5, ge=0, le=1, description="generalised JSD mix: 0 = fkl, 1 = rkl")
    skew: float = Field(0.1, ge=0, le=1, description="skew KL mixing weight (DistiLLM alpha)")
    temperature: float = Field(1.0, gt=0, description="softens both distributions; loss x T^2")
    ce_weight: float = Field(0.0, ge=0, le=1, description="loss = w*CE + (1-w)*divergence")
    chunk_size: int | None = Field(
        None, ge=1, description="loss positions per chunk (bounds memory); default ~2M logits"
    )


class TrainConfig(_Strict):
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="conversations per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0, description="linear warmup, then cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a share of the peak")
    max_grad_norm: float = Field(1.0, gt=0)
    freeze_embeddings: bool = Field(
        False,
        description="keep the student's token embeddings (and an output head tied to them) as "
        "they are: a student cut from its teacher keeps the teacher's, and its steps skip their "
        "gradients and optimizer updates",
    )
    eval_every: int = Field(50, ge=0, description="steps between validation runs (0 = end only)")
    save_every: int = Field(50, ge=0, description="steps between checkpoints (0 = end only)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk")
    log_every: int = Field(10, ge=1)
    # numpy's seed (set by accelerate's set_seed) takes 0 .. 2**32 - 1.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of data order, init and sampling")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs")
    teacher_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the live teacher's weights; auto: as `precision`. bf16 ran SmolLM2-135M 1.9x "
        "faster on an AMD EPYC with AVX512-BF16 (0.6x on an Intel Xeon without AMX) at a KL of "
        "1e-3 nats/token",
    )


class OnPolicyConfig(_Strict):
    fraction: float = Field(0.0, ge=0, le=1, description="share of steps on student samples")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, description="student sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1)


class DistillConfig(_Strict):
    output: str = Field("runs/distill", description="output directory")
    teacher: str | None = Field(None, description="teacher model directory or hub id")
    teacher_adapter: str | None = Field(
        None, description="peft LoRA adapter directory merged into the teacher at load"
    )
    teacher_cache: str | None = Field(None, description="cache from `chatdistill cache-teacher`")
    student: str | None = Field(None, description="student checkpoint directory or hub id")
    student_layers: list[int] | None = Field(None, description="cut from teacher: layers to keep")
    student_num_layers: int | None = Field(None, ge=1, description="cut: N evenly spaced layers")
    student_config: str | None = Field(None, description="fresh student from a config.json")
    tokenizer: str | None = Field(None, description="tokenizer dir (default: teacher's/student's)")
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)

    @field_validator("student_layers", mode="before")
    @classmethod
    def _parse_layers(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return [int(x) for x in v.split(",") if x.strip()]
            except ValueError:
                raise ValueError("expected comma-separated layer indices, e.g. 0,2,4,7") from None
        return v

    @model_validator(mode="after")
    def _check_sources(self) -> "DistillConfig":
        sources = [self.student, self.student_layers, self.student_num_layers, self.student_config]
        if sum(s is not None for s in sources) > 1:
            raise ValueError(
                "choose one student source: student, student_layers, student_num_layers or "
                "student_config"
            )
        return self

    @property
    def is_sft(self) -> bool:
        return self.loss.kind == "sft"


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _format_error(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    field = ".".join(str(x) for x in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling against configs/ or `chatdistill distill --help`"
    return f"{source}: {field}: {msg}"


def _one_line(e: yaml.YAMLError) -> str:
    """A YAML error's problem and position without the multi-line snippet PyYAML appends."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem is None:
        return " ".join(str(e).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{problem}{where}"


def check_flag(flag: str, value: Any, section: type[BaseModel], field: str) -> None:
    """Refuse a command-line value that the recipe's `section.field` would refuse, in its words
    (one set of ranges for recipes and flags)."""
    try:
        section.model_validate({field: value})
    except ValidationError as e:
        raise UserError(f"{flag} {value}: {e.errors()[0]['msg']}") from None


def load_distill_config(
    path: str | None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None
) -> DistillConfig:
    """Load a recipe, apply flag overrides (dotted keys) and `KEY=VALUE` strings, validate."""
    tree: dict = {}
    source = "flags"
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise UserError(
                f"{p}: not UTF-8 text (byte {e.start + 1}); is it binary or UTF-16? "
                "save the recipe as UTF-8 YAML"
            ) from None
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({_one_line(e)})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{p}: a recipe must be a mapping of keys to values")
        source = str(p)
    for k, v in (overrides or {}).items():
        _set_dotted(tree, k, v)
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise UserError(
                f"--set {item!r}: the value is not valid YAML ({_one_line(e)}); quote a string "
                "that starts with [ { : or #"
            ) from None
        _set_dotted(tree, k.strip(), value)
    try:
        return DistillConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e, source)) from None


def save_config(cfg: BaseModel, path: Path, notes: list[str] | None = None) -> None:
    """Write the resolved config as YAML next to the outputs; `notes` become comment lines at the
    top (what the recipe's paths pointed at, such as a GGUF file's quantisation and sha256)."""
    header = "".join(f"# {line}\n" for line in notes or [])
    atomic.write_text(path, header + yaml.safe_dump(cfg.model_dump(), sort_keys=False))
