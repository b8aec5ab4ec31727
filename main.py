"""Entry point: `python main.py --mode train|sample|export ...` (see README.md). All logic lives in production/."""

import sys

from production.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
