"""The build's worker side: decode and resize images and masks in processes, results in order.

`build_manifest` (build_manifest.py) hands out one task per image or ref to
`process_map`'s workers. An image task writes its pixels straight into its
row of images.npy (`write_at`); a mask task returns its packed bits. Tasks
are module-level functions so that forkserver/spawn workers can import them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from jurassiglip.data import masks
from jurassiglip.data.images import to_rgb
from jurassiglip.data.refs import ImageInfo

# Tasks per hand-out to a worker: big enough that pickling and queueing stay
# small next to the work (an image is ~5 ms at COCO sizes, a mask ~2-3 ms),
# small enough that the pool stays busy to the end and memory stays flat.
IMAGE_CHUNK = 8
MASK_CHUNK = 32


class BadImage(Exception):
    """An image that cannot be used; the message is the reason."""


# ---------------------------------------------------------------- images


def load_image(path: Path, info: ImageInfo, size: int) -> tuple[np.ndarray, str]:
    """Read one image, check it against instances.json, make it RGB and resize it.

    Pixels are used as stored (no EXIF rotation), as the COCO masks are; the
    size check catches an image whose stored size disagrees with its masks.

    Args:
        path: image file.
        info: its instances.json entry (expected height and width).
        size: output side S (bilinear, aspect ratio not kept).

    Returns:
        (uint8 array (S, S, 3), original Pillow mode).

    Raises:
        BadImage: missing, truncated, undecodable, or of the wrong size.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now so a truncated file fails here, not later
            if (image.height, image.width) != (info.height, info.width):
                raise BadImage(
                    f"size {image.height}x{image.width} (HxW) differs from instances.json "
                    f"{info.height}x{info.width}"
                )
            mode = image.mode
            rgb = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8), mode
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"unreadable image: {e}") from None


def resolve_workers(workers: int) -> int:
    """Worker processes for a `data.workers` value: 0 means one per core this process may use.

    Args:
        workers: >= 0.

    Returns:
        >= 1.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per core), got {workers}")
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup CPU pinning
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


OrderedMap = Callable[[Callable, Iterable, int], Iterator]


@contextlib.contextmanager
def process_map(workers: int) -> Iterator[OrderedMap]:
    """Yield `ordered_map(fn, items, chunksize)`: fn over items in `workers` processes, results in order.

    One worker maps in this process (no pool). Otherwise the pool starts by
    forkserver where available (spawn elsewhere): no inherited threads or
    locks from the stage process, and the server imports the caller's main
    module and this one once for all workers. As with any forkserver/spawn
    pool, a script that builds with workers > 1 needs the
    `if __name__ == "__main__":` guard (stages and benchmarks have it).
    `fn` must be a module-level function. Leaving the block, even on an
    error, terminates the workers.
    """
    if workers <= 1:
        yield lambda fn, items, chunksize: map(fn, items)
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["__main__", __name__])
    with context.Pool(workers) as pool:
        yield lambda fn, items, chunksize: pool.imap(fn, items, chunksize)


# File descriptors of the .npy stores this process writes rows into, by path:
# a worker opens images.npy once for all its tasks and its copy closes when
# the pool ends; the building process closes its own after the step.
_OPEN_STORES: dict[Path, int] = {}


def write_at(store_path: Path, offset: int, data: np.ndarray) -> None:
    """Write a C-contiguous array's bytes at `offset` of a file (pwrite: no page faults, unlike a memmap)."""
    if store_path not in _OPEN_STORES:
        _OPEN_STORES[store_path] = os.open(store_path, os.O_WRONLY)
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(_OPEN_STORES[store_path], view, offset)
        view, offset = view[written:], offset + written


def close_store(store_path: Path) -> None:
    fd = _OPEN_STORES.pop(store_path, None)
    if fd is not None:
        os.close(fd)


def image_task(task: tuple[Path, ImageInfo, int, Path, int]) -> tuple[bool, str]:
    """Worker: `load_image` into its row of images.npy, reporting a bad image instead of raising.

    The pixels go straight into the file: sending 0.8 MB per 512 px image
    back through a pipe cost the building process 1.5-2 ms per image, a
    third of a worker's decoding time, and it would not scale to 16 workers.

    Args:
        task: (image file, its instances.json entry, side S, images.npy path,
            byte offset of the image's row in it).

    Returns:
        (True, original Pillow mode), or (False, why the image is bad).
    """
    path, info, size, store_path, offset = task
    try:
        pixels, mode = load_image(path, info, size)
    except BadImage as e:
        return False, str(e)
    write_at(store_path, offset, pixels)
    return True, mode


def target_task(task: tuple[list[dict], int, int, int]) -> tuple[str, np.ndarray]:
    """Worker: one ref's target from its annotations' RLEs (none for no-target).

    Args:
        task: (RLEs at original size, H, W, S).

    Returns:
        (RLE counts of the union at original size, uint8 (ceil(S*S/8),) packed at S x S).
    """
    rles, height, width, size = task
    if len(rles) == 1:
        rle = rles[0]  # already compressed at original size: kept as is
        mask = masks.decode(rle)
    else:
        mask = masks.union(rles, height, width)
        rle = masks.encode(mask)
    return rle["counts"], masks.pack(masks.resize_mask(mask, size))


def objects_task(task: tuple[list[dict], int, int, int]) -> tuple[str, np.ndarray]:
    """Worker: one image's all-objects mask, as `target_task` but always re-encoded."""
    rles, height, width, size = task
    mask = masks.union(rles, height, width)
    return masks.encode(mask)["counts"], masks.pack(masks.resize_mask(mask, size))


