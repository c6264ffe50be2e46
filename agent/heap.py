"""Give freed heap memory back to the operating system after a large payload (glibc only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["release_free_memory"]


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # musl has none


def release_free_memory() -> bool:
    """`malloc_trim(0)`: glibc keeps freed arena memory mapped until asked; False without it."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
