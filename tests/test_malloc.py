"""diffim.malloc: freed image planes stay in the heap (glibc), measured with mallinfo2.

Each case runs in its own interpreter: the allocator settings are process-wide.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from diffim.malloc import ENVIRONMENT, _glibc

pytestmark = pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"),
                                reason="needs glibc >= 2.33 (mallopt, mallinfo2)")

PROBE = textwrap.dedent("""
    import ctypes, json
    import numpy as np
    from diffim.malloc import retain_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = retain_freed_memory()
    plane = np.ones((4096, 4096), np.float32)          # 64 MiB, as a 4k image plane
    mapped_while_alive = libc.mallinfo2().hblkhd
    del plane
    free_after = libc.mallinfo2().fordblks
    print(json.dumps(dict(applied=applied, mapped=mapped_while_alive, free=free_after)))
""")
PLANE = 4096 * 4096 * 4


def _probe(script=PROBE, **env):
    """Run ``script`` in a fresh interpreter with this environment minus its malloc
    settings, plus ``env``; its last output line as JSON."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("DIFFIM_SYSTEM_MALLOC", "GLIBC_TUNABLES")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", script], env=full, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_plane_comes_from_the_heap_and_stays_there():
    r = _probe()
    assert r["applied"] is True
    assert r["mapped"] < PLANE          # not a separate mmap ...
    assert r["free"] >= PLANE           # ... and kept, free, for the next plane


def test_glibc_default_maps_and_unmaps_the_plane():
    # the control: without the setting the same plane is its own mmap
    r = _probe(DIFFIM_SYSTEM_MALLOC="1")
    assert r["applied"] is False
    assert r["mapped"] >= PLANE
    assert r["free"] < PLANE


def test_user_malloc_settings_are_left_alone():
    r = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert r["applied"] is False
    assert r["mapped"] >= PLANE


THREADS_PROBE = textwrap.dedent("""
    import json, threading
    import numpy as np
    from diffim.malloc import retain_freed_memory

    def hwm():  # this process's peak resident memory (bytes); unlike getrusage's
        # ru_maxrss it is not inherited from the parent across fork and exec
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    applied = retain_freed_memory()
    start = hwm()

    def planes():  # four 4k image planes, allocated and freed
        p = [np.ones((4096, 4096), np.float32) for _ in range(4)]
        del p

    for _ in range(2):  # a worker thread, then the main thread, twice
        t = threading.Thread(target=planes)
        t.start()
        t.join()
        planes()
    peak = hwm()
    print(json.dumps(dict(applied=applied, grown=peak - start)))
""")


def test_threads_share_the_kept_memory():
    # one arena: the planes a thread freed serve the main thread (peak = 4 planes) ...
    r = _probe(THREADS_PROBE)
    assert r["applied"] is True
    assert r["grown"] < 5 * PLANE
    # ... while with the heap kept per thread arena (the control) the peak doubles
    per_thread = {k: v for k, v in ENVIRONMENT.items() if k != "MALLOC_ARENA_MAX"}
    control = _probe(THREADS_PROBE, **per_thread)
    assert control["applied"] is False
    assert control["grown"] > 6 * PLANE
