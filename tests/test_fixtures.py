from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_models_load_and_share_the_tokenizer(tiny_models):
    for arch, path in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.vocab_size == len(tok), arch
        assert tok.chat_template
