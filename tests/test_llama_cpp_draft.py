"""A draft that runs in llama.cpp (`--draft-runtime llama.cpp`): the teacher's answers token for
token, and one-line errors. The llama.cpp runs need llama-cpp-python, which compiles llama.cpp
on install (the `bench` extra); without it they are skipped, the errors are tested anyway."""

import importlib.util
import sys

import pytest

from chatdistill.cli import main
from chatdistill.errors import UserError
from chatdistill.export.gguf import GGUF_NAME, export_gguf
from chatdistill.inference import llama_cpp_draft
from chatdistill.inference.engine import Engine, SamplingParams
from chatdistill.inference.speculative import load_draft
from chatdistill.models import cut_student

from conftest import make_conversations

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)


@pytest.fixture(scope="module")
def gguf_draft(tiny_models, tmp_path_factory) -> str:
    """Two of the tiny Llama teacher's four layers, saved and exported to GGUF (f16)."""
    root = tmp_path_factory.mktemp("llama_cpp_draft")
    teacher = Engine.load(str(tiny_models["llama"]))
    cut_student(teacher.model, [0, 3]).save_pretrained(root / "cut")
    teacher.tokenizer.save_pretrained(root / "cut")
    return str(export_gguf(root / "cut", root / "gguf", "f16") / GGUF_NAME)


@needs_llama_cpp
@pytest.mark.parametrize("amx", [False, True], ids=["plain", "amx-cpu"])
def test_greedy_answers_with_a_llama_cpp_draft_are_the_teachers(
    tiny_models, gguf_draft, amx, monkeypatch
):
    # On an AMX CPU the draft loads without llama.cpp's extra buffer types (its AMX kernel
    # crashes there); the answers must not change either way.
    monkeypatch.setattr(llama_cpp_draft, "cpu_has_amx", lambda: amx)
    teacher = Engine.load(str(tiny_models["llama"]))
    prompts = [teacher.encode_chat(r["messages"][:-1]) for r in make_conversations(4, seed=3)]
    params = SamplingParams(max_new_tokens=16)
    alone = teacher.generate(prompts, params, batch_size=1)
    draft = load_draft(teacher, gguf_draft, 3, runtime="llama.cpp")
    got = teacher.generate(prompts, params, batch_size=1)
    for a, b in zip(alone, got, strict=True):
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
    drafted, accepted = draft.counts()
    assert drafted > 0 and accepted > 0  # the cut often agrees with its teacher
    # sampling draws from the draft's llama.cpp logits and still ends like the teacher's would
    sampled = teacher.generate(prompts, SamplingParams(12, temperature=1.0, seed=1), batch_size=1)
    assert all(0 < len(c.token_ids) <= 12 for c in sampled)


@needs_llama_cpp
def test_without_extra_buffers_swaps_the_load_defaults_and_puts_them_back():
    import llama_cpp

    low = llama_cpp.llama_cpp
    assert low.llama_model_default_params().use_extra_bufts
    with llama_cpp_draft.without_extra_buffers(llama_cpp):
        assert not low.llama_model_default_params().use_extra_bufts
    with pytest.raises(RuntimeError), llama_cpp_draft.without_extra_buffers(llama_cpp):
        raise RuntimeError("a failed load")
    assert low.llama_model_default_params().use_extra_bufts


def test_without_llama_cpp_python_the_runtime_is_one_line_naming_the_install(
    tiny_models, gguf_draft, monkeypatch
):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    teacher = Engine.load(str(tiny_models["llama"]))
    with pytest.raises(UserError, match="needs llama-cpp-python: pip install llama-cpp-python"):
        load_draft(teacher, gguf_draft, 3, runtime="llama.cpp")


@needs_llama_cpp
def test_llama_cpp_draft_must_be_a_gguf_file(tiny_models):
    teacher = Engine.load(str(tiny_models["llama"]))
    with pytest.raises(UserError, match="takes a .gguf file"):
        load_draft(teacher, str(tiny_models["llama"]), 3, runtime="llama.cpp")


def test_cli_int8_with_llama_cpp_is_one_line_and_exit_2(tiny_models, gguf_draft, capsys):
    args = ["chat", str(tiny_models["llama"]), "--draft", gguf_draft]
    code = main([*args, "--draft-runtime", "llama.cpp", "--draft-int8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--draft-int8 quantizes a PyTorch draft" in err
