"""Teacher cache: run the teacher once, store its top-k log-probs per loss position, train from it.

Layout of a cache directory (version 2):

    cache.json              settings, fingerprints, the shard plan and which shards are complete
    shard-00000.safetensors per example:  keys (E, 16) uint8; offsets (E+1,) int64 into the
                                          positions; slot_offsets (E+1,) int64 into the slots
                            per position: counts (P,) uint8 (uint16 when k > 255), the slots it
                                          keeps; ref (P,) float16, its largest log-prob (8-bit
                                          log-probs only)
                            per slot:     ids (S,) uint16 (int32 past 65,536 tokens);
                                          logprobs (S,) uint8 codes or float16

E examples, P loss positions (t such that token t+1 carries loss, in order, per example), S slots.
Example e owns positions offsets[e]:offsets[e+1] and slots slot_offsets[e]:slot_offsets[e+1];
position p's counts[p] slots follow each other, so an example is a memory-mapped slice of each
array. An example is found by a content key (a hash of its input_ids and labels), so the trainer's
own split and shuffling do not matter.

Which slots a position keeps (`sparse_targets`): of its top k-m tokens (m = tail samples) the
smallest prefix holding at least `min_mass` of their probability mass (at least one token; all of
them at min_mass 1), then its m tail samples; slots holding no mass (merged repeat draws, the cut
top tokens) are not stored. The reader pads each position back to k slots with log-prob -inf
(token id 0), which the loss treats as unused: the mass a position does not keep is part of its
tail bucket, 1 - Σ exp(kept), as the mass outside the top-k always was. Log-probs are at the
cache's temperature. 8-bit log-probs are codes below the position's largest log-prob,
logprob = ref - code/16 (code 255: -inf), each rounded up or down so that the kept mass, and so
the tail bucket, stays as close to the teacher's as the codes allow (error diffusion).

Version-1 caches (ids (P, k) and float16 logprobs (P, k) per shard, every position k slots) are
read as before; new caches are written as version 2.

Shards are read through memory maps; each is written to a temporary name, fsynced and renamed, and
`cache.json` lists it only afterwards, so a killed run resumes at the first incomplete shard and
never reads half a file.
"""

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from chatdistill import atomic
from chatdistill.config import DataConfig, LossConfig, TrainConfig, check_flag
from chatdistill.data import (
    Dataset,
    Example,
    build_dataset,
    collate,
    load_rows,
    loss_positions,
    require_references,
)
from chatdistill.distill.divergences import SparseLogprobs
from chatdistill.distill.fingerprints import teacher_fingerprint
from chatdistill.distill.outputs import refuse_model_dir
from chatdistill.distill.positions import hidden_at_loss_positions
from chatdistill.errors import UserError
from chatdistill.hashing import file_sha256
from chatdistill.models import (
    ModelSource,
    check_vocab,
    hidden_and_head,
    inference_dtype,
    load_model,
    load_tokenizer,
    resolve,
    tokenizer_fingerprint,
)
from chatdistill.progress import RateBar

FORMAT = "chatdistill-teacher-cache"
VERSION = 2
READABLE_VERSIONS = (1, 2)
META = "cache.json"
SHARD_POSITIONS = 1 << 19  # at most ~128 MiB per shard at k=64 with uint16 ids
MIN_MASS = 0.999  # share of the top tokens' mass each position keeps (see `sparse_targets`)
LOGPROB_BITS = 8
LOGPROB_STEP = 1 / 16  # nats per 8-bit code: part of the version-2 format
_UNUSED_CODE = 255  # the 8-bit code of log-prob -inf
_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "I64": np.int64, "F16": np.float16}
_KEY_BYTES = 16
_ARRAYS = {
    1: ("keys", "offsets", "ids", "logprobs"),
    2: ("keys", "offsets", "slot_offsets", "counts", "ids", "logprobs"),
}


