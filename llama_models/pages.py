"""Pages of a memory-mapped checkpoint file: which file a tensor's memory maps, and giving the pages back.

The loader maps consolidated.*.pth into memory (torch.load(mmap=True)) instead of reading it, so
a weight costs RAM only once touched. Two things then need the operating system's help: letting
go of a weight's pages once it has been copied or quantized (they would count against the
process until the whole file is unmapped), and knowing which file and offset a tensor maps, to
read it again from disk (llama_models.offload) or drop it from the page cache. Linux and macOS.
"""

import ctypes
import mmap
import os
import sys
from typing import Optional

import torch

# madvise advice number (4 on Linux and macOS): the pages are not needed any more. Passed to
# libc through ctypes, since Python's mmap module advises only its own mappings, not a tensor's.
MADV_DONTNEED = 4


def mapped_file(address: int) -> Optional[tuple[str, int]]:
    """(path, offset in that file) of a byte of this process's memory that maps a file; else None.

    Read from /proc/self/maps (Linux; a few milliseconds). Used to drop a mmapped tensor's pages
    from the page cache, which knows them by file and offset.
    """
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)  # start-end perms offset dev inode [path]
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].rstrip("\n") if len(fields) == 6 else ""
                return (path, address - start + int(fields[2], 16)) if path.startswith("/") else None
    return None


def release_pages(tensor: torch.Tensor, evict: Optional[tuple[str, int]] = None) -> None:
    """Drop the pages of a tensor mmapped from a checkpoint out of this process's memory.

    Once its contents are no longer needed (say, after quantizing it) the pages are still mapped
    and count against the process until the whole file is unmapped. madvise(MADV_DONTNEED)
    gives them back now; if touched again they are simply re-read from the file. Only for
    tensors that come from a file mapping: a read-only one, or a shared one written through
    (tools/convert_gguf.py), whose written pages stay in the page cache on their way to the
    file. A no-op where madvise does not exist.

    evict: (path, offset of the tensor in that file), from mapped_file(tensor.data_ptr()): also
    drop the pages from the OS page cache (Linux). Unmapped file pages otherwise stay cached, out
    of the process's RSS but still in RAM, and a model streamed from disk would quietly fill
    memory with its whole file.
    """
    if sys.platform not in ("linux", "darwin"):
        return
    # Only whole pages inside the tensor: a page it shares with a neighbour must stay.
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
    if evict is not None and sys.platform == "linux":
        # After the madvise no one maps these pages (the mapping is private to this process and
        # read-only, so they are the page cache's own pages): DONTNEED can now drop them.
        fd = os.open(evict[0], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, evict[1] + start - tensor.data_ptr(), end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
