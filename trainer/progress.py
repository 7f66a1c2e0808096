"""Progress bars for long work, shown only on the logging rank and only when stderr is a terminal."""

import sys

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step") -> tqdm:
    """A tqdm bar that disables itself off-terminal (CI logs, Kubernetes) so logs stay readable."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))