def example_key(ex: Example) -> bytes:
    """Content key of a rendered example: 16 bytes of sha256 over its input_ids and labels."""
    h = hashlib.sha256(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
    h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
    return h.digest()[:_KEY_BYTES]


def id_dtype(vocab_size: int) -> type:
    """Smallest integer type that holds every token id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def count_dtype(top_k: int) -> type:
    """Smallest integer type that holds a position's number of slots."""
    return np.uint8 if top_k <= 255 else np.uint16 if top_k <= 65535 else np.int32


# ---------------------------------------------------------------------------------------- reading


def read_meta(cache_dir: str | Path) -> dict:
    p = Path(cache_dir) / META
    if not p.is_file():
        raise UserError(
            f"{cache_dir}: not a teacher cache (no {META}); "
            "build one with `chatdistill cache-teacher`"
        )
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: corrupt ({e.msg}); rebuild the cache with cache-teacher") from None
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise UserError(
            f"{p}: not a chatdistill teacher cache of version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}; rebuild it"
        )
    return meta


def decode_logprobs(codes: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Log-probs (n, k) float32 from 8-bit codes (n, k) below each row's ref (n,); 255 is -inf."""
    out = ref.astype(np.float32)[:, None] - codes.astype(np.float32) * np.float32(LOGPROB_STEP)
    out[codes == _UNUSED_CODE] = -np.inf
    return out


class Shard:
    """One shard file, its arrays memory-mapped after checking the header against the file size."""

    def __init__(self, path: Path):
        self.path = path
        redo = "delete it and rerun `chatdistill cache-teacher` with the same arguments"
        size = path.stat().st_size if path.is_file() else -1
        if size < 0:
            raise UserError(f"{path}: shard missing; {redo}")
        try:
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 + n:
                    raise ValueError("header runs past the end of the file")
                header = json.loads(f.read(n))
            self.version = 2 if "counts" in header else 1
            self.arrays = {}
            need = 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k[0] != "_")
            if size < need:
                raise ValueError(f"{size} bytes, expected {need}")
            names = _ARRAYS[self.version] + (("ref",) if "ref" in header else ())
            for name in names:
                spec = header[name]
                a, _ = spec["data_offsets"]
                shape = tuple(spec["shape"])
                dtype = _DTYPES[spec["dtype"]]
                self.arrays[name] = np.memmap(path, dtype, "r", offset=8 + n + a, shape=shape)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: truncated or corrupt shard ({e}); {redo}") from None
        self.keys = [bytes(k) for k in self.arrays["keys"]]
        offsets, ids = self.arrays["offsets"], self.arrays["ids"]
        ok = len(offsets) == len(self.keys) + 1
        if self.version == 1:
            ok = ok and offsets[-1] == ids.shape[0]
        else:
            slots, counts = self.arrays["slot_offsets"], self.arrays["counts"]
            ok = ok and len(slots) == len(offsets) and offsets[-1] == counts.shape[0]
            ok = ok and slots[-1] == ids.shape[0] == self.arrays["logprobs"].shape[0]
            eight_bit = self.arrays["logprobs"].dtype == np.uint8
            ok = ok and eight_bit == ("ref" in self.arrays)
            ok = ok and (not eight_bit or self.arrays["ref"].shape == counts.shape)
        if not ok:
            raise UserError(f"{path}: corrupt shard (offsets do not match the data); {redo}")

    def positions(self, e: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Example e's (ids (n, k) int64, logprobs (n, k) float32) for a cache of top-k; the slots
        a position does not keep have id 0 and log-prob -inf."""
        a, b = int(self.arrays["offsets"][e]), int(self.arrays["offsets"][e + 1])
        corrupt = UserError(
            f"{self.path}: corrupt shard (slot counts do not match the data); delete it and "
            "rerun `chatdistill cache-teacher` with the same arguments"
        )
        if self.version == 1:
            ids, lps = self.arrays["ids"][a:b], self.arrays["logprobs"][a:b]
            if ids.shape[1] != k:
                raise corrupt
            return ids.astype(np.int64), lps.astype(np.float32)
        sa, sb = int(self.arrays["slot_offsets"][e]), int(self.arrays["slot_offsets"][e + 1])
        counts = self.arrays["counts"][a:b].astype(np.int64)
        if b > a and (counts.min() < 1 or counts.max() > k or counts.sum() != sb - sa):
            raise corrupt
        kept = np.arange(k) < counts[:, None]
        ids = np.zeros((b - a, k), np.int64)
        ids[kept] = self.arrays["ids"][sa:sb]
        if "ref" not in self.arrays:
            lps = np.full((b - a, k), -np.inf, np.float32)
            lps[kept] = self.arrays["logprobs"][sa:sb]
        else:
            codes = np.full((b - a, k), _UNUSED_CODE, np.uint8)
            codes[kept] = self.arrays["logprobs"][sa:sb]
            lps = decode_logprobs(codes, self.arrays["ref"][a:b])
        return ids, lps


class CachedTeacher:
    """Teacher source reading top-k log-probs from a cache instead of running the teacher."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.vocab_size = meta["vocab_size"]
        missing = [s["file"] for s in meta["shards"] if s["file"] not in meta["completed"]]
        if missing:
            raise UserError(
                f"{path}: cache is incomplete ({len(missing)} of {len(meta['shards'])} shards "
                "missing); rerun `chatdistill cache-teacher` with the same arguments to finish it"
            )
        self.shards = [Shard(path / s["file"]) for s in meta["shards"]]
        self.index = {k: (i, e) for i, sh in enumerate(self.shards) for e, k in enumerate(sh.keys)}

    @classmethod
    def open(
        cls,
        path: str | Path,
        tokenizer,
        train_data: Dataset | None,
        *,
        temperature: float,
        max_length: int,
        teacher: str | ModelSource | None = None,
        data: str | None = None,
    ) -> "CachedTeacher":
        """Open the cache at `path` and refuse it unless it matches the recipe, saying why: its
        tokenizer, `temperature` (loss.temperature) and `max_length` (data.max_length), the
        `teacher` when one is given as a directory, and every conversation of `train_data` (read
        from `data`)."""
        path = Path(path)
        meta = read_meta(path)
        rebuild = "rebuild it with `chatdistill cache-teacher`"
        if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise UserError(
                f"{path}: cache was built with another tokenizer (fingerprint "
                f"{meta['tokenizer_fingerprint']}, this run's {tokenizer_fingerprint(tokenizer)}); "
                f"{rebuild} using this tokenizer's teacher"
            )
        if meta["temperature"] != temperature:
            raise UserError(
                f"{path}: cache holds log-probs at temperature {meta['temperature']} but "
                f"loss.temperature is {temperature}; set loss.temperature="
                f"{meta['temperature']} or {rebuild} --temperature {temperature}"
            )
        if meta["max_length"] != max_length:
            raise UserError(
                f"{path}: cache was built with max_length {meta['max_length']} but "
                f"data.max_length is {max_length}; set data.max_length="
                f"{meta['max_length']} or {rebuild} --max-length {max_length}"
            )
        if teacher:
            teacher = resolve(teacher, "teacher")
            fp = teacher_fingerprint(teacher)
            if fp != meta["teacher_fingerprint"]:
                raise UserError(
                    f"{path}: cache was built from another teacher ({meta['teacher']}, "
                    f"fingerprint {meta['teacher_fingerprint']}) than --teacher {teacher.arg} "
                    f"({fp}); pass the cache's teacher or {rebuild}"
                )
        cache = cls(path, meta)
        if train_data is not None:
            missing = cache.missing(train_data)
            if missing:
                raise UserError(
                    f"{path}: {missing} of {len(train_data.examples)} training conversations from "
                    f"{data} are not in the cache, built from {meta['data']} (sha256 "
                    f"{meta['dataset_sha256'][:12]}); {rebuild} --data {data}"
                )
        return cache

    def missing(self, dataset: Dataset) -> int:
        """How many of the dataset's examples the cache lacks."""
        return sum(example_key(ex) not in self.index for ex in dataset.examples)

    def covers(self, dataset: Dataset) -> bool:
        return self.missing(dataset) == 0

    def _lookup(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        found = self.index.get(example_key(ex))
        if found is None:
            raise UserError(f"{self.path}: a conversation is not in the cache; rebuild it")
        shard = self.shards[found[0]]
        ids, logprobs = shard.positions(found[1], self.meta["top_k"])
        bad_id = len(ids) and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0)
        if len(ids) != ex.n_loss_positions or bad_id:
            raise UserError(
                f"{shard.path}: corrupt shard (positions do not match the conversation); delete "
                "it and rerun `chatdistill cache-teacher` with the same arguments"
            )
        return ids, logprobs

    def targets(
        self, batch: dict[str, torch.Tensor], examples: list[Example]
    ) -> Callable[[slice], SparseLogprobs]:
        """Sparse targets for the batch's loss positions, row-major: ids (N, k), logprobs (N, k),
        with log-prob -inf (id 0) in the slots a position does not keep."""
        parts = [self._lookup(ex) for ex in examples]
        device = batch["input_ids"].device
        ids = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        logprobs = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        n = int(loss_positions(batch["labels"]).sum())
        if ids.shape[0] != n:
            raise UserError(f"{self.path}: cache has {ids.shape[0]} positions for a batch of {n}")
        sparse = SparseLogprobs(ids.to(device), logprobs.to(device))
        return lambda s: sparse[s]


# ---------------------------------------------------------------------------------------- writing


def _unique(examples: list[Example]) -> list[Example]:
    """The examples in data order with repeats (equal content keys) removed."""
    return list({example_key(ex): ex for ex in examples}.values())


def _plan(examples: list[Example], shard_positions: int) -> list[dict]:
    """Cut the examples into shards of about `shard_positions` loss positions each."""
    shards, start, count = [], 0, 0
    for i, ex in enumerate(examples):
        count += ex.n_loss_positions
        if count >= shard_positions or i == len(examples) - 1:
            shards.append({"file": f"shard-{len(shards):05d}.safetensors", "start": start})
            shards[-1].update(end=i + 1, positions=count)
            start, count = i + 1, 0
    return shards


def sparse_targets(
    logits: torch.Tensor,
    k: int,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
    min_mass: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse teacher targets from logits (already divided by the temperature) -> ids, logprobs
    (n, k).

    Without tail samples: the top-k log-probs; the loss treats the rest as one tail bucket.
    min_mass < 1 keeps of the top tokens only the smallest prefix holding min_mass of their mass
    (at least the first): the others get log-prob -inf, so their mass joins the tail bucket. A
    position drops at most 1 - min_mass of its probability that way, wherever its top-k stands.
    With m tail samples: the top k-m tokens exactly, plus m draws (with replacement) from the
    teacher's distribution over the other tokens, each draw carrying 1/m of their mass (repeated
    draws merged; the freed slots get log-prob -inf). The stored probabilities then sum to one
    and equal the teacher's in expectation, so the forward KL's gradient (and CE mixing) is
    unbiased for the full vocabulary, and the student learns the shape of the tail, not only its
    total (Anshumann et al. 2025, "Sparse Logit Sampling").
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k - tail_samples, dim=-1)
    values = top.values
    if min_mass < 1:
        p = values.exp()
        before = p.cumsum(-1) - p  # mass of the slots ahead of each one
        values = values.masked_fill(before >= min_mass * p.sum(-1, keepdim=True), float("-inf"))
    if tail_samples == 0:
        return top.indices, values
    # Tokens outside the top: their probabilities (a floor keeps all-zero rows drawable).
    rest = (logp.exp() + 1e-30).scatter(-1, top.indices, 0.0)
    mass = rest.sum(-1, keepdim=True)
    draws = torch.multinomial(rest, tail_samples, replacement=True, generator=generator)
    same = draws[:, :, None] == draws[:, None, :]
    earlier = torch.ones(tail_samples, tail_samples, dtype=torch.bool).tril(-1).to(draws.device)
    first = ~(same & earlier).any(-1)
    share = (mass * same.sum(-1) / tail_samples).log()
    logprobs = torch.where(first, share, torch.full_like(share, float("-inf")))
    return torch.cat([top.indices, draws], -1), torch.cat([values, logprobs], -1)


@torch.no_grad()
def _teacher_sparse(base, head, batch: dict, vocab: int, meta: dict, generator, chunk: int):
    """Sparse targets (see `sparse_targets`) for the batch's loss positions -> ids, logprobs."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    hidden = hidden_at_loss_positions(base, ids, mask, labels)  # (N, H)
    ids, lps = [], []
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk])[:, :vocab].float() / meta["temperature"]
        i, lp = sparse_targets(
            logits, meta["top_k"], meta["tail_samples"], generator, meta["min_mass"]
        )
        ids.append(i.cpu())
        lps.append(lp.cpu())
    return torch.cat(ids), torch.cat(lps)


def encode_logprobs(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of log-probs (n, k) -> ref (n,) float16, codes (n, k) uint8.

    ref is each row's largest log-prob and code c stands for ref - c·LOGPROB_STEP (254 at most,
    16 nats below ref); -inf is code 255. Going along the row, each value is rounded up or down,
    whichever keeps the running sum of the decoded probabilities closer to the true one, so the
    row's total, and with it the tail bucket the loss derives from it, stays right within about
    one step of the last slot's probability, where rounding each alone could push it past 1.
    """
    lps = logprobs.float()
    finite = torch.isfinite(lps)
    top = lps.max(-1).values
    ref = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).half()
    r = ref.float()
    d = ((r[:, None] - lps) / LOGPROB_STEP).clamp(0, _UNUSED_CODE - 1)
    lo, hi = d.floor(), d.ceil()
    p = lps.exp()
    codes = torch.empty_like(lps)
    carry = torch.zeros_like(r)  # decoded minus true mass so far
    for j in range(lps.shape[1]):
        q_lo = (r - lo[:, j] * LOGPROB_STEP).exp()
        q_hi = (r - hi[:, j] * LOGPROB_STEP).exp()
        up = (carry + q_lo - p[:, j]).abs() <= (carry + q_hi - p[:, j]).abs()
        codes[:, j] = torch.where(up, lo[:, j], hi[:, j])
        q = torch.where(up, q_lo, q_hi)
        carry = torch.where(finite[:, j], carry + q - p[:, j], carry)
    codes = codes.masked_fill(~finite, _UNUSED_CODE)
    return ref, codes.to(torch.uint8)


