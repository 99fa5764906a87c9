"""The one progress bar style of every stage (tqdm on stderr, silent when not a terminal)."""

from __future__ import annotations

import sys


def progress_bar(total: int, *, desc: str, unit: str, quiet: bool, leave: bool = True):
    """A tqdm bar showing count, rate and ETA; disabled with ``quiet`` or a non-terminal stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, smoothing=0.1,
                dynamic_ncols=True, disable=quiet or not sys.stderr.isatty())
