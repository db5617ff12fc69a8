"""A speculative draft run by llama.cpp: the student's GGUF export proposes, the teacher checks.

On a CPU a draft is worth its cost only when it decodes several times faster than the teacher.
The student's own GGUF export (`chatdistill export --format gguf`, q4_0 or q8_0) decodes in
llama.cpp at 2-3.6x its PyTorch speed (BENCHMARKS.md), so `--draft-runtime llama.cpp` runs the
draft there (through `llama-cpp-python`) while the teacher stays in PyTorch and checks every
token: the answers are still the teacher's. Only the draft's next-token logits cross over; the
draft keeps its own KV cache in llama.cpp, cut back to the tokens the teacher kept.
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from chatdistill.errors import UserError

INSTALL = (
    "pip install llama-cpp-python (PyPI has its source only: it compiles llama.cpp, about 15-25 "
    "minutes on 2 cores)"
)


def cpu_has_amx() -> bool:
    """True on a CPU with AMX (Intel Sapphire Rapids and later)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextmanager
def without_extra_buffers(lib) -> Iterator[None]:
    """Load models without llama.cpp's extra CPU buffer types (AMX, repacked weights).

    On AMX CPUs llama.cpp puts q4_0/q8_0 weights in its AMX buffer, whose matrix multiply
    crashes the process on the first decode (measured here on a 2-vCPU Xeon with AMX; upstream
    ggml-org/llama.cpp#20824). The plain CPU buffer runs everywhere, a little slower (q4_0
    student: 9.0 ms a token). llama-cpp-python's `Llama` does not take `use_extra_bufts`; it
    reads `llama_model_default_params()` when it loads, so that is what is swapped here."""
    low = lib.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def load_llama(path: str, context_length: int, threads: int, logits_all: bool = False):
    """`llama_cpp.Llama` for the GGUF file at `path` on `threads` CPU threads, quietly (without
    the extra buffer types on an AMX CPU: `without_extra_buffers`)."""
    import llama_cpp

    with without_extra_buffers(llama_cpp) if cpu_has_amx() else nullcontext():
        return llama_cpp.Llama(model_path=path, n_ctx=context_length, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all,
                               verbose=False)  # fmt: skip


class LlamaCppDraft:
    """A GGUF file loaded by llama.cpp for drafting: `next_logits` feeds tokens at a position
    and returns the logits for the token after them. Everything the speculative decoder needs
    of a draft engine: `tokenizer`, `device`, `context_length`, `parameters`."""

    device = torch.device("cpu")

    def __init__(self, path: str, tokenizer, context_length: int, threads: int) -> None:
        try:
            import llama_cpp
        except ImportError:
            message = f"--draft-runtime llama.cpp needs llama-cpp-python: {INSTALL}"
            raise UserError(message) from None
        if not (Path(path).is_file() and path.endswith(".gguf")):
            raise UserError(
                f"--draft {path}: --draft-runtime llama.cpp takes a .gguf file (make one with "
                "chatdistill export STUDENT --format gguf)"
            )
        self._lib = llama_cpp
        try:
            self.llm = load_llama(path, context_length, threads)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"--draft {path}: llama.cpp cannot load it ({e})") from None
        self.tokenizer = tokenizer
        self.context_length = self.llm.n_ctx()
        self.vocab = self.llm.n_vocab()
        self.parameters = int(llama_cpp.llama_model_n_params(self.llm.model))

    def next_logits(self, feed: list[int], start: int) -> torch.Tensor:
        """Feed `feed` at positions start.. (dropping whatever the cache held from `start` on:
        the tokens the teacher rejected) and return the logits for the next token, (V,)."""
        self.llm.n_tokens = start  # eval() first cuts the KV cache back to n_tokens
        self.llm.eval(feed)
        row = np.ctypeslib.as_array(self._lib.llama_get_logits(self.llm.ctx), shape=(self.vocab,))
        return torch.from_numpy(row.copy())
