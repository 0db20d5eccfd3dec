"""``retain_freed_memory``: a buffer freed and reallocated every step stops page-faulting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, sys, torch
    from threefactor.run.allocator import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    else:  # glibc's starting thresholds, without its adaptation (which depends on history)
        assert retain_freed_memory(128 * 1024, 128 * 1024)
    torch.set_num_threads(1)
    # The weight gradient of a 128x128x7x7 conv (3.2 MB), kept until the next step as a
    # DECOLLE step keeps .grad; oneDNN makes and frees blocked copies of it on the way.
    x, g, w = torch.rand(1, 128, 16, 16), torch.rand(1, 128, 16, 16), torch.rand(128, 128, 7, 7)
    def step(keep):
        keep[:] = torch.ops.aten.convolution_backward(
            g, x, w, None, [1, 1], [3, 3], [1, 1], False, [0, 0], 1, [False, True, False])[1:2]
    keep = []
    step(keep)
    step(keep)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step(keep)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_retained_buffers_are_reused_without_page_faults():
    pages = 128 * 128 * 49 * 4 // 4096  # one weight gradient
    assert _faults("mmap") > 10 * pages  # every gradient its own mapping, faulted in afresh
    # 20 steps fault in at most what the heap needs to grow once or twice, not once per step
    assert _faults("retain") < 3 * pages