def pack_slots(
    ids: torch.Tensor, logprobs: torch.Tensor, vocab: int, logprob_bits: int
) -> dict[str, np.ndarray]:
    """Sparse targets (n, k), -inf in unused slots -> the per-position and per-slot arrays of a
    version-2 shard: counts (n,), ref (n,) (8-bit log-probs only), ids (S,), logprobs (S,).

    A position keeps its slots with a finite log-prob, in order (its first slot always)."""
    kept = torch.isfinite(logprobs)
    kept[:, :1] = True
    out = {
        "counts": kept.sum(-1).numpy().astype(count_dtype(ids.shape[1])),
        "ids": ids[kept].numpy().astype(id_dtype(vocab)),
    }
    if logprob_bits == 8:
        ref, codes = encode_logprobs(logprobs)
        out["ref"], out["logprobs"] = ref.numpy(), codes[kept].numpy()
    else:
        out["logprobs"] = logprobs[kept].numpy().astype(np.float16)
    return out


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    with atomic.replacing(path) as tmp:
        save_file(arrays, str(tmp), metadata={"format": FORMAT})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files readable by the owner only
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def _shard_ok(path: Path) -> bool:
    try:
        Shard(path)
    except UserError:
        return False
    return True


# What a cache is made from and how: a cache whose meta differs in any of these is another cache.
SETTINGS = ("teacher_fingerprint", "tokenizer_fingerprint", "dataset_sha256", "top_k")
SETTINGS += ("temperature", "tail_samples", "max_length", "shard_positions", "min_mass")
SETTINGS += ("logprob_dtype",)


