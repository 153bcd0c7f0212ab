"""Process memory readings (Linux ``/proc``) used to report peak RSS of merges and pipeline stages."""

from __future__ import annotations

import resource


def rss_mb() -> float:
    """Current resident set size, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Reset the peak-RSS mark (VmHWM) by writing 5 to ``clear_refs``; otherwise the mark is inherited from whatever
    the process did before (even from its parent across fork+exec). Does nothing where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, MB (``ru_maxrss`` where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
