"""Speculative decoding: a small draft model proposes tokens, the teacher checks them at once.

A distilled student agrees with its teacher most of the time, which is what makes it a good draft.
Each step the draft proposes k tokens one by one (cheap), the teacher scores all of them in one
forward over k + 1 positions (about the cost of one decoding step while decoding is memory-bound),
and the proposals are kept up to the first one the teacher would not have produced, followed by one
token from the teacher. The answer is the teacher's: token for token under greedy decoding, and in
distribution under sampling (Leviathan et al. 2023; Chen et al. 2023): a drafted x is kept with
probability min(1, p(x) / q(x)), the first rejected one is replaced by a draw from
norm(max(0, p - q)), and when all k are kept one more token comes from p. p and q are the teacher's
and the draft's distributions after the request's temperature, top-k and top-p, filtered by the
engine's own sampler code.

Speculation runs while one sequence is decoding (batch 1: a step is memory-bound there and the
teacher's spare compute is free); with several rows the engine's batched step runs as before.
`DecodeBatch.step` makes that choice. Both models keep their KV caches: after each step the rejected
positions are cropped off, and the draft's cache catches up on tokens it missed while the batch was
larger. A row that will decode alone has its prompt read by the draft during prefill, and the draft
keeps its cache from row to row, so a prompt that shares a beginning with the last one (a system
prompt, the earlier turns of a chat) is read only from where they part.
"""

from __future__ import annotations

import torch

from chatdistill.errors import UserError
from chatdistill.inference.engine import (
    DecodeBatch,
    Engine,
    SamplingParams,
    Sequence,
    _filtered_probs,
    cache_argument,
)
from chatdistill.inference.kv_cache import GrowingCache
from chatdistill.inference.llama_cpp_draft import LlamaCppDraft
from chatdistill.models import check_vocab, count_parameters, load_pretrained, load_tokenizer

DEFAULT_DRAFT_TOKENS = 6
# A draft stops proposing after a token it gives less than this probability: the teacher keeps
# such tokens less often, and the round's check comes sooner. Measured on the demo (k = 6, q4_0
# draft in llama.cpp): 0.7 took acceptance from 66% to 85% and speed from 1.49x to 1.64x.
MIN_CONFIDENCE = 0.7
DRAFT_RUNTIMES = ("torch", "llama.cpp")


class Draft:
    """A draft model attached to a teacher engine (as `teacher.draft`): the most tokens it proposes
    per step (it stops sooner after a token it gives less than `min_confidence`), and running
    counts of the tokens it proposed and the teacher accepted."""

    def __init__(self, teacher: Engine, engine: Engine | LlamaCppDraft, tokens: int) -> None:
        self.teacher = teacher
        self.engine = engine
        self.tokens = tokens
        self.drafted = 0
        self.accepted = 0
        self.min_confidence = MIN_CONFIDENCE
        self._decoder: SpeculativeDecoder | None = None

    def counts(self) -> tuple[int, int]:
        """(drafted, accepted) tokens so far."""
        return self.drafted, self.accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def decoder(self) -> SpeculativeDecoder:
        """The draft's decoder (one per draft: it holds the draft's cache, which batches share
        from one lone row to the next)."""
        if self._decoder is None:
            self._decoder = SpeculativeDecoder(self)
        return self._decoder


