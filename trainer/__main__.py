"""``python -m trainer CONFIG.yaml [key=value ...]`` (what ``torchrun ... -m trainer`` runs)."""

import sys

from trainer.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
