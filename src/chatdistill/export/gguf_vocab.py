"""A Hugging Face byte-level BPE tokenizer as llama.cpp's GGUF tokenizer metadata.

llama.cpp rebuilds the tokenizer from the vocabulary, the merges and a named pre-tokenizer (the
regex that splits text before BPE). A pre-tokenizer it does not know would silently split text
differently from the model's tokenizer, so, like llama.cpp's own converter, an unknown one is an
error rather than a guess.
"""

import json

import gguf

from chatdistill.errors import UserError

# The splitting regexes of the families llama.cpp names, as tokenizer.json spells them.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space", False)
        and step.get("use_regex", True) == use_regex
    )


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a tokenizer.json pre-tokenizer, or None.

    GPT-2's own regex inside ByteLevel is llama.cpp's "gpt-2"; with digits split one by one
    first it is "smollm"; a Split with the Qwen2 or Llama 3 regex before a plain ByteLevel is
    "qwen2" or "llama-bpe"."""
    if not pre:
        return None
    if _byte_level(pre, use_regex=True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits"):
        return "smollm" if _byte_level(second, use_regex=True) else None
    if first.get("type") == "Split" and first.get("behavior") == "Isolated":
        regex = (first.get("pattern") or {}).get("Regex")
        return _SPLITS.get(regex) if _byte_level(second, use_regex=False) else None
    return None


def add_tokenizer(
    writer: gguf.GGUFWriter, tokenizer, vocab_size: int, chat_template: str, where: str
) -> None:
    """Write `tokenizer` (a fast HF tokenizer) as `gpt2`-model GGUF metadata.

    The token list has exactly `vocab_size` entries (the embedding's rows): ids the tokenizer
    never produces become `[PADn]` tokens marked unused, as llama.cpp's converter writes them."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        kind = model.get("type") if model.get("type") != "BPE" else "BPE with this pre-tokenizer"
        raise UserError(
            f"{where}: the tokenizer ({kind}) is not one the GGUF export writes; it writes "
            "byte-level BPE tokenizers split like GPT-2, SmolLM, Qwen2 or Llama 3"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"{where}: the tokenizer has ids up to {max(vocab.values())} but the model's "
            f"vocab_size is {vocab_size}; pair the model with its own tokenizer"
        )
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if text not in added:
            types[i] = gguf.TokenType.NORMAL
        else:
            types[i] = gguf.TokenType.CONTROL if added[text] else gguf.TokenType.USER_DEFINED
    # Newer tokenizer.json files hold merges as pairs, older ones as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = [
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ]
    for add, token_id in special:
        if token_id is not None:
            add(token_id)
    # Whether the tokenizer itself puts BOS in front of text (llama.cpp then does the same).
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
    writer.add_add_space_prefix(False)  # byte-level BPE encodes spaces itself
    writer.add_chat_template(chat_template)
