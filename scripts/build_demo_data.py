"""Regenerate the shipped demo data (src/chatdistill/assets/demo/) deterministically.

    python scripts/build_demo_data.py [--out DIR] [--seed N]

Needs the chatterbot-corpus package (a dependency). Re-running with the defaults reproduces the
shipped files byte for byte; tests/test_demo_data.py checks that.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chatdistill.demo.build import DEMO_SEED, write_demo_assets  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "chatdistill" / "assets" / "demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--seed", type=int, default=DEMO_SEED, help="generator seed")
    args = ap.parse_args()
    sizes = write_demo_assets(args.out, args.seed)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out}: {sizes}, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
