"""Linear weights packed for one input height: the same outputs at that height and any other."""

import copy

import pytest
import torch

from chatdistill.inference.engine import Engine
from chatdistill.inference.packed import PackedLinear, can_pack, pack_linears
from chatdistill.inference.speculative import attach_draft, detach_draft
from chatdistill.models import cut_student

pytestmark = pytest.mark.skipif(
    not can_pack(torch.nn.Linear(2, 2)), reason="MKL's packed kernels are not in this torch build"
)


@torch.no_grad()
def test_a_packed_model_gives_the_plain_models_logits_at_every_height(tiny_models):
    plain = Engine.load(str(tiny_models["llama"])).model
    packed = copy.deepcopy(plain)
    added = pack_linears(packed, 4)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert layers and not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert added >= sum(m.weight.numel() * 4 for m in layers)
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    for batch, length in [(1, 4), (2, 2), (1, 1), (1, 9), (2, 9)]:
        want = plain(input_ids=ids[:batch, :length]).logits
        got = packed(input_ids=ids[:batch, :length]).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    pack_linears(packed, 2)  # packed again for another height
    assert {m.rows for m in packed.modules() if isinstance(m, PackedLinear)} == {2}
    torch.testing.assert_close(
        packed(input_ids=ids[:1, :2]).logits, plain(input_ids=ids[:1, :2]).logits
    )


def test_a_packed_layer_trains_as_a_plain_one():
    linear = torch.nn.Linear(8, 3)
    packed = PackedLinear(linear, 2)
    x = torch.randn(2, 8)
    packed(x).sum().backward()  # gradients take the plain path
    assert linear.weight.grad is not None and packed.weight is linear.weight


def test_attaching_a_draft_packs_the_teacher_for_its_checks(tiny_models):
    teacher = Engine.load(str(tiny_models["llama"]))
    draft = Engine(cut_student(teacher.model, [0, 3]).eval(), teacher.tokenizer)
    attached = attach_draft(teacher, draft, 3)
    rows = {m.rows for m in teacher.model.modules() if isinstance(m, PackedLinear)}
    assert rows == {4} and attached.packed_bytes > 0
    head = teacher.model.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in draft.model.modules())
    detach_draft(teacher)
    assert teacher.draft is None
    assert not any(isinstance(m, PackedLinear) for m in teacher.model.modules())
    assert teacher.model.get_output_embeddings().weight is head.weight
