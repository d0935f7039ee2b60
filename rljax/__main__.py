"""``python -m rljax sft|reward|ppo|dpo ...`` (same as the ``rljax`` command)."""
from rljax.cli import main

if __name__ == "__main__":
    main()
