"""`train(cfg)`: one readable distillation loop on accelerate (one CPU, one GPU or many processes).

Each optimizer step draws `grad_accum` micro-batches per process, counts the loss-carrying tokens
of the whole step across processes, and divides the summed loss by that count, so accumulation and
process count do not change the result. Only positions that carry loss are projected to the
vocabulary (see losses.chunked_loss).
"""

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from chatdistill import atomic
from chatdistill.allocator import keep_freed_memory
from chatdistill.config import DistillConfig, save_config
from chatdistill.data import Dataset, collate, iter_batches, loss_positions
from chatdistill.distill import checkpoint as ckpt
from chatdistill.distill.losses import step_weights
from chatdistill.distill.outputs import RECIPE, check_output
from chatdistill.distill.prepare import Setup, prepare
from chatdistill.distill.rollout import OnPolicySampler
from chatdistill.errors import Interrupted, UserError
from chatdistill.models import ModelSource
from chatdistill.progress import TrainProgress


def _loss(
    module: torch.nn.Module, batch: dict, examples: list, teacher, weights=(1.0, 1.0)
) -> tuple[torch.Tensor, ...]:
    """Student loss on one micro-batch -> (loss, ce_sum, kd_sum), scalars."""
    teacher_fn = teacher.targets(batch, examples) if teacher is not None else None
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    return module(ids, mask, labels, teacher_fn, weights)


@torch.no_grad()
def evaluate_split(s: Setup, dataset: Dataset, teacher) -> dict[str, float]:
    """Token-weighted validation CE (and divergence when a teacher is present)."""
    # The unwrapped module: a DDP forward would sync buffers, and ranks run different batch counts.
    module = s.accelerator.unwrap_model(s.loss_module)
    was_training = module.training
    module.eval()
    ce = kd = n = 0.0
    bs = s.cfg.train.batch_size
    ex = dataset.examples
    for i in range(s.accelerator.process_index * bs, len(ex), bs * s.accelerator.num_processes):
        chunk = ex[i : i + bs]
        batch = {k: v.to(s.accelerator.device) for k, v in collate(chunk, s.pad_id).items()}
        _, c, k = _loss(module, batch, chunk, teacher)
        ce, kd, n = ce + c.item(), kd + k.item(), n + loss_positions(batch["labels"]).sum().item()
    totals = s.accelerator.reduce(torch.tensor([ce, kd, n], device=s.accelerator.device), "sum")
    ce, kd, n = totals.tolist()
    module.train(was_training)
    out = {"val_ce": ce / max(n, 1), "val_ppl": math.exp(min(ce / max(n, 1), 50))}
    if teacher is not None:
        out["val_kd"] = kd / max(n, 1)
    return out


