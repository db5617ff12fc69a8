"""Turn evaluation results into things people read: terminal tables, summary.md, a self-contained
report.html (plots embedded as base64 PNG). The model card of a student is `card.py`.

Everything here is a function of the `EvalResult` from `chatdistill.evaluate.run.evaluate` (plus
the training logs it points to), so a report can be rebuilt from results.json alone
(`EvalResult.from_json`).
"""

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from rich.console import Console
from rich.table import Table

from chatdistill import atomic
from chatdistill.evaluate.result import EvalResult, ModelResult, Sample

# ---------------------------------------------------------------------------------------------
# Formatting and table definitions shared by the terminal, Markdown and HTML
# ---------------------------------------------------------------------------------------------

DASH = "–"


def _num(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:,.{digits}f}"


def pct(x: float | None) -> str:
    return DASH if x is None else f"{x:.1f}%"


def _count(n: float | None) -> str:
    """1234567 -> 1.23M."""
    if n is None:
        return DASH
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _mb(n_bytes: float | None) -> str:
    return DASH if n_bytes is None else f"{n_bytes / 2**20:,.1f}"


Column = tuple[str, Callable[[ModelResult], str]]


def _fidelity(m: ModelResult, key: str) -> float | None:
    return None if m.fidelity is None else getattr(m.fidelity, key)


def kept_value(m: ModelResult, key: str) -> float | None:
    return None if m.kept is None else getattr(m.kept, key)


