"""``python -m deepfusion`` is the ``deepfusion`` command (:func:`run`, its entry point)."""

from deepfusion.cli import main
from deepfusion.runtime.heap import claim


def run() -> None:
    """The ``deepfusion`` command: :func:`deepfusion.cli.main` in a process that is
    deepfusion's own (:func:`deepfusion.runtime.heap.claim`)."""
    claim()
    main()


if __name__ == "__main__":
    run()
