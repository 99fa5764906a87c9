"""``python -m deepfusion`` is the ``deepfusion`` command."""

from .cli import main

if __name__ == "__main__":
    main()
