"""On-policy distillation (GKD, Agarwal et al. 2024): the student's own answers to training prompts.

On a seeded share of steps the trainer swaps the step's micro-batches for the student's answers to
training prompts; the live teacher then scores every sampled token. Every random choice is keyed by
(seed, step), so a resumed run samples exactly what an uninterrupted one would have.
"""

import random

import torch
from accelerate import Accelerator

from chatdistill.config import OnPolicyConfig
from chatdistill.data import (
    IGNORE,
    Example,
    collate,
    render_example,
    render_prompt,
    split_prompt_reference,
)
from chatdistill.errors import UserError
from chatdistill.inference.engine import Engine, SamplingParams


def seeded_rng(*parts: object) -> random.Random:
    """A generator seeded by the parts' string form (str seeds hash stably across runs)."""
    return random.Random(":".join(str(p) for p in parts))


def is_on_policy_step(fraction: float, seed: int, step: int) -> bool:
    """Whether optimizer step `step` (0-based) trains on student samples; a function of its args."""
    return fraction > 0 and seeded_rng(seed, step, "on-policy").random() < fraction


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (e.g. <|im_end|>)."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ex = render_example(tokenizer, msgs, 1 << 16)
    return [label for label in ex.labels if label != IGNORE][-1]


def sampled_example(prompt_ids: list[int], answer_ids: list[int], end_id: int | None) -> Example:
    """prompt + sampled answer (+ end-of-turn when generated), loss on the answer tokens only."""
    answer = answer_ids + ([end_id] if end_id is not None else [])
    return Example(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)


class OnPolicySampler:
    """Samples the student's answers to training prompts for the trainer's on-policy steps.

    `settings` are the recipe's on_policy section; `seed` (train.seed) keys every draw,
    `batch_size` (train.batch_size) is per micro-batch, and no sample runs past `max_length`
    (data.max_length) tokens. `source` names the prompts' file in errors.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        tokenizer,
        accelerator: Accelerator,
        prompt_rows: list[dict],
        settings: OnPolicyConfig,
        *,
        seed: int,
        batch_size: int,
        max_length: int,
        source: str | None,
    ) -> None:
        self.accelerator, self.pad_id = accelerator, tokenizer.pad_token_id
        self.settings, self.seed, self.batch_size = settings, seed, batch_size
        self.engine = Engine(student, tokenizer)
        self.end_id = end_of_turn_id(tokenizer)
        limit = min(max_length, self.engine.context_length)
        prompts = [
            render_prompt(tokenizer, split_prompt_reference(r["messages"])[0]) for r in prompt_rows
        ]
        # A prompt needs room for one answer token and the end-of-turn token.
        self.prompts = [p for p in prompts if len(p) + 2 <= limit]
        self.limit = limit
        if not self.prompts:
            raise UserError(
                f"{source}: on-policy training found no prompt shorter than "
                f"data.max_length={max_length} (minus 2 answer tokens); give prompts or "
                "raise data.max_length"
            )

    def is_on_policy(self, step: int) -> bool:
        return is_on_policy_step(self.settings.fraction, self.seed, step)

    def micro_batches(self, step: int, rank: int, world: int, n_micro: int) -> list:
        """This process's `n_micro` micro-batches of fresh student samples, as [(examples, batch)].

        All processes draw the same prompts and seeds for the step; micro-batch m of rank r takes
        slot m·world + r, as the off-policy path does.
        """
        bs, op = self.batch_size, self.settings
        rng = seeded_rng(self.seed, step, "prompts")
        total = n_micro * world * bs
        picks = [(rng.randrange(len(self.prompts)), rng.getrandbits(62)) for _ in range(total)]
        slots = [
            picks[(m * world + rank) * bs : (m * world + rank + 1) * bs] for m in range(n_micro)
        ]
        flat = [p for slot in slots for p in slot]
        prompts = [self.prompts[i] for i, _ in flat]
        params = [
            SamplingParams(
                max_new_tokens=min(op.max_new_tokens, self.limit - len(p) - 1),
                temperature=op.temperature,
                top_p=op.top_p,
                seed=s,
            )
            for p, (_, s) in zip(prompts, flat, strict=True)
        ]
        with self.accelerator.autocast():
            done = self.engine.generate(prompts, params, batch_size=len(prompts))
        examples = [
            sampled_example(
                c.prompt_ids, c.token_ids, self.end_id if c.finish_reason == "stop" else None
            )
            for c in done
        ]
        device = self.accelerator.device
        out = []
        for m in range(n_micro):
            exs = examples[m * bs : (m + 1) * bs]
            out.append((exs, {k: v.to(device) for k, v in collate(exs, self.pad_id).items()}))
        return out
