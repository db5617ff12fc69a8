"""Export a model directory as one GGUF file for llama.cpp and Ollama, and the reader the export
check uses.

The file is laid out the way llama.cpp's own converter (`convert_hf_to_gguf.py`) writes the Llama
and Qwen2 families: its tensor names, `{arch}.*` hyperparameters, `general.file_type`, the
tokenizer and chat template (`gguf_vocab`). Llama's query and key rows are reordered for
llama.cpp's rotary embedding (it rotates adjacent pairs, Hugging Face rotates the two halves).
Matrices are stored at the chosen precision; norms and biases stay float32. The output folder
holds `model.gguf` and an Ollama `Modelfile` and is built under a temporary name, then renamed.

`check_gguf` reads the file back with transformers' GGUF loader, an implementation independent of
this writer, and compares its answers with the PyTorch model's (`check.run_check`).
"""

import json
from pathlib import Path

import gguf
import numpy as np

from chatdistill.errors import UserError
from chatdistill.export.check import ExportCheck, run_check
from chatdistill.export.folder import architecture, building, source_dir
from chatdistill.export.gguf_vocab import add_tokenizer

GGUF_NAME = "model.gguf"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
Q = gguf.GGMLQuantizationType
# --precision: the type of the matrices and the file type that announces it.
PRECISIONS = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Llama/Qwen2 parameter (`model.layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`), or None when the layout has no place for it."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    return None


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from halves (x0..x(d/2-1), x(d/2)..) to interleaved pairs, as
    llama.cpp's converter does for Llama's q and k projections. w (n_head * d, ...)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _config_problem(cfg, arch: str) -> str | None:
    """What in `cfg` llama.cpp's `arch` layout cannot express (None when nothing)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "per-layer"
    if rope_type != "default":
        return f"rope_type {rope_type!r} (rope scaling)"
    if cfg.hidden_act != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if arch == "llama" and (
        getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)
    ):
        return "attention_bias/mlp_bias"
    if arch == "qwen2" and getattr(cfg, "use_sliding_window", False):
        return "use_sliding_window"
    return None


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _add_hyperparameters(writer: gguf.GGUFWriter, cfg, name: str) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)


def _tensor_type(shape: tuple, precision: str, is_output: bool) -> gguf.GGMLQuantizationType:
    """The GGML type one tensor is stored in.

    Vectors (norms, biases) stay float32, as llama.cpp keeps them. At 4 bits the output layer
    (the tied embedding when there is no separate one) is stored at 8 bits, as llama-quantize
    keeps it at higher precision: its rounding error moves every next-token choice. A row whose
    length is not a whole number of quantisation blocks falls back to float16."""
    if len(shape) < 2:
        return Q.F32
    qtype = PRECISIONS[precision][0]
    if precision == "q4_0" and is_output:
        qtype = Q.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def _add_tensors(writer: gguf.GGUFWriter, model, arch: str, precision: str, where: str) -> None:
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    tied = bool(cfg.tie_word_embeddings)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = gguf_name(hf_name)
        if name is None:
            raise UserError(f"{where}: tensor {hf_name} has no place in llama.cpp's {arch} layout")
        data = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = rope_permute(data, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            data = rope_permute(data, kv_heads)
        is_output = name == "output.weight" or (tied and name == "token_embd.weight")
        qtype = _tensor_type(data.shape, precision, is_output)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def export_gguf(model_dir: str | Path, output: str | Path, precision: str = "q8_0") -> Path:
    """Write `model.gguf` and an Ollama `Modelfile` for `model_dir` in the new folder `output`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from chatdistill.export.modelfile import modelfile
    from chatdistill.models.tokenizer import CHATML_TEMPLATE

    if precision not in PRECISIONS:
        raise UserError(
            f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)} for gguf"
        )
    src = source_dir(model_dir)
    model_class = architecture(src)
    if model_class not in ARCHITECTURES:
        raise UserError(
            f"{model_dir}: {model_class} cannot be exported to GGUF; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[model_class]
    cfg = AutoConfig.from_pretrained(src)
    problem = _config_problem(cfg, arch)
    if problem:
        raise UserError(f"{model_dir}: {model_class} with {problem} cannot be exported to GGUF")
    out = Path(output).expanduser()
    # The output folder first: an unusable --output fails before the model is loaded.
    with building(out) as built:
        tokenizer = AutoTokenizer.from_pretrained(src)
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        template = template or CHATML_TEMPLATE
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        writer = gguf.GGUFWriter(built / GGUF_NAME, arch)
        try:
            _add_hyperparameters(writer, cfg, src.resolve().name)
            writer.add_file_type(PRECISIONS[precision][1])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_tokenizer(writer, tokenizer, cfg.vocab_size, template, str(model_dir))
            _add_tensors(writer, model, arch, precision, str(model_dir))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        (built / "Modelfile").write_text(modelfile(GGUF_NAME, src, tokenizer, template, cfg))
        (built / "chatdistill_export.json").write_text(
            json.dumps(
                {
                    "format": "gguf",
                    "precision": precision,
                    "source": str(src.resolve()),
                    "architecture": model_class,
                },
                indent=2,
            )
        )
    return out


class GgufReader:
    """A GGUF export read back by transformers' GGUF loader: tokenizer, chat template and
    weights all come from the file. It dequantises to float32, so its speed is PyTorch's, not
    llama.cpp's, and is not reported."""

    timed = False

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from chatdistill.inference.engine import Engine

        folder, name = str(path.parent), path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: transformers cannot read it as GGUF ({e})") from e
        self.engine = Engine(model.eval(), tokenizer, device="cpu")

    def answers(
        self, chats: list[list[dict]], prompts: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        from chatdistill.inference.engine import SamplingParams

        own = [self.engine.encode_chat(c) for c in chats]  # the file's template and vocabulary
        params = SamplingParams(max_new_tokens=max_new_tokens)
        return [c.token_ids for c in self.engine.generate(own, params, batch_size=1)]

    def agreement(self, prompt: list[int], answer: list[int]) -> int:
        import torch

        if not answer:
            return 0
        with torch.no_grad():
            logits = self.engine.model(torch.tensor([prompt + answer])).logits[0]
        predicted = logits[len(prompt) - 1 : -1].argmax(-1)
        return int((predicted == torch.tensor(answer)).sum())

    def decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)


def check_gguf(
    model_dir: str | Path,
    export_dir: str | Path,
    chats: list[list[dict]] | None = None,
    max_new_tokens: int = 48,
    answers: list[str | None] | None = None,
) -> ExportCheck:
    """Answer `chats` greedily with the model and with its GGUF export and compare them."""
    from chatdistill.evaluate.probes import weights_size
    from chatdistill.inference.engine import Engine

    if max_new_tokens < 1:
        raise UserError(f"--check-tokens {max_new_tokens}: must be at least 1")
    path = Path(export_dir) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{export_dir}: no {GGUF_NAME}; pass a folder written by --format gguf")
    engine = Engine.load(str(model_dir), device="cpu")
    reader = GgufReader(path)
    return run_check(
        engine,
        reader,
        weights_size(model_dir),
        path.stat().st_size,
        chats,
        max_new_tokens,
        answers,
    )
