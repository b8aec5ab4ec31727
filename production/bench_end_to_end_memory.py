"""`python production/bench_end_to_end_memory.py ...`: the 128k KV-cache memory report (mem128k.json).

Kept at this path because the original research README names it; the code is production.bench.memory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `production` importable

from production.bench.memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
