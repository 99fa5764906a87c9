"""``python -m deepfusion`` is the ``deepfusion`` command."""

from deepfusion.cli import main

if __name__ == "__main__":
    main()
