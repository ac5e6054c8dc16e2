"""Preprocess each image once, however many prompts and views show it.

One micro-batch encodes the same images up to four times (the rollout prompts, then the student,
privileged-student and teacher scoring views), and every prompt's image is repeated once per
rollout. On CPU the image processor (resize, rescale, normalise, patchify) then costs about a
third of a tiny-model DOPD step. :func:`reuse` swaps a processor's image processor, for the
duration of one call, for a wrapper that preprocesses each distinct image once and serves the
rest from a small cache.

Correctness: an entry is keyed by the image object's identity (checked through a weak reference,
so a recycled id() never matches), the image processor's configuration and the call's keyword
arguments. Qwen-VL image processors treat every image independently (pixel_values of a batch are
the images' patches concatenated in order, image_grid_thw one row per image), so the result is
identical to processing the batch at once (tests/test_image_cache.py). Only PIL images are
cached; any other input, or an output that is not made of per-image tensors, falls back to the
wrapped processor unchanged.
"""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Iterator

import torch

MAX_CACHE_BYTES = 256 * 2**20  # least recently used entries beyond this are dropped
_PER_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


class _Cache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[weakref.ref, dict[str, torch.Tensor], int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: tuple, image: Any) -> dict[str, torch.Tensor] | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry[0]() is not image:
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: tuple, image: Any, value: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in value.values())
        with self.lock:
            self.misses += 1
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self.entries[key] = (weakref.ref(image), value, size)
            self.bytes += size
            while self.bytes > self.max_bytes and len(self.entries) > 1:
                _, (_, _, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0


CACHE = _Cache(MAX_CACHE_BYTES)
_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def _fingerprint(image_processor: Any) -> str:
    """The processor's configuration: processors configured alike (e.g. teacher and student)
    share entries."""
    try:
        return _FINGERPRINTS[image_processor]
    except (KeyError, TypeError):
        pass
    try:
        text = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    except Exception:  # noqa: BLE001  (no usable config: never share between processors)
        text = f"id:{id(image_processor)}"
    value = f"{type(image_processor).__qualname__}:{text}"
    try:
        _FINGERPRINTS[image_processor] = value
    except TypeError:
        pass
    return value


class _CachingImageProcessor:
    """Calls the wrapped image processor once per distinct image; everything else is delegated."""

    def __init__(self, inner: Any, cache: _Cache):
        self._inner, self._cache = inner, cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> Any:
        from PIL import Image
        from transformers import BatchFeature

        if args or not isinstance(images, (list, tuple)) or not images or not all(isinstance(i, Image.Image) for i in images):
            return self._inner(images, *args, **kwargs)
        try:
            call_key = json.dumps(kwargs, sort_keys=True, default=repr)
        except TypeError:
            return self._inner(images, *args, **kwargs)
        prefix = (_fingerprint(self._inner), call_key)
        pieces = []
        for image in images:
            key = (*prefix, id(image))
            value = self._cache.get(key, image)
            if value is None:
                out = self._inner([image], **kwargs)
                if set(out.keys()) != set(_PER_IMAGE_KEYS) or not all(isinstance(out[k], torch.Tensor) for k in out):
                    return self._inner(images, *args, **kwargs)  # not the per-image layout this cache knows
                value = {k: out[k] for k in _PER_IMAGE_KEYS}
                self._cache.put(key, image, value)
            pieces.append(value)
        data = {k: torch.cat([p[k] for p in pieces]) for k in _PER_IMAGE_KEYS}
        return BatchFeature(data=data)


@contextlib.contextmanager
def reuse(processor: Any, cache: _Cache = CACHE) -> Iterator[None]:
    """Within the block, ``processor``'s image processor preprocesses each distinct image once.

    The processor object is restored on exit (it may be saved with ``save_pretrained`` later).
    A no-op for processors without an ``image_processor``.
    """
    inner = getattr(processor, "image_processor", None)
    if inner is None or isinstance(inner, _CachingImageProcessor):
        yield
        return
    processor.image_processor = _CachingImageProcessor(inner, cache)
    try:
        yield
    finally:
        processor.image_processor = inner
