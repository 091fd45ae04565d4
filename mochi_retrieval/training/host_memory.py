"""Keep freed host memory in the process instead of handing it back to the OS after every step.

glibc's malloc serves large blocks (above ``M_MMAP_THRESHOLD``, 128 KiB to start with) with fresh ``mmap``
pages and returns them on free, and trims the heap's free top above ``M_TRIM_THRESHOLD``. A training step
frees and re-allocates the same activations every time, so on the CPU each step faults its pages in again
and the kernel zeroes them: 4,500-7,400 minor page faults per MoCo step of the Fashion-MNIST CPU config
(``benchmarks/studies/host_memory.py``, in ``benchmarks/RESULTS.md``). With the thresholds raised, freed blocks are
reused from the heap and the faults stop. The values are those of the program, not the library: :func:`run
<mochi_retrieval.training.runner.run>` applies them under ``train.keep_host_memory`` (the default).

Results do not change: only where the tensors live does, not what is computed.
"""
from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2): blocks up to 32 MiB come from
# the heap; larger ones are still mapped and returned.
MMAP_THRESHOLD = 32 << 20
# Never trim the heap's free top (the largest C int): the step's high-water mark stays mapped.
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; returns whether they were set (False off glibc,
    e.g. macOS or musl, where nothing is changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        logger.warning("mallopt refused the host-memory thresholds; freed memory goes back to the OS as before")
    return ok
