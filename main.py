"""Entry point: `python main.py --mode train ...` (see README.md). All logic lives in production/."""

import sys

from production.cli import main

if __name__ == "__main__":
    sys.exit(main())
