"""An Ollama Modelfile for a GGUF export, so `ollama create NAME -f Modelfile` in its folder runs
the model with its own chat format, stop tokens and sampling defaults.

Ollama templates are Go templates. Rather than parse the Jinja chat template, this renders it on
one-message chats with a marker as the content: when every role comes out in one shape
(`<|im_start|>{role}\\n{content}<|im_end|>\\n` for ChatML) and a conversation is just its messages
in a row plus the generation prompt, that shape becomes a `range .Messages` loop. Templates that
do more (a default system prompt, role-specific layouts) get no TEMPLATE line: Ollama then picks
a template from the chat template stored in the GGUF file.
"""

from pathlib import Path

_MARK = "\ue000"  # a private-use character: in no template's own text
_ROLES = ("system", "user", "assistant")


def go_template(tokenizer, chat_template: str) -> str | None:
    """`chat_template` as an Ollama Go template, or None when it is not one shape per message."""

    def render(messages: list[dict], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=generation,
        )

    try:
        pieces = {r: render([{"role": r, "content": _MARK}]) for r in _ROLES}
        everything = render([{"role": r, "content": _MARK} for r in _ROLES], generation=True)
        prompted = render([{"role": "user", "content": _MARK}], generation=True)
    except Exception:  # templates may refuse such chats (raise_exception); then there is no shape
        return None
    shapes = {pieces[r].replace(r, "{{ .Role }}") for r in _ROLES}
    generation = prompted[len(pieces["user"]) :]
    if (
        len(shapes) != 1
        or not prompted.startswith(pieces["user"])
        or everything != "".join(pieces[r] for r in _ROLES) + generation
        or any("{{" in p or "}}" in p for p in (*pieces.values(), generation))
    ):
        return None
    (shape,) = shapes
    if shape.count(_MARK) != 1:
        return None
    loop = shape.replace(_MARK, "{{ .Content }}")
    return "{{ range .Messages }}" + loop + "{{ end }}" + generation


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(gguf_name: str, model_dir: Path, tokenizer, chat_template: str, config) -> str:
    """The Modelfile text: FROM, TEMPLATE (where it translates), stop tokens, PARAMETERs."""
    from transformers import GenerationConfig

    lines = [f"FROM ./{gguf_name}"]
    template = go_template(tokenizer, chat_template)
    if template is None:
        lines.append("# no TEMPLATE: Ollama reads the chat template stored in the GGUF file")
    else:
        lines.append(f'TEMPLATE """{template}"""')
    generation = (
        GenerationConfig.from_pretrained(model_dir)
        if (model_dir / "generation_config.json").is_file()
        else None
    )
    eos = {tokenizer.eos_token_id}
    eos_ids = getattr(generation, "eos_token_id", None)
    eos.update(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    for token_id in sorted(i for i in eos if i is not None):
        lines.append(f"PARAMETER stop {_quoted(tokenizer.convert_ids_to_tokens(token_id))}")
    lines.append(f"PARAMETER num_ctx {config.max_position_embeddings}")
    # Sampling defaults the model ships with (only those it sets; Ollama's own otherwise).
    chosen = generation.to_diff_dict() if generation is not None else {}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}
    names["repetition_penalty"] = "repeat_penalty"
    for hf, ollama in names.items():
        if chosen.get(hf) is not None:
            lines.append(f"PARAMETER {ollama} {chosen[hf]}")
    return "\n".join(lines) + "\n"
