"""Two costs of bf16 autocast that training need not pay (measured on a CPU with AMX, where the
demo trains in bf16: bench/train_precision.py, 1.29x on the demo's step).

- Autocast casts a weight to bf16 at every use and caches the cast only for weights that take
  gradients. A frozen output head (the tied embedding, 28M values at a 49k vocabulary) was cast
  again for every loss chunk: 44 ms each time on one core. `FrozenHeadCast` keeps one cast copy
  while the weight is unchanged (56 MB more memory at that size).
- On the CPU, PyTorch's bf16 attention backward is 3-5x slower than its float32 one at a small
  model's shapes (18.7 ms against 3.5 ms per layer at 4 conversations of ~100 tokens).
  `use_fp32_attention` runs the student's attention in float32 there; it is a small share of the
  work, and the matrix multiplies around it stay in bf16.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FP32_ATTENTION = "chatdistill_sdpa_fp32"


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with float32 inputs and autocast off; output in the query's
    dtype."""
    dtype = query.dtype
    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), mask, **kwargs
        )
    return out.to(dtype), weights


AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32)
AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


def use_fp32_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model that uses SDPA attention to the float32 SDPA above; True when
    it did (a model on another attention implementation is left as it is)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(FP32_ATTENTION)
    return True


class FrozenHeadCast:
    """The output head as a function of hidden states, with a frozen linear head's weight cast to
    the autocast dtype once (and again only if the weight changes in place, as a resume's load
    does) instead of at every call."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None

    def __call__(self, head, device_type: str):
        """`head` itself, or a cheaper equivalent under autocast on `device_type`."""
        weight = getattr(head, "weight", None)
        frozen_linear = (
            isinstance(head, torch.nn.Linear)
            and head.bias is None
            and weight is not None
            and not weight.requires_grad
        )
        if not (frozen_linear and torch.is_autocast_enabled(device_type)):
            return head
        dtype = torch.get_autocast_dtype(device_type)
        key = (weight.data_ptr(), weight._version, dtype)
        if key != self._key:
            self._key, self._weight = key, weight.detach().to(dtype)
        cast = self._weight
        return lambda h: F.linear(h.to(dtype), cast)