QUALITY: list[Column] = [
    ("CE (nats/tok) ↓", lambda m: _num(m.quality.ce, 3)),
    ("Perplexity ↓", lambda m: _num(m.quality.perplexity)),
    ("ROUGE-L ↑", lambda m: _num(m.quality.rouge_l, 1)),
    ("chrF ↑", lambda m: _num(m.quality.chrf, 1)),
    ("Accuracy % ↑", lambda m: _num(m.quality.accuracy, 1)),
]
FIDELITY: list[Column] = [
    ("KL(teacher‖model) ↓", lambda m: _num(_fidelity(m, "kl"), 4)),
    ("Top-1 agreement % ↑", lambda m: _num(_fidelity(m, "top1_agreement"), 1)),
    ("ROUGE-L vs teacher ↑", lambda m: _num(_fidelity(m, "rouge_l_vs_teacher"), 1)),
]
KEPT_KEYS = [("ce", "CE"), ("perplexity", "Perplexity"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF")]
KEPT_KEYS.append(("accuracy", "Accuracy"))
KEPT: list[Column] = [(label, lambda m, k=key: pct(kept_value(m, k))) for key, label in KEPT_KEYS]
COST: list[Column] = [
    ("Parameters", lambda m: _count(m.cost.parameters)),
    ("Weights on disk (MB)", lambda m: _mb(m.cost.size_on_disk_bytes)),
    ("Peak memory (MB)", lambda m: _num(m.cost.peak_memory_mb, 1)),
    ("Prefill tok/s", lambda m: _num(m.cost.prefill_tokens_per_s, 0)),
    ("Decode tok/s (b=1)", lambda m: _num(m.cost.decode_tokens_per_s_batch1, 1)),
    ("Decode tok/s (b=8)", lambda m: _num(m.cost.decode_tokens_per_s_batch8, 1)),
    ("TTFT (ms)", lambda m: _num(_ms(m.cost.time_to_first_token_s), 1)),
]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def kept_note(results: EvalResult) -> str:
    if results.kept_mode == "gap_closed":
        return (
            "Share of the baseline-to-teacher gap each student closes: "
            "(student − baseline) / (teacher − baseline); 100% = as good as the teacher."
        )
    return (
        "Student as a share of the teacher: student / teacher for higher-is-better metrics, "
        "teacher / student for CE and perplexity (lower is better)."
    )


FIDELITY_NOTES = {
    "references": "On the reference assistant tokens.",
    "teacher": "On the teacher's own greedy answers to the test prompts.",
}


def tables(results: EvalResult) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, headers, rows) for each summary table; cells are formatted strings."""
    models = results.models
    others = [m for m in models if m.role != "teacher"]
    students = [m for m in models if m.kept is not None]

    def build(cols: list[Column], ms: list[ModelResult]) -> tuple[list[str], list[list[str]]]:
        return ["Model", "Role"] + [c[0] for c in cols], [
            [m.name, m.role] + [f(m) for _, f in cols] for m in ms
        ]

    quality_note = "Against the reference answers. " + (
        "Accuracy: normalised answer string contained in the model's answer."
        if results.data.with_answer
        else "No row carries an `answer` field, so accuracy is not measured."
    )
    out = [("Quality", quality_note, *build(QUALITY, models))]
    if others:
        out.append(
            (
                "Fidelity to the teacher",
                FIDELITY_NOTES[results.settings.fidelity_on],
                *build(FIDELITY, others),
            )
        )
    if students:
        out.append(("Teacher quality kept", kept_note(results), *build(KEPT, students)))
    cost_note = f"Peak memory: {results.settings.memory_method}." + "".join(
        f" {m.name}: speed and memory measured on {m.cost.same_shape_as} (same architecture, "
        "size and dtype)."
        for m in models
        if m.cost.same_shape_as
    )
    out.append(("Cost and speed", cost_note, *build(COST, models)))
    return out


def _ratio(x: float | None, base: float | None) -> str:
    return DASH if not x or not base else f"{x / base:.2f}x"


def headline(results: EvalResult) -> tuple[list[str], list[list[str]]]:
    """One row per model with what a distillation is judged on: its size, speed and memory
    against the teacher's, the quality it kept (held-out CE, answer accuracy) and how closely it
    follows the teacher (top-1 agreement and KL, on the tokens `fidelity_on` names)."""
    t_cost = results.teacher.cost
    headers = ["model", "params", "disk MB", "peak MB", "decode tok/s", "speed", "held-out CE",
               "accuracy %", "kept", "agree %", "KL"]  # fmt: skip
    rows = []
    for m in results.models:
        cost, quality = m.cost, m.quality
        decode = cost.decode_tokens_per_s_batch1
        rows.append([
            m.name,
            f"{_count(cost.parameters)} {_ratio(cost.parameters, t_cost.parameters)}",
            _mb(cost.size_on_disk_bytes),
            _num(cost.peak_memory_mb, 1),
            _num(decode, 0),
            _ratio(decode, t_cost.decode_tokens_per_s_batch1),
            _num(quality.ce, 3),
            _num(quality.accuracy, 1),
            pct(kept_value(m, "accuracy")) if m.role != "teacher" else DASH,
            _num(_fidelity(m, "top1_agreement"), 1),
            _num(_fidelity(m, "kl"), 3),
        ])  # fmt: skip
    return headers, rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *map(line, rows)])


# Wider than any table: a table takes only the width it needs, so this width means "uncut".
UNCUT_WIDTH = 10_000


def table_console() -> Console:
    """A console on stdout for the tables: the terminal's width, or in a file or pipe (which has
    no width) no limit, where rich would otherwise cut every table to 80 columns."""
    console = Console()
    return console if console.is_terminal else Console(width=UNCUT_WIDTH)


def print_tables(results: EvalResult, console: Console | None = None) -> None:
    """Print the summary tables with rich (on `table_console()` unless given a console)."""
    console = console or table_console()
    for title, note, headers, rows in tables(results):
        t = Table(title=title, caption=note, title_justify="left", caption_justify="left")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i < 2 else "right", no_wrap=i == 0)
        for r in rows:
            t.add_row(*r)
        console.print(t)


# ---------------------------------------------------------------------------------------------
# Markdown summary
# ---------------------------------------------------------------------------------------------


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, headers)) + " |"]
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|")
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _meta_lines(results: EvalResult) -> list[str]:
    d, s = results.data, results.settings
    return [
        f"Teacher: `{results.teacher.path}`",
        f"Data: `{d.path}` — {d.conversations} conversations, {d.scored_tokens} scored "
        f"assistant tokens, {d.with_reference} reference answers, {d.with_answer} with "
        f"an `answer` field",
        f"Greedy answers, up to {s.max_new_tokens} new tokens; device {s.device}; "
        f"{results.created}",
    ]


def render_markdown(results: EvalResult) -> str:
    """summary.md: the tables and the sample conversations."""
    parts = ["# chatdistill evaluation", "", *[f"- {x}" for x in _meta_lines(results)], ""]
    for title, note, headers, rows in tables(results):
        parts += [f"## {title}", "", note, "", md_table(headers, rows), ""]
    if results.samples:
        parts += ["## Sample conversations", ""]
        for i, smp in enumerate(results.samples, 1):
            last_user = next(
                (m["content"] for m in reversed(smp.messages) if m["role"] == "user"), ""
            )
            parts += [f"### Sample {i}", "", f"**User:** {last_user}", ""]
            rows = [["reference", smp.reference or DASH]]
            rows += [[name, text] for name, text in smp.answers.items()]
            parts += [md_table(["Model", "Answer"], rows).replace("---:", "---"), ""]
    parts.append("Plots and full conversations: report.html.")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, embedded as base64 PNG)
# ---------------------------------------------------------------------------------------------

_ROLE_MARKER = {"teacher": "*", "student": "o", "baseline": "s"}


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(ncols: int) -> tuple[Figure, np.ndarray]:
    """A figure with one row of `ncols` axes. A bare Figure rather than pyplot: no GUI backend
    and no global list of open figures, so it draws headless and needs no closing."""
    fig = Figure(figsize=(5.2 * ncols, 3.8))
    return fig, fig.subplots(1, ncols, squeeze=False)


def plot_quality_vs_size(results: EvalResult) -> str:
    """Each quality metric against parameter count, one marker per model."""
    metrics = [("ce", "Held-out CE (nats/token, lower is better)")]
    metrics += [
        (k, f"{label} (higher is better)")
        for k, label in (("rouge_l", "ROUGE-L"), ("chrf", "chrF"), ("accuracy", "Accuracy %"))
        if any(getattr(m.quality, k) is not None for m in results.models)
    ]
    fig, axes = _figure(len(metrics))
    models = results.models
    sizes = [m.cost.parameters for m in models]
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for m in models:
            y = getattr(m.quality, key)
            if y is None:
                continue
            x = m.cost.parameters
            ax.scatter(x, y, s=80, marker=_ROLE_MARKER[m.role], label=f"{m.name} ({m.role})")
            ax.annotate(m.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if max(sizes) > 20 * max(1, min(sizes)):
            ax.set_xscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
        ax.margins(0.18)
        ax.set_xlabel("Parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Quality against model size")
    return _png(fig)


def plot_speed(results: EvalResult) -> str:
    """Bars: prefill tokens/s, decode tokens/s at batch 1 and 8, peak memory."""
    models = results.models
    names = [m.name for m in models]
    x = np.arange(len(models))
    fig, axes = _figure(3)
    ax = axes[0][0]
    ax.bar(x, [m.cost.prefill_tokens_per_s or 0 for m in models], color="tab:blue")
    ax.set_ylabel("Prefill tokens/s (higher is better)")
    ax = axes[0][1]
    for off, key, lab in ((-0.2, "batch1", "batch 1"), (0.2, "batch8", "batch 8")):
        vals = [getattr(m.cost, f"decode_tokens_per_s_{key}") or 0 for m in models]
        ax.bar(x + off, vals, width=0.4, label=lab)
    ax.set_ylabel("Decode tokens/s (higher is better)")
    ax.legend(fontsize=8)
    ax = axes[0][2]
    ax.bar(x, [m.cost.peak_memory_mb or 0 for m in models], color="tab:gray")
    ax.set_ylabel("Peak memory while generating (MB)")
    for ax in axes[0]:
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("Model")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Speed and memory")
    return _png(fig)


def read_training_log(path: str | Path) -> dict[str, list[dict]]:
    """Split a trainer metrics.jsonl into train records (with `loss`) and eval records (with
    `split`). Lines that are not JSON objects are skipped: the trainer may be writing the file."""
    train, evals = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if "split" in rec:
            evals.append(rec)
        elif "loss" in rec:
            train.append(rec)
    return {"train": train, "eval": evals}


# The validation records the trainer writes (`distill.train.evaluate_split`): key, label, style.
VALIDATION_KEYS = (("val_ce", "CE", "-"), ("val_kd", "KD", "--"))


def validation_curves(
    logs: dict[str, dict[str, list[dict]]],
) -> dict[str, tuple[list[int], list[float], str]]:
    """The validation lines of the training curves: label -> (steps, values, line style)."""
    curves = {}
    for name, log in logs.items():
        for key, label, style in VALIDATION_KEYS:
            points = [(r["step"], r[key]) for r in log["eval"] if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                curves[f"{name} {label}"] = (list(steps), list(values), style)
    return curves


def plot_training_curves(logs: dict[str, dict[str, list[dict]]]) -> str | None:
    """Training loss and validation CE/KD against step, one line per model; None if no data."""
    if not any(log["train"] or log["eval"] for log in logs.values()):
        return None
    fig, axes = _figure(2)
    train_ax, eval_ax = axes[0]
    for name, log in logs.items():
        if log["train"]:
            train_ax.plot(
                [r["step"] for r in log["train"]], [r["loss"] for r in log["train"]], label=name
            )
    for label, (steps, values, style) in validation_curves(logs).items():
        eval_ax.plot(steps, values, style, marker=".", label=label)
    train_ax.set_ylabel("Training loss")
    eval_ax.set_ylabel("Validation CE / KD (nats/token)")
    for ax in (train_ax, eval_ax):
        ax.set_xlabel("Optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML report
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#1d232a;line-height:1.45}
h1{margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:2px solid #e3e7ec;padding-bottom:.2em}
ul.meta{color:#4a5560;padding-left:1.2em} code{background:#f3f5f7;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d7dde3;padding:.35em .6em;text-align:right;vertical-align:top}
th{background:#f3f5f7} td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}
tr.teacher td{background:#fbf8ec} p.note{color:#56616c;font-size:.9em;margin:.2em 0}
img{max-width:100%;height:auto;display:block;margin:.8em 0}
.sample{border:1px solid #d7dde3;border-radius:6px;padding:.8em 1em;margin:1em 0}
.turn{margin:.2em 0;white-space:pre-wrap} .role{font-weight:600;color:#4a5560}
.answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:.6em;margin-top:.6em}
.answer{background:#f7f9fb;border-radius:5px;padding:.5em .7em;white-space:pre-wrap;font-size:.92em}
.answer h4{margin:0 0 .3em 0;font-size:.9em;color:#2a5d8f}
"""


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="{esc(r[1])}">' + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _code(markdown: str) -> str:
    """Escape a line and turn its `backticks` into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(markdown))


def _img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _sample_html(i: int, smp: Sample) -> str:
    esc = html.escape
    turns = "".join(
        f'<div class="turn"><span class="role">{esc(m["role"])}:</span> {esc(m["content"])}</div>'
        for m in smp.messages
    )
    cards = [("reference", smp.reference or DASH), *smp.answers.items()]
    answers = "".join(
        f'<div class="answer"><h4>{esc(name)}</h4>{esc(text) or DASH}</div>' for name, text in cards
    )
    return (
        f'<div class="sample"><h3>Sample {i}</h3>{turns}<div class="answers">{answers}</div></div>'
    )


def render_html(results: EvalResult, logs: dict[str, dict[str, list[dict]]] | None = None) -> str:
    """The self-contained HTML report: tables, plots, training curves, sample conversations."""
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>chatdistill evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>chatdistill evaluation report</h1>",
        "<ul class='meta'>"
        + "".join(f"<li>{_code(x)}</li>" for x in _meta_lines(results))
        + "</ul>",
    ]
    for title, note, headers, rows in tables(results):
        parts += [f"<h2>{esc(title)}</h2>", f"<p class='note'>{_code(note)}</p>"]
        parts.append(_html_table(headers, rows))
    parts += ["<h2>Plots</h2>", _img(plot_quality_vs_size(results), "Quality against model size")]
    parts.append(_img(plot_speed(results), "Speed and memory"))
    curves = plot_training_curves(logs or {})
    if curves:
        parts += ["<h2>Training curves</h2>", _img(curves, "Training curves")]
    if results.samples:
        parts.append("<h2>Sample conversations</h2>")
        parts += [_sample_html(i, s) for i, s in enumerate(results.samples, 1)]
    parts.append("</body></html>")
    return "\n".join(parts)


def load_logs(results: EvalResult) -> dict[str, dict[str, list[dict]]]:
    """Training logs named in the results (`training_logs`), read from disk where still present."""
    return {
        name: read_training_log(path)
        for name, path in results.training_logs.items()
        if Path(path).is_file()
    }


def write_reports(results: EvalResult, output: str | Path) -> dict[str, Path]:
    """Write results.json, summary.md and report.html into `output`; return their paths."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "summary": out / "summary.md"}
    paths["report"] = out / "report.html"
    atomic.write_text(
        paths["results"], json.dumps(results.to_json(), indent=2, ensure_ascii=False) + "\n"
    )
    atomic.write_text(paths["summary"], render_markdown(results))
    atomic.write_text(paths["report"], render_html(results, load_logs(results)))
    return paths
