"""``python -m pirl`` (also what ``torchrun -m pirl`` runs)."""

import sys

from pirl.cli import main

if __name__ == "__main__":
    sys.exit(main())
