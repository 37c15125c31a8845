"""The context cache's disk tier (runtime/context_cache.py): one `.npz` per block, read with allow_pickle=False,
beside a JSON index, in a subfolder of the cache dir per bundle identity. A file that is corrupt, of another bundle
or of another layout is ignored with a warning, never trusted; only files certainly the cache's own are deleted.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import time
import warnings
import zipfile

import numpy as np

from speccompile.format.atomic import TEMP_PREFIX, write_atomically

DEFAULT_DISK_BYTES = 8 << 30
INDEX = "index.json"
INDEX_BYTES = 4096
DISK_FORMAT = "speccompile-context-cache"
DISK_VERSION = 1
STALE_TEMPORARY_S = 3600.0  # a temporary block file this old was left by a killed process
BLOCK_NAME = re.compile(r"[0-9a-f]{64}\.npz")  # a block file: its key (a sha256 in hex)
NPY_HEADER_BYTES = 4096  # an .npy member's header, beyond its array's own bytes (a disk block's size check)
# the disk tier scans the cache dir once past its budget, and once it has written the rest of the budget since
# its last scan: a process sees only its own writes between scans, and others sharing the cache dir (serve's
# replicas) would otherwise each fill it to the budget before counting theirs. A scan that finds more than this
# share of the budget deletes down to it: each scans every block file of the cache dir, so evicting to the budget
# exactly would scan it again at every block written after
EVICT_TO = 0.9
TOUCH_STEP_NS = 1000  # a chain's block files are this far apart in time, its first the newest (DiskTier.touch)

Arrays = dict[str, np.ndarray]


def open_regular(path: str):
    """A file of the cache dir opened for reading, only if it is a plain file itself: never through a symbolic link
    (it would read or touch a file outside the cache dir), never a FIFO or a device (opening one waits for a writer,
    reading one may never end). OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a plain file", path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_index(folder: str):
    """A cache folder's index as JSON (its first INDEX_BYTES: an index is far smaller). OSError, ValueError."""
    with open_regular(os.path.join(folder, INDEX)) as f:
        return json.loads(f.read(INDEX_BYTES))


def is_cache_folder(entry: os.DirEntry) -> bool:
    """A real folder (no link) whose index is a context cache's: its blocks are the cache's own to delete."""
    try:
        if not entry.is_dir(follow_symlinks=False):
            return False
        index = read_index(entry.path)
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == DISK_FORMAT


def block_files(folder: str) -> list[tuple[float, int, str]]:
    """(modification time, size, path) of the block files in a cache folder: plain files named as the cache names
    them (a block key, .npz), never anything else someone put there."""
    try:
        with os.scandir(folder) as entries:
            return [(st.st_mtime, st.st_size, e.path) for e in entries
                    if BLOCK_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)
                    and (st := e.stat(follow_symlinks=False))]
    except OSError:  # removed meanwhile
        return []


def remove_stale_temporaries(folder: str, now: float) -> None:
    """Block files a killed process left half-written under their temporary names in a cache folder, once old
    enough that no live writer can still own them (a write takes well under a second)."""
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                try:
                    if e.name.startswith(TEMP_PREFIX) and e.is_file(follow_symlinks=False) and \
                            now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_S:
                        os.unlink(e.path)
                except OSError:  # another process got there first
                    pass
    except OSError:  # the folder removed meanwhile
        pass


def _size(path: str) -> int:
    """A block file's size, 0 once it is gone: another process's eviction may delete it at any moment."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _member_limits(positions: int, parts: dict) -> dict[str, int]:
    """The largest array, in bytes, each member a block file of `parts`' layouts may hold."""
    limits = {"__key__.npy": 64}  # the block's key: a sha256 in hex
    for p, part in parts.items():
        for n, (shape, dtype) in part.layout.items():
            limits[f"{p}/{n}.npy"] = positions * math.prod(shape) * np.dtype(dtype).itemsize
    return limits


def _members_fit(z: zipfile.ZipFile, positions: int, parts: dict) -> bool:
    """Every member of a block file is an array the layout names, no larger than that array, by its size and by
    what its .npy header claims: checked before any is read, so that a small file cannot unpack into gigabytes,
    nor make np.load allocate what a header claims before it finds the data short."""
    limits = _member_limits(positions, parts)
    members = z.infolist()
    if not all(i.filename in limits and i.file_size <= limits[i.filename] + NPY_HEADER_BYTES for i in members):
        return False
    for i in members:
        with z.open(i) as f:
            read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
        if math.prod(shape) * dtype.itemsize > limits[i.filename]:
            return False
    return True