def write_cache(
    teacher: str | ModelSource,
    data: str,
    output: str,
    top_k: int = 64,
    temperature: float = 1.0,
    tail_samples: int = 0,
    max_length: int = 512,
    batch_size: int = 8,
    shard_positions: int = SHARD_POSITIONS,
    device: str | None = None,
    progress: bool = True,
    teacher_adapter: str | None = None,
    min_mass: float = MIN_MASS,
    logprob_bits: int = LOGPROB_BITS,
    precision: str = "auto",
    replace_stale: bool = False,
) -> dict:
    """Run the teacher over the data once and write (or finish) the cache; return its metadata.
    A cache at `output` written with other settings is refused, or with `replace_stale` written
    again.

    Each position keeps the smallest prefix of its top tokens holding `min_mass` of their mass
    (1: all k; see `sparse_targets`), with log-probs in `logprob_bits` (8 or 16) bits. The
    teacher's weights are in `precision` ("auto": bf16 on a GPU that has it, else float32;
    "bf16" also on a CPU with native bf16, where it runs about 1.9x faster)."""
    teacher = resolve(teacher, "teacher", adapter=teacher_adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(precision, device)  # a bad name fails before anything loads
    if top_k < 1 or shard_positions < 1:
        raise UserError("--top-k and shard size must be at least 1")
    if not 0 < min_mass <= 1:
        raise UserError(f"--min-mass {min_mass}: must be above 0 and at most 1 (1 keeps all k)")
    if logprob_bits not in (8, 16):
        raise UserError(f"--logprob-bits {logprob_bits}: must be 8 or 16")
    # The recipe's ranges, so a cache is only written with settings a recipe can read it with.
    check_flag("--temperature", temperature, LossConfig, "temperature")
    check_flag("--max-length", max_length, DataConfig, "max_length")
    check_flag("--batch-size", batch_size, TrainConfig, "batch_size")
    if not 0 <= tail_samples < top_k:
        raise UserError(
            f"--tail-samples {tail_samples}: must be at least 0 and below --top-k ({top_k}); "
            "they take slots of the top-k"
        )
    out = Path(output)
    if not (out / META).is_file():  # an existing cache is resumed; nothing else is written over
        refuse_model_dir(out, "--output")
    elif (old_version := read_meta(out)["version"]) != VERSION:
        if not replace_stale:
            raise UserError(
                f"{out} holds a version-{old_version} cache, which distill still reads but "
                "cache-teacher no longer writes; choose a new --output or delete that directory"
            )
        print(f"{out} holds a version-{old_version} cache; writing it again")
        for p in [*out.glob("shard-*.safetensors"), out / META]:
            p.unlink()
    # What atomic.replacing left when the run was killed mid-write (`.NAME.tmp`).
    removed = sorted([*out.glob(".shard-*.safetensors.tmp"), *out.glob(f".{META}.tmp")])
    for p in removed:
        p.unlink()
    if removed:
        names = ", ".join(p.name for p in removed)
        print(f"removed {names} from {out}, left half-written by an interrupted run")
    tokenizer = load_tokenizer(teacher, "teacher")
    model = load_model(teacher, "teacher")
    vocab = check_vocab(tokenizer, tokenizer, model)
    if top_k > vocab:
        raise UserError(
            f"--top-k {top_k} is larger than the teacher's vocabulary ({vocab} tokens); "
            f"use --top-k {vocab} or less"
        )
    rows = load_rows(data)
    require_references(rows, data, "the teacher cache")
    dataset = build_dataset(rows, tokenizer, max_length, str(data))
    examples, dropped = _unique(dataset.examples), dataset.dropped
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher.arg,
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "teacher_source": teacher.record(),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "data": str(data),
        "dataset_sha256": file_sha256(data),
        "top_k": top_k,
        "temperature": temperature,
        "tail_samples": tail_samples,
        "max_length": max_length,
        "shard_positions": shard_positions,
        "id_dtype": np.dtype(id_dtype(vocab)).name,
        "min_mass": min_mass,
        "teacher_precision": precision,
        "logprob_dtype": "uint8" if logprob_bits == 8 else "float16",
        "examples": len(examples),
        "dropped_by_truncation": dropped,
        "tokens": sum(len(ex.input_ids) for ex in examples),
        "shards": _plan(examples, shard_positions),
        "completed": [],
    }
    if logprob_bits == 8:
        meta["logprob_step"] = LOGPROB_STEP
    if (out / META).is_file():
        old = read_meta(out)
        stale = next((key for key in SETTINGS if old.get(key) != meta[key]), None)
        if stale and not replace_stale:
            raise UserError(
                f"{out} holds a cache with another {stale} ({old.get(stale)} vs {meta[stale]}); "
                "choose a new --output or delete that directory"
            )
        if stale:
            print(f"{out} holds a cache with another {stale}; writing it again")
            for p in [*out.glob("shard-*.safetensors"), out / META]:
                p.unlink()
        else:
            meta["completed"] = [f for f in old["completed"] if _shard_ok(out / f)]
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out / META, json.dumps(meta, indent=1).encode())

    model = model.to(device, dtype=dtype).eval()
    base, head = hidden_and_head(model)
    pending = [s for s in meta["shards"] if s["file"] not in meta["completed"]]
    total = sum(len(ex.input_ids) for s in pending for ex in examples[s["start"] : s["end"]])
    bar = RateBar("teacher cache tokens", total, enabled=progress)
    try:
        for shard in pending:
            exs = examples[shard["start"] : shard["end"]]
            # Tail draws are seeded per shard, so a resumed run writes what an unbroken one would.
            gen = torch.Generator(device).manual_seed(meta["shards"].index(shard))
            arrays = _shard_arrays(exs, (base, head), tokenizer, vocab, meta, batch_size, gen, bar)
            _write_shard(out / shard["file"], arrays)
            meta["completed"].append(shard["file"])
            atomic.write_bytes(out / META, json.dumps(meta, indent=1).encode())
    finally:
        bar.close()
    return meta


