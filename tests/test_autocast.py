"""bf16 autocast on the CPU: the frozen head is cast once, attention runs in float32, and a bf16
training run still learns and saves a model that loads on its default attention."""

import json

import torch
from transformers import AutoModelForCausalLM

from chatdistill.distill.autocast import FP32_ATTENTION, FrozenHeadCast, use_fp32_attention
from chatdistill.distill.train import train

from conftest import distill_cfg


def test_frozen_head_is_cast_once_and_again_after_an_in_place_change():
    head = torch.nn.Linear(8, 32, bias=False).requires_grad_(False)
    cast = FrozenHeadCast()
    h = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = cast(head, "cpu")
        assert first is not head
        torch.testing.assert_close(first(h), head(h))  # what autocast itself computes
        kept = cast._weight
        cast(head, "cpu")
        assert cast._weight is kept  # no second cast
        with torch.no_grad():
            head.weight.mul_(2)  # a resume loads weights in place
        torch.testing.assert_close(cast(head, "cpu")(h), head(h))
        assert cast._weight is not kept


def test_head_is_left_alone_outside_autocast_or_when_it_trains():
    cast = FrozenHeadCast()
    frozen = torch.nn.Linear(8, 32, bias=False).requires_grad_(False)
    assert cast(frozen, "cpu") is frozen
    trained = torch.nn.Linear(8, 32, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cast(trained, "cpu") is trained  # autocast caches its cast itself


def test_fp32_attention_matches_sdpa_and_its_gradients(tiny_models):
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 12))
    results = []
    for fp32 in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
        assert not fp32 or use_fp32_attention(model)
        assert model.config._attn_implementation == (FP32_ATTENTION if fp32 else "sdpa")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=2e-2, atol=2e-2)  # bf16 rounding apart
    cos = torch.nn.functional.cosine_similarity(grad_a.flatten(), grad_b.flatten(), dim=0)
    assert cos > 0.98


def test_a_bf16_cpu_run_learns_and_saves_a_plain_model(tmp_path, tiny_models, chat_file):
    out = train(
        distill_cfg(
            tmp_path / "run",
            tiny_models["llama"],
            chat_file,
            **{"train.precision": "bf16", "train.freeze_embeddings": True, "loss.kind": "sft",
               "train.max_steps": 12, "train.log_every": 1, "train.lr": 3e-3},
        )
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    saved = json.loads((out / "config.json").read_text())
    assert FP32_ATTENTION not in json.dumps(saved)
    assert AutoModelForCausalLM.from_pretrained(out).config._attn_implementation == "sdpa"