class MetricsLog:
    """Append-only JSON lines in OUTPUT/metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def keep_until(self, step: int) -> None:
        """Drop the records after `step` (and a line cut by a kill): a resumed run writes them
        again, so the log holds each step once."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step_of = record.get("step") if isinstance(record, dict) else None
            if isinstance(step_of, int) and step_of <= step:
                kept.append(line + "\n")
        atomic.write_text(self.path, "".join(kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def source_notes(cfg: DistillConfig, sources: dict[str, ModelSource]) -> list[str]:
    """One line per model of the recipe that came from a GGUF file (`sources`, as resolved by
    `prepare`): its file, type and sha256."""
    notes = []
    for role in ("teacher", "student"):
        info = sources[role].gguf if role in sources else {}
        if info:
            notes.append(
                f"{role}: {info['file']} (GGUF {info['quantization']}, {info['architecture']}, "
                f"sha256 {info['sha256']})"
            )
    if cfg.teacher_adapter:
        notes.append(f"teacher adapter: {cfg.teacher_adapter} (merged into the teacher at load)")
    return notes


def _resume_notes(out: Path, step: int, changes: list[str]) -> list[str]:
    """The saved recipe's earlier resume notes, plus this resume's changes (the recipe records
    the run as it went, not only its last settings)."""
    old = out / RECIPE
    text = old.read_text(encoding="utf-8") if old.is_file() else ""
    earlier = [line[2:] for line in text.splitlines() if line.startswith("# resumed at step")]
    return earlier + [f"resumed at step {step} with {change}" for change in changes]


def train(
    cfg: DistillConfig,
    resume: bool = False,
    resume_hint: str | None = "rerun with --resume to continue",
) -> Path:
    """Run the recipe; return the output directory holding the final student. On Ctrl-C it saves
    a checkpoint, says where (and `resume_hint`) and raises `Interrupted`."""
    transformers.utils.logging.disable_progress_bar()
    keep_freed_memory()  # no page faults on every step's activations (see allocator.py)
    precision = _mixed_precision(cfg)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # A second run in one process (the demo, a notebook) with another precision: accelerate
        # would refuse its remembered state; start that state afresh (the process group stays).
        AcceleratorState._reset_state()
    # cpu=True without a GPU makes a multi-process launch use gloo on the CPU (MULTI_CPU).
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)
    out = Path(cfg.output)
    main = accelerator.is_main_process
    previous, changes = check_output(cfg, resume)  # before any model is loaded
    if resume and previous is None and main:
        print(f"no checkpoint in {out}; starting from scratch")
    if main:
        left = ckpt.remove_leftovers(out)
        if left:
            names = ", ".join(str(p) for p in left)
            print(f"removed {names}, left half-written by an interrupted run")
    s = prepare(cfg, accelerator)
    out.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "epoch": 0, "next_batch": 0, "tokens": 0, "pad": 0, "slots": 0}
    notes = source_notes(cfg, s.sources)
    if previous is not None:
        state.update(ckpt.load_checkpoint(accelerator, previous, s.scheduler))
        notes += _resume_notes(out, state["step"], changes)
        if main:
            print(f"resumed from {previous} (step {state['step']})")
            for change in changes:
                print(f"changed on resume: {change}")
    if main:
        save_config(cfg, out / RECIPE, notes)
    log = MetricsLog(out / "metrics.jsonl", main)
    log.keep_until(state["step"])
    _run_loop(s, state, log, out, resume_hint)
    return out


def _mixed_precision(cfg: DistillConfig) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if p == "bf16" else "no"


def on_policy_sampler(s: Setup) -> OnPolicySampler:
    """The student's sampler for on-policy steps, built from the run's setup."""
    cfg = s.cfg
    return OnPolicySampler(
        s.student,
        s.tokenizer,
        s.accelerator,
        s.prompt_rows,
        cfg.on_policy,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        max_length=cfg.data.max_length,
        source=cfg.data.train,
    )