def attach_draft(
    teacher: Engine,
    draft: Engine | LlamaCppDraft,
    tokens: int = DEFAULT_DRAFT_TOKENS,
    name: str = "the draft model",
) -> Draft:
    """Make `teacher` decode speculatively with `draft` whenever one sequence is running.

    Raises `UserError` (naming `name`) when the draft cannot serve: fewer than one draft token, a
    tokenizer other than the teacher's, or more parameters than the teacher.
    """
    if tokens < 1:
        raise UserError(f"--draft-tokens {tokens}: must be at least 1")
    model = None if isinstance(draft, LlamaCppDraft) else draft.model
    try:
        check_vocab(teacher.tokenizer, draft.tokenizer, teacher.model, model)
    except UserError as e:
        raise UserError(f"{name} cannot serve as this teacher's draft: {e}") from None
    n_draft = draft.parameters if model is None else count_parameters(model)
    n_teacher = count_parameters(teacher.model)
    if n_draft > n_teacher:
        raise UserError(
            f"{name} has {n_draft:,} parameters, more than the teacher's {n_teacher:,}; a draft "
            "only speeds decoding up when it is smaller: pass a student of this teacher"
        )
    if model is not None:
        model.to(teacher.device)  # draft and teacher tensors meet in every step
        draft.device = teacher.device
    teacher.draft = Draft(teacher, draft, tokens)
    return teacher.draft


def load_draft(
    teacher: Engine,
    path: str,
    tokens: int = DEFAULT_DRAFT_TOKENS,
    int8: bool = False,
    runtime: str = "torch",
) -> Draft:
    """Load the draft at `path` (directory, GGUF file or `hf:` id) on the teacher's device and in
    its dtype, and attach it (`attach_draft`). A wrong tokenizer fails before the weights load.
    With `int8` (CPU only) its linear layers run as dynamic int8 (`int8_linears`). With
    `runtime="llama.cpp"` (CPU only) the GGUF file at `path` drafts in llama.cpp
    (`LlamaCppDraft`), at the teacher's thread count."""
    if tokens < 1:
        raise UserError(f"--draft-tokens {tokens}: must be at least 1")
    if runtime not in DRAFT_RUNTIMES:
        raise UserError(f"--draft-runtime {runtime!r}: use one of {', '.join(DRAFT_RUNTIMES)}")
    if (int8 or runtime != "torch") and teacher.device.type != "cpu":
        what = "--draft-int8" if int8 else f"--draft-runtime {runtime}"
        raise UserError(f"{what} runs on a CPU only; the teacher is on {teacher.device}")
    if int8 and runtime != "torch":
        raise UserError(
            "--draft-int8 quantizes a PyTorch draft; with --draft-runtime llama.cpp pick the GGUF "
            "file's precision instead (chatdistill export --format gguf --precision q4_0)"
        )
    try:
        tokenizer = load_tokenizer(path, "--draft")
        check_vocab(teacher.tokenizer, tokenizer)
    except UserError as e:
        raise UserError(f"--draft {path} cannot serve as this teacher's draft: {e}") from None
    if runtime == "llama.cpp":
        engine = LlamaCppDraft(path, tokenizer, teacher.context_length, torch.get_num_threads())
        return attach_draft(teacher, engine, tokens, name=f"--draft {path}")
    dtype = next(teacher.model.parameters()).dtype
    model, tokenizer, _ = load_pretrained(path, "--draft", dtype=dtype, device=teacher.device)
    draft = attach_draft(teacher, Engine(model.eval(), tokenizer), tokens, name=f"--draft {path}")
    if int8:  # after attach_draft's checks, which count the float parameters
        draft.engine.model = int8_linears(draft.engine.model)
    return draft


def int8_linears(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every `nn.Linear` (the output head included) replaced by a dynamic int8
    one: int8 weights, activations quantized per call. A batch-1 draft step on a CPU is bound by
    reading weights, and these are a quarter of float32's bytes. The teacher still checks every
    drafted token, so the answers stay the teacher's; only how often drafts are accepted moves."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice; the kernels are current
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)


