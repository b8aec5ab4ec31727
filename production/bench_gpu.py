"""`python -m production.bench_gpu --out DIR`: the one GPU check (production.bench.gpu)."""

import sys

from production.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())