def _shard_arrays(exs, model, tokenizer, vocab, meta, batch_size, gen, bar) -> dict:
    """Sparse teacher targets for one shard's examples, batched by length, in example order."""
    base, head = model
    device = gen.device
    order = sorted(range(len(exs)), key=lambda i: len(exs[i].input_ids))
    got: list = [None] * len(exs)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        chunk = [exs[i] for i in idx]
        batch = {n: t.to(device) for n, t in collate(chunk, tokenizer.pad_token_id).items()}
        ids, lps = _teacher_sparse(base, head, batch, vocab, meta, gen, 1024)
        packed = pack_slots(ids, lps, vocab, 8 if meta["logprob_dtype"] == "uint8" else 16)
        starts = np.concatenate([[0], np.cumsum(packed["counts"], dtype=np.int64)])
        positions = loss_positions(batch["labels"]).sum(1).tolist()
        for i, a, n in zip(idx, np.cumsum([0] + positions[:-1]), positions, strict=True):
            per_position = {k: v[a : a + n] for k, v in packed.items() if k in ("counts", "ref")}
            slot = slice(starts[a], starts[a + n])
            got[i] = {
                **per_position,
                "ids": packed["ids"][slot],
                "logprobs": packed["logprobs"][slot],
            }
        n_tokens = sum(len(ex.input_ids) for ex in chunk)
        bar.advance(n_tokens, n_tokens)
    sizes = [len(g["counts"]) for g in got]
    slots = [len(g["ids"]) for g in got]
    return {
        "keys": np.frombuffer(b"".join(example_key(ex) for ex in exs), np.uint8).reshape(-1, 16),
        "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "slot_offsets": np.concatenate([[0], np.cumsum(slots)]).astype(np.int64),
        **{k: np.concatenate([g[k] for g in got]) for k in got[0]},
    }
