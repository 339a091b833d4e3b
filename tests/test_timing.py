import platform

import pytest

from tcpass.timing import ALLOCATOR, pin_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_pin_allocator_sets_and_reports_the_thresholds():
    assert pin_allocator(1 << 30)
    assert ALLOCATOR["malloc"] == "glibc, mmap/trim thresholds pinned at 1073741824 bytes"