class SpeculativeDecoder:
    """Speculative steps for a `DecodeBatch` while it holds a single unpadded row. Keeps the
    draft's KV cache and the tokens it holds (`_tokens`) from one row to the next: a new row
    reuses the part of its context it shares with them (a system prompt, the earlier turns of
    the same chat), and the tokens the teacher rejected are dropped when the next step begins."""

    def __init__(self, draft: Draft) -> None:
        self.draft = draft
        self.llama_cpp = isinstance(draft.engine, LlamaCppDraft)  # it keeps its own cache
        self.model = None if self.llama_cpp else draft.engine.model
        self.cache_arg = None if self.llama_cpp else cache_argument(self.model)
        # Drafts are scored in the teacher's vocabulary (its logits' width).
        self.width = draft.teacher.model.get_output_embeddings().weight.shape[0]
        self._cache = None if self.llama_cpp else GrowingCache()
        self._tokens: list[int] = []

    def prefill(self, prompt_ids: list[int]) -> None:
        """Let the draft read a prompt whose row is about to decode alone, while the teacher
        prefills it: the prompt is prefill work, and the first speculative step then feeds the
        draft one token, not the whole prompt."""
        if len(prompt_ids) < self.draft.engine.context_length:
            self._forward(self._catch_up(prompt_ids))

    def step(self, batch: DecodeBatch) -> list[str]:
        """Draft, verify and keep tokens for the batch's only row; returns [its new text] as
        `DecodeBatch.step` does. Kept tokens go through `Sequence.accept` one by one, so EOS, stop
        strings and max_new_tokens end the run where they fall."""
        seq = batch.seqs[0]
        context = seq.prompt_ids + seq.token_ids  # ends with batch.pending, not yet in the cache
        start = int(batch.positions[0])
        assert start == len(context) - 1, "the batch's row and its sequence disagree"
        greedy = seq.params.temperature == 0
        drafted, q = self._propose(
            self._catch_up(context),
            self._draft_length(seq, len(context)),
            seq.params,
            seq.generator,
            greedy,
        )
        k = len(drafted)
        out = batch.model(
            input_ids=torch.tensor([[context[-1], *drafted]], device=batch.device),
            position_ids=torch.arange(start, start + k + 1, device=batch.device)[None],
            **{batch.cache_arg: batch.cache},
            use_cache=True,
        )
        logits = out.logits[0].float()  # (k + 1, V)
        if greedy:
            target = logits.argmax(dim=-1).tolist()
            n = 0
            while n < k and drafted[n] == target[n]:
                n += 1
            tokens = [*drafted[:n], target[n]]
        else:
            tokens = accept_drafted(filtered_probs(logits, seq.params), q, drafted, seq.generator)
        self.draft.drafted += k
        self.draft.accepted += len(tokens) - 1

        text = ""
        for token in tokens:
            text += seq.accept(token)
            if seq.finish_reason is not None:
                return [text]
        kept = start + len(tokens)  # the pending token and the accepted drafts
        batch.cache.crop(kept - (start + k + 1))
        batch.positions = batch.positions.new_full((1,), kept)
        batch.mask = batch.mask.new_ones((1, kept))
        batch.pending = batch.pending.new_tensor([tokens[-1]])
        return [text]

    def _catch_up(self, context: list[int]) -> list[int]:
        """Cut the draft's cache back to the longest prefix it shares with `context` (at most
        all but its last token, whose logits are wanted) and return the tokens to feed it."""
        held = self._tokens
        n = min(len(held), len(context) - 1)
        if held[:n] != context[:n]:
            n = next(i for i, (a, b) in enumerate(zip(held, context)) if a != b)
        if n < len(held):
            if self._cache is not None:  # (llama.cpp cuts its own when fed at position n)
                self._cache.crop(n - len(held))
            del held[n:]
        return context[n:]

    def _draft_length(self, seq: Sequence, length: int) -> int:
        """Tokens to draft for a context of `length`: a step yields up to k + 1 tokens, which
        must fit the answer's budget, and the positions fed must fit both models' contexts."""
        teacher = self.draft.teacher
        budget = min(len(seq.prompt_ids) + seq.params.max_new_tokens, teacher.context_length)
        draft_room = self.draft.engine.context_length - length + 1
        return max(0, min(self.draft.tokens, budget - length - 1, draft_room))

    def _propose(
        self,
        feed: list[int],
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        greedy: bool,
    ) -> tuple[list[int], torch.Tensor | None]:
        """Draft up to k tokens after the draft's context and `feed` (what it has not read of the
        row's context, at least the pending token), stopping after one the draft gives less than
        `min_confidence`; returns them and, when sampling, q (one row per token, V): the filtered
        distributions they were drawn from (None under greedy decoding). Where to stop depends
        on the draft alone, so the accepted tokens still follow the teacher's distribution."""
        drafted: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            logits = self._forward(feed)
            if greedy:
                drafted.append(int(logits.argmax()))
                sure = float(torch.softmax(logits, -1)[drafted[-1]])
            else:
                rows.append(filtered_probs(logits[None], params)[0])
                drafted.append(_draw(rows[-1], generator))
                sure = float(rows[-1][drafted[-1]])
            feed = drafted[-1:]
            if sure < self.draft.min_confidence:
                break
        return drafted, torch.stack(rows) if rows else None

    def _forward(self, feed: list[int]) -> torch.Tensor:
        """Feed tokens to the draft; returns its logits for the next one (V,), in the teacher's
        vocabulary: columns the teacher lacks are cut, columns the draft lacks get -inf."""
        start = len(self._tokens)
        self._tokens.extend(feed)
        if self.llama_cpp:
            logits = self.draft.engine.next_logits(feed, start)[: self.width]
        else:
            device = self.draft.engine.device
            out = self.model(
                input_ids=torch.tensor([feed], device=device),
                position_ids=torch.arange(start, start + len(feed), device=device)[None],
                **{self.cache_arg: self._cache},
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[0, -1, : self.width].float()
        missing = self.width - logits.shape[0]
        if missing > 0:
            logits = torch.cat([logits, logits.new_full((missing,), -torch.inf)])
        return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's distribution for float `logits` (N, V) under `params` (temperature > 0):
    tempered, top-k and top-p filtered as `engine.sample_next` does -> probs (N, V)."""
    n = logits.shape[0]
    probs, order = _filtered_probs(
        logits / params.temperature, [params.top_k] * n, [params.top_p] * n
    )
    return probs if order is None else torch.zeros_like(probs).scatter_(1, order, probs)


def accept_drafted(
    p: torch.Tensor, q: torch.Tensor, drafted: list[int], generator: torch.Generator | None = None
) -> list[int]:
    """Speculative sampling: which tokens to emit, given `drafted` (k tokens, drafted[i] drawn from
    q[i]) and the teacher's distributions p.

    p (k + 1, V): the teacher's at each drafted position and at the one after; q (k, V): the
    draft's. drafted[i] is kept with probability min(1, p[i, x] / q[i, x]) until the first
    rejection, which is replaced by a draw from norm(max(0, p[i] - q[i])); when all k are kept, a
    bonus token is drawn from p[k]. Every emitted token is then distributed as p. Returns 1 to
    k + 1 tokens.
    """
    k = len(drafted)
    if k:
        rows = torch.arange(k, device=p.device)
        x = torch.tensor(drafted, device=p.device)
        u = torch.rand(k, device=p.device, generator=generator)
        # u < p/q, written without the division (q(x) > 0: x was drawn from q)
        rejected = (u * q[rows, x] >= p[rows, x]).tolist()
        if any(rejected):
            i = rejected.index(True)
            residual = (p[i] - q[i]).clamp_(min=0)
            # p and q equal to float precision leave no residual mass: then p itself is right.
            return [*drafted[:i], _draw(residual if residual.sum() > 0 else p[i], generator)]
    return [*drafted, _draw(p[k], generator)]


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs` (V,) (need not sum to 1), by inverse CDF with one uniform number."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(1, device=probs.device, generator=generator)
    col = torch.searchsorted(cdf, u * cdf[-1], right=True)
    return int(col.clamp_(max=probs.shape[-1] - 1))
