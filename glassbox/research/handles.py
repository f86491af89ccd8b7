"""A bounded store of tensors handed to clients by id: at most `max_entries` handles and `max_bytes` held
together, the least recently used dropped first to make room, and anything older than its time to live
expires. Ids are random, so one client cannot guess another's. A value larger than the whole budget is
refused (LimitError naming max_handle_bytes) before anything is dropped."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from glassbox.research.limits import LimitError


class HandleStore:
    def __init__(self, max_entries: int = 64, ttl_s: float = 600.0, max_bytes: int = 512 << 20) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[float, Any, int]] = OrderedDict()  # id -> (created, value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    def check_fits(self, nbytes: int) -> None:
        """LimitError unless a value of `nbytes` could be stored (after dropping every other handle)."""
        if nbytes > self.max_bytes:
            raise LimitError("max_handle_bytes", f"the result holds {nbytes} bytes, over the limit of {self.max_bytes} for all handles together")

    def put(self, value: Any, nbytes: int = 0) -> str:
        self.check_fits(nbytes)
        handle = uuid.uuid4().hex[:16]
        with self._lock:
            self._expire()
            self._items[handle] = (time.monotonic(), value, nbytes)
            self._bytes += nbytes
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                self._drop_oldest()
        return handle

    def get(self, handle: str) -> Any | None:
        with self._lock:
            self._expire()
            item = self._items.get(handle)
            if item is None:
                return None
            self._items.move_to_end(handle)
            return item[1]

    def usage(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            return {"handles": len(self._items), "bytes": self._bytes}

    def _drop_oldest(self) -> None:
        _, (_, _, nbytes) = self._items.popitem(last=False)
        self._bytes -= nbytes

    def _expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        while self._items and next(iter(self._items.values()))[0] < deadline:
            self._drop_oldest()
