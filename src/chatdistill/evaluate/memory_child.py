"""The memory probe's child: `python -m chatdistill.evaluate.memory_child SPEC.json` loads one
model in a fresh interpreter, generates, and prints its peak memory as one JSON line.

A fresh process per model so that models measured earlier (and the parent's own tensors) do not
count; `probes.memory_probe` writes the spec and reads the line.
"""

import json
import resource
import sys
from pathlib import Path

import torch

from chatdistill.evaluate.loading import load_engine
from chatdistill.inference.engine import SamplingParams


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(spec: dict) -> dict:
    """Load the spec's model, generate its prompts at its batch size; return the peak memory (MB)
    and the key of the method that measured it (see `probes.MEMORY_METHODS`)."""
    torch.set_num_threads(spec["threads"])
    before_kb = _status_kb("VmRSS") or 0
    engine = load_engine(spec["path"], spec["device"], spec["dtype"])
    prompts, batch_size = spec["prompts"], spec["batch_size"]
    params = SamplingParams(max_new_tokens=spec["max_new_tokens"], temperature=0.0)
    # Warm-up first: lazily loaded kernels and libraries are not the model's memory.
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), batch_size=1)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        engine.generate(prompts, params, batch_size=batch_size)
        peak, method = torch.cuda.max_memory_allocated() / 2**20, "cuda-max-allocated"
    elif (rss_kb := _status_kb("VmRSS")) is not None and _reset_peak_rss():
        engine.generate(prompts, params, batch_size=batch_size)
        tensors = {id(t): t for t in [*engine.model.parameters(), *engine.model.buffers()]}
        weights = sum(t.numel() * t.element_size() for t in tensors.values())
        peak = weights / 2**20 + ((_status_kb("VmHWM") or rss_kb) - rss_kb) / 1024
        method = "rss-hwm"
    else:
        engine.generate(prompts, params, batch_size=batch_size)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, method = (peak_kb - before_kb) / 1024, "ru-maxrss"
    return {"peak_memory_mb": peak, "method": method}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(Path(sys.argv[1]).read_text()))))