def _run_loop(s: Setup, state: dict, log: MetricsLog, out: Path, resume_hint: str | None) -> None:
    acc, t = s.accelerator, s.cfg.train
    world, rank = acc.num_processes, acc.process_index
    batches = None
    if s.train_data is not None:  # None when on-policy training has prompt-only data
        batches = iter_batches(
            s.train_data, t.batch_size, t.seed, state["epoch"], state["next_batch"]
        )
    sampler = on_policy_sampler(s) if s.cfg.on_policy.fraction > 0 else None
    progress = TrainProgress(t.max_steps, state["step"], enabled=acc.is_main_process)
    s.loss_module.train()
    try:
        while state["step"] < t.max_steps:
            started = time.perf_counter()
            on_policy = sampler is not None and sampler.is_on_policy(state["step"])
            position = {}  # the data position after this step, recorded once it is applied
            if on_policy:  # the student's own answers to training prompts replace the data
                mine = sampler.micro_batches(state["step"], rank, world, t.grad_accum)
            else:
                drawn = [next(batches) for _ in range(t.grad_accum * world)]
                epoch, b, _ = drawn[-1]
                position = {"epoch": epoch, "next_batch": b + 1}
                mine = [
                    (ex, {k: v.to(acc.device) for k, v in collate(ex, s.pad_id).items()})
                    for _, _, ex in drawn[rank::world]
                ]
            local = sum(loss_positions(batch["labels"]).sum().item() for _, batch in mine)
            step_tokens = acc.reduce(torch.tensor(local, device=acc.device), "sum").item()
            # On the student's own samples CE would only reinforce them: the divergence alone (GKD).
            ce_weight = 0.0 if on_policy else s.ce_weight
            # DDP averages gradients over processes; the step loss is a sum over all of them.
            weights = [w * world for w in step_weights(ce_weight, step_tokens)]
            ce_tot = kd_tot = 0.0
            for i, (ex, batch) in enumerate(mine):
                sync = i == len(mine) - 1
                with nullcontext() if sync else acc.no_sync(s.loss_module):
                    loss, ce, kd = _loss(s.loss_module, batch, ex, s.teacher, weights)
                    acc.backward(loss)
                ce_tot, kd_tot = ce_tot + ce.item(), kd_tot + kd.item()
            sums = acc.reduce(torch.tensor([ce_tot, kd_tot], device=acc.device), "sum").tolist()
            loss_value = (ce_weight * sums[0] + (1 - ce_weight) * sums[1]) / max(step_tokens, 1)
            if not math.isfinite(loss_value):
                last = ckpt.latest_checkpoint(out)
                raise UserError(
                    f"loss is {loss_value} at step {state['step'] + 1}; stopped without applying "
                    f"it (last good checkpoint: {last or 'none'}); lower train.lr or check the data"
                )
            grad_norm = acc.clip_grad_norm_(s.loss_module.parameters(), t.max_grad_norm)
            s.optimizer.step()
            s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            state.update(position, step=state["step"] + 1)
            real = sum(int(batch["attention_mask"].sum()) for _, batch in mine)
            slots = sum(batch["attention_mask"].numel() for _, batch in mine)
            state.update(tokens=state["tokens"] + real, pad=state["pad"] + slots - real)
            state["slots"] += slots
            elapsed = time.perf_counter() - started
            record = {
                "step": state["step"],
                "loss": loss_value,
                "ce": sums[0] / max(step_tokens, 1),
                "lr": s.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": real * world / elapsed,
                "padding_fraction": state["pad"] / max(state["slots"], 1),
            }
            if s.teacher is not None:
                record["kd"] = sums[1] / max(step_tokens, 1)
            if sampler is not None:
                record["on_policy"] = on_policy
            progress.update(record)
            if state["step"] % t.log_every == 0 or state["step"] == t.max_steps:
                log.write(record)
            _maybe_eval_and_save(s, state, log, out, progress)
    except KeyboardInterrupt:
        progress.close()
        path = ckpt.save_checkpoint(acc, out, state["step"], state, t.keep_last, s.scheduler)
        if acc.is_main_process:
            hint = f"; {resume_hint}" if resume_hint else ""
            print(f"interrupted: checkpoint saved to {path}{hint}")
        raise Interrupted from None  # said: the CLI adds no second "interrupted"
    progress.close()
    _finish(s, state, log, out)


def _maybe_eval_and_save(s: Setup, state: dict, log, out: Path, progress) -> None:
    t, step = s.cfg.train, state["step"]
    if s.val_data and t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
        record = {"step": step, "split": "val", **evaluate_split(s, s.val_data, s.val_teacher)}
        log.write(record)
        progress.note(record)
    if t.save_every and step % t.save_every == 0 and step < t.max_steps:
        ckpt.save_checkpoint(s.accelerator, out, step, state, t.keep_last, s.scheduler)


def _finish(s: Setup, state: dict, log: MetricsLog, out: Path) -> None:
    acc = s.accelerator
    final_eval = {"step": state["step"], "split": "val"}
    if s.val_data:
        final_eval.update(evaluate_split(s, s.val_data, s.val_teacher))
        log.write(final_eval)
    ckpt.save_checkpoint(acc, out, state["step"], state, s.cfg.train.keep_last, s.scheduler)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.save_final_model(s.student, s.tokenizer, out)
        summary = {
            "steps": state["step"],
            "train_tokens": state["tokens"],
            "padding_fraction": state["pad"] / max(state["slots"], 1),
            "train_dropped_by_truncation": s.train_data.dropped if s.train_data else 0,
            **final_eval,
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        val = f"val CE {final_eval['val_ce']:.3f}, " if "val_ce" in final_eval else ""
        print(f"saved student to {out} ({val}padding {summary['padding_fraction']:.1%})")
        root = ckpt.checkpoint_root(out)
        kept = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(
            f"{root} keeps {kept / 2**20:,.0f} MB of checkpoints (optimizer state included), "
            f"needed only to --resume or extend this run; `rm -r {root}` frees them"
        )
    acc.wait_for_everyone()
