"""Keep freed image-sized arrays in the process heap instead of unmapping them.

glibc serves every allocation above its mmap threshold (128 KiB, raised
adaptively to at most 32 MiB) with a fresh ``mmap`` and returns it to the
kernel on ``free``.  A 4k x 4k float32 plane is 64 MiB, so each of the
hundreds of temporaries of one image is page-faulted in and zeroed anew.

The workflow avoids that for its jobs with glibc's environment variables
(``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX=1``; set in
``workflow/rules/common.smk``, read by glibc when a process starts).
:func:`retain_freed_memory` applies the same settings from inside a running
process; the ``diffim`` command calls it at start-up and library users may
call it.  On the (4096 x 4096) peer pairs it took ``subtract_pair`` from
16.5-20.0 s to 13.5-15.5 s on a slow 2-core virtual machine, for 3-6 % more
peak memory (README, "Measured performance").

Kept memory is kept per malloc *arena*, and glibc gives each new thread its
own: a plane freed by one thread is then of no use to the next thread, and
the peak grows with the number of threads.  One arena for the whole process
(``M_ARENA_MAX = 1``) lets every thread reuse every freed plane; with the two
threads of :func:`diffim.pair.subtract_pair` the peak of a 4096 x 4096 pair
is 1.29-1.39 GB with one arena and 1.46-1.53 GB without.  Large numpy
arrays are allocated rarely, so the shared arena's lock costs nothing
measurable.

Nothing happens off glibc, when the user has set glibc's malloc environment
variables, or with ``DIFFIM_SYSTEM_MALLOC=1``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

#: mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: Free memory at the top of the heap kept rather than returned to the kernel
#: (bytes; the largest value ``mallopt`` takes).
TRIM_THRESHOLD = 2**31 - 1
#: The same settings as environment variables (read by glibc when a process
#: starts; the trim threshold there is a size_t): the workflow sets them for its
#: jobs and the peer benchmark for its workers, each keeping a user's own value.
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36),
               "MALLOC_ARENA_MAX": "1"}
#: Environment variables by which the user (or the workflow) already tunes glibc malloc.
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")


def _glibc():
    """The C library if it is glibc (has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Make glibc serve every allocation from the heap and keep freed blocks (process-wide).

    Parameters
    ----------
    trim_threshold : int
        Bytes of free memory at the top of the heap kept for reuse
        (``M_TRIM_THRESHOLD`` of ``mallopt(3)``); ``M_MMAP_MAX`` is set to 0
        and ``M_ARENA_MAX`` to 1 (call this before starting threads).

    Returns
    -------
    bool
        True if glibc accepted the three settings; False when skipped (not glibc,
        malloc variables already in the environment, ``DIFFIM_SYSTEM_MALLOC=1``)
        or refused.
    """
    if os.environ.get("DIFFIM_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    if any(os.environ.get(v) for v in _USER_SETTINGS):
        logger.debug("glibc malloc settings in the environment: left as they are")
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0)) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(int(trim_threshold))) == 1
          and libc.mallopt(_M_ARENA_MAX, ctypes.c_int(1)) == 1)
    if not ok:
        logger.debug("glibc refused the malloc settings; allocator left at its defaults")
    return ok
