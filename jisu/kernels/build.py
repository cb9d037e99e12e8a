"""Builds the C++ kernels with torch.utils.cpp_extension on first use; the result is cached on disk
(torch's extension cache, keyed by the source) so later processes load it in well under a second."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("linear_cpu.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_linear_kernels():
    """The compiled module, or None where no C++ toolchain is available (then torch's kernels are used)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build():
    try:
        from torch.utils.cpp_extension import load

        # -march=native: the extension is compiled on the machine that runs it, so use all of its vector units.
        return load(name="jisu_linear_cpu", sources=[str(_SOURCE)], extra_cflags=["-O3", "-march=native"],
                    verbose=False)
    except Exception as e:  # no compiler, no headers, a sandbox without /tmp...: fall back, loudly
        log.warning("jisu: C++ kernels unavailable (%s); using torch's CPU kernels", str(e).splitlines()[0])
        return None