class DiskTier:
    """Blocks as `<key>.npz` files in cache_dir/<identity prefix>/, beside an index naming the identity and block
    size. Files are written to a temporary name and renamed into place, so a crash leaves no half-written block.
    max_bytes bounds the block files of the whole cache_dir, every bundle's (a rebuilt bundle is a new identity,
    and its old folder would otherwise keep its blocks for ever): the files least recently used (their
    modification times, set by touch) are deleted first, and only files certainly the cache's own (block_files)."""

    def __init__(self, cache_dir: str, identity: str, block_tokens: int, max_bytes: int = DEFAULT_DISK_BYTES):
        self.root, self.max_bytes = cache_dir, max_bytes
        self.dir = os.path.join(cache_dir, identity[:32])
        self.index = {"format": DISK_FORMAT, "version": DISK_VERSION, "identity": identity,
                      "block_tokens": block_tokens}
        self.usable = self._opened()
        self.writable = True  # until a write fails (a full disk, a read-only mount): reads go on
        if self.usable:
            self._remove_stale_temporaries()
        self.nbytes = sum(size for _, size, _ in self._blocks()) if self.usable else 0
        self.unscanned = 0  # bytes this process wrote since it last scanned the cache dir

    def _opened(self) -> bool:
        """Whether the disk tier is usable: its folder and index made or found. A full disk costs the disk tier,
        never the request, at load as at every write after; any other failure (a folder it may not write) is
        the caller's error."""
        try:
            return self._own_folder() and self._index_matches()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            warnings.warn(f"context cache: cannot write to {self.dir} ({e.strerror}); the disk tier is off",
                          stacklevel=4)
            return False

    def _own_folder(self) -> bool:
        """Whether this identity's folder is a real folder inside the cache dir (made here if absent): through a
        link there the tier would read, write and delete outside the cache dir, and a file there is not its own."""
        os.makedirs(self.root, exist_ok=True)
        try:
            os.mkdir(self.dir)
        except FileExistsError:
            pass
        if os.path.isdir(self.dir) and not os.path.islink(self.dir):
            return True
        warnings.warn(f"context cache: {self.dir} is not a folder of the cache dir (a link, or a file); the disk "
                      "tier is not used", stacklevel=4)
        return False

    def _index_matches(self) -> bool:
        """Whether the folder's index is this bundle's (written if absent)."""
        path = os.path.join(self.dir, INDEX)
        if not os.path.lexists(path):
            write_atomically(path, lambda f: f.write(json.dumps(self.index).encode()), private=True)
            return True
        try:
            found = read_index(self.dir)
        except (OSError, ValueError) as e:
            found = f"unreadable ({e})"
        if found != self.index:
            warnings.warn(f"context cache: {path} is not this bundle's index ({str(found)[:120]}); the disk "
                          "tier is not used", stacklevel=4)
            return False
        return True

    def _remove_stale_temporaries(self) -> None:
        """What killed writers left in every cache folder of the cache dir, not only this bundle's: the folder of
        a bundle since rebuilt (a new identity) is never opened again, and would keep its own for ever."""
        now = time.time()
        with os.scandir(self.root) as folders:
            for folder in folders:
                if is_cache_folder(folder):
                    remove_stale_temporaries(folder.path, now)

    def _blocks(self) -> list[tuple[float, int, str]]:
        """(modification time, size, path) of each block file in the cache dir, least recently used first."""
        found = []
        with os.scandir(self.root) as folders:
            for folder in folders:
                if is_cache_folder(folder):  # this bundle's, once its index is written, and the others'
                    found += block_files(folder.path)
        return sorted(found)

    def _evict(self) -> None:
        blocks = self._blocks()
        self.nbytes = sum(size for _, size, _ in blocks)  # with what other processes wrote meanwhile
        self.unscanned = 0
        if self.nbytes <= self.max_bytes * EVICT_TO:
            return
        for _, size, path in blocks:
            if self.nbytes <= self.max_bytes * EVICT_TO:
                break
            try:
                os.unlink(path)
                self.nbytes -= size
            except OSError:  # another process got there first
                pass

    def read(self, key: str, positions: int, parts: dict) -> dict[str, Arrays] | None:
        """Block `key`'s parts, if its file holds a block of `parts`' layouts (name -> context_cache.Part). Its time
        is left to the caller, which touches the whole chain it used (touch)."""
        path = os.path.join(self.dir, f"{key}.npz")
        if not self.usable or not os.path.exists(path):
            return None
        try:
            # the file opened here, so that it closes whatever np.load raises (it leaves its own open on a damaged
            # zip); an .npz only: a plain .npy has no `with`, so it fails
            with open_regular(path) as f, np.load(f, allow_pickle=False) as z:
                if not _members_fit(z.zip, positions, parts):
                    warnings.warn(f"context cache: ignoring {path}: its members are not this bundle's layout",
                                  stacklevel=4)
                    return None
                arrays = {name: z[name] for name in z.files}
        except FileNotFoundError:  # evicted meanwhile by another process sharing the folder: a miss
            return None
        except Exception as e:  # noqa: BLE001 - a corrupt file of any kind costs the cache, never the request
            warnings.warn(f"context cache: ignoring unreadable block {path} ({type(e).__name__})", stacklevel=4)
            return None
        stored_key = arrays.pop("__key__", None)
        if stored_key is None or stored_key.tobytes() != key.encode():
            warnings.warn(f"context cache: ignoring {path}: not the block its name says", stacklevel=4)
            return None
        block: dict[str, Arrays] = {}
        for name, a in arrays.items():
            part, _, field = name.rpartition("/")
            block.setdefault(part, {})[field] = a
        if any(p not in parts or not parts[p].fits(a, positions) for p, a in block.items()) or "target" not in block:
            warnings.warn(f"context cache: ignoring {path}: its arrays do not have this bundle's layout", stacklevel=4)
            return None
        return block

    def touch(self, keys: list[str]) -> None:
        """Mark a chain's block files (first block first) used now, the first the most recently: evicted least
        recently used first, a chain loses its tail before its head, without which no lookup reaches the rest. The
        caller touches the blocks it holds in memory too: a prefix every request shares would otherwise age on disk
        and be the first evicted."""
        if not self.usable:
            return
        now = time.time_ns()
        for i, key in enumerate(keys):
            t = now - i * TOUCH_STEP_NS
            try:  # a link's own time, never its target's
                os.utime(os.path.join(self.dir, f"{key}.npz"), ns=(t, t), follow_symlinks=False)
            except OSError:  # not on disk: evicted by another process, or its write failed
                pass

    def _still_indexed(self) -> bool:
        """Whether this bundle's folder still holds its index, made again if the folder was removed meanwhile (a
        cleared cache dir): write_atomically would make the folder again without it, and a scan counts and evicts
        only the blocks of folders whose index is the cache's, so this process's blocks would pass the budget."""
        if os.path.lexists(os.path.join(self.dir, INDEX)):
            return True
        self.usable = self._own_folder() and self._index_matches()
        return self.usable

    def write(self, key: str, block: dict[str, Arrays]) -> None:
        if not (self.usable and self.writable):
            return
        flat = {f"{p}/{n}": a for p, arrays in block.items() for n, a in arrays.items()}
        flat["__key__"] = np.frombuffer(key.encode(), np.uint8)
        path = os.path.join(self.dir, f"{key}.npz")
        try:
            if not self._still_indexed():
                return
            old = _size(path)
            write_atomically(path, lambda f: np.savez(f, **flat), private=True)
            size = _size(path)
            self.nbytes += size - old
            self.unscanned += size
            if self.nbytes > self.max_bytes or self.unscanned > self.max_bytes * (1 - EVICT_TO):
                self._evict()
        except IsADirectoryError:  # a folder under this block's name is not the cache's to remove: only this block
            warnings.warn(f"context cache: {path} is a folder; that block is not kept on disk", stacklevel=4)
        except OSError as e:  # a full disk costs the disk tier's writes, never the request, nor what it holds
            warnings.warn(f"context cache: cannot write to {self.dir} ({e.strerror or e}); the disk tier writes no "
                          "more blocks, and still reads those it holds", stacklevel=4)
            self.writable = False
