"""Linear layers whose weights are pre-packed for one input height (CPU, float32, MKL).

A teacher checking a draft runs k + 1 positions through every linear layer. On a CPU, MKL's
general matrix multiply repacks the whole weight on each such call, so 4 rows cost 1.5x one row
(bench/speculative_speed.py); with the weight packed once for that height, they cost about one
row's time, as they should while decoding is bound by reading weights. `pack_linears` swaps each
`nn.Linear` for a `PackedLinear` that takes the packed path at its height and the plain one at any
other (prefill, batched decoding): same results, to float rounding. The packed copy is extra
memory, one more copy of the linear weights.
"""

import torch
import torch.nn.functional as F


def can_pack(model: torch.nn.Module) -> bool:
    """Whether `pack_linears` applies: a float32 model on a CPU with MKL's packed kernels."""
    param = next(model.parameters(), None)
    return (
        param is not None
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


class PackedLinear(torch.nn.Module):
    """An inference-only `nn.Linear` (sharing its weight and bias) with the weight also packed
    by MKL for inputs of `rows` rows (all leading dimensions together)."""

    def __init__(self, linear: torch.nn.Linear, rows: int) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.pack(rows)

    def pack(self, rows: int) -> None:
        """Pack the weight for inputs of `rows` rows (replacing an earlier packing)."""
        self.rows = rows
        with torch.no_grad():
            packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.rows * self.in_features and not torch.is_grad_enabled():
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        return F.linear(x, self.weight, self.bias)


def pack_linears(model: torch.nn.Module, rows: int) -> int:
    """Pack every `nn.Linear` of `model` (the output head included) for `rows` input rows, in
    place: each becomes a `PackedLinear` (one already packed is packed again for `rows`).
    Returns the bytes the packed copies take. Call only where `can_pack(model)`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                child.pack(rows)
            elif isinstance(child, torch.nn.Linear):
                setattr(parent, name, PackedLinear(child, rows))
    return sum(
        m.packed.numel() * m.packed.element_size()
        for m in model.modules()
        if isinstance(m, PackedLinear)
    )


def unpack_linears(model: torch.nn.Module) -> None:
    """Undo `pack_linears`: every `PackedLinear` becomes an `nn.Linear` on the same weight and
    bias again, and the packed copies are freed."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                shape = (child.in_features, child.out_features)
                plain = torch.nn.Linear(*shape, bias=False, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
