"""``python -m rljax sft|reward|ppo|dpo ...`` (same as the ``rljax`` command)."""
import sys

from rljax.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
