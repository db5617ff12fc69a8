"""What `chatdistill eval` measured, typed: the results.json format, field by field.

`EvalResult.to_json()` is the object results.json holds (the field order below is the file's key
order); `EvalResult.from_json` reads one back, so a report can be rebuilt from the file alone.
Percentages are 0-100; CE and KL are in nats per token.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from chatdistill.errors import UserError
from chatdistill.evaluate.config import EvalConfig

SCHEMA = "chatdistill.eval/1"
Role = Literal["teacher", "student", "baseline"]


@dataclass
class Quality:
    """Against the reference answers of the test data."""

    ce: float
    """cross-entropy on the reference assistant tokens"""
    perplexity: float
    rouge_l: float | None
    """mean sentence ROUGE-L of the greedy answers; None when no row has a reference"""
    chrf: float | None
    accuracy: float | None
    """share of answers stating their row's `answer` field; None when no row has one"""


@dataclass
class Fidelity:
    """Against the teacher (not measured for the teacher itself): KL and agreement on the tokens
    `Settings.fidelity_on` names, the reference answers' by default."""

    kl: float
    """KL(teacher || model), token-weighted mean"""
    top1_agreement: float
    rouge_l_vs_teacher: float
    """ROUGE-L of the model's greedy answers against the teacher's"""


@dataclass
class Cost:
    """Size, speed and memory."""

    parameters: int
    prefill_tokens_per_s: float | None
    decode_tokens_per_s_batch1: float | None
    decode_tokens_per_s_batch8: float | None
    time_to_first_token_s: float | None
    size_on_disk_bytes: int
    peak_memory_mb: float | None = None
    """None when not measured (--no-memory)"""
    same_shape_as: str | None = None
    """the model evaluated earlier whose speed and memory these are: it has the same
    architecture, size and dtype, so they are measured once (and not with twice the noise)"""


@dataclass
class Kept:
    """A student's share of the teacher's quality, per `Quality` field: a ratio, or with a
    baseline the share of the baseline-to-teacher gap closed (`EvalResult.kept_mode`)."""

    ce: float | None
    perplexity: float | None
    rouge_l: float | None
    chrf: float | None
    accuracy: float | None


@dataclass
class ModelResult:
    """One evaluated model."""

    name: str
    """its directory name, made unique among the models"""
    role: Role
    path: str
    quality: Quality
    fidelity: Fidelity | None
    cost: Cost
    kept: Kept | None = None
    """students only"""
    source: dict[str, Any] = field(default_factory=dict)
    """where the model came from (`models.ModelSource.record`: format; a GGUF file's name,
    quantisation and sha256; an adapter)"""

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModelResult":
        fidelity, kept = obj["fidelity"], obj["kept"]
        return cls(
            name=obj["name"],
            role=obj["role"],
            path=obj["path"],
            quality=Quality(**obj["quality"]),
            fidelity=None if fidelity is None else Fidelity(**fidelity),
            cost=Cost(**obj["cost"]),
            kept=None if kept is None else Kept(**kept),
            source=obj.get("source", {}),
        )


@dataclass
class DataSummary:
    """The test data as evaluated."""

    path: str
    conversations: int
    scored_tokens: int
    with_reference: int
    with_answer: int


@dataclass
class Sample:
    """One test conversation with every model's answer, keyed by model name."""

    messages: list[dict[str, str]]
    reference: str | None
    answers: dict[str, str]


@dataclass
class Settings(EvalConfig):
    """The run's settings, with `device` the one the models ran on."""

    memory_method: str = "not measured (--no-memory)"
    """how peak memory was measured"""


@dataclass
class EvalResult:
    """Everything one `chatdistill eval` run measured; results.json is its `to_json()`."""

    created: str
    """ISO 8601, UTC"""
    data: DataSummary
    settings: Settings
    kept_mode: Literal["ratio", "gap_closed"]
    models: list[ModelResult]
    """the teacher first, then the students, then the baseline if any"""
    samples: list[Sample]
    training_logs: dict[str, str]
    """model (or log) name -> its trainer metrics.jsonl, plotted in the report"""
    speculative: dict[str, Any] | None = None
    """with --draft: the teacher's batch-1 speed with the draft, its acceptance rate, how many
    greedy answers stayed identical (`probes.draft_probe`)"""

    @property
    def teacher(self) -> ModelResult:
        return next(m for m in self.models if m.role == "teacher")

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "EvalResult":
        """Read a results.json object back; refuse one of another format."""
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            found = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"results schema {found!r}: expected {SCHEMA} (from chatdistill eval)")
        return cls(
            created=obj["created"],
            data=DataSummary(**obj["data"]),
            settings=Settings(**obj["settings"]),
            kept_mode=obj["kept_mode"],
            models=[ModelResult.from_json(m) for m in obj["models"]],
            samples=[Sample(**s) for s in obj["samples"]],
            training_logs=dict(obj["training_logs"]),
            speculative=obj.get("speculative"),
        )
