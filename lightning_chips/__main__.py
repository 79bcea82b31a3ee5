"""``python -m lightning_chips`` is the ``lightning-chips`` command."""

from lightning_chips.cli import main

if __name__ == "__main__":
    main()
