"""A bounded store of tensors handed to clients by id: least recently used dropped first, and anything
older than its time to live expires. Ids are random, so one client cannot guess another's."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import Any


class HandleStore:
    def __init__(self, max_entries: int = 64, ttl_s: float = 600.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, value: Any) -> str:
        handle = uuid.uuid4().hex[:16]
        with self._lock:
            self._expire()
            self._items[handle] = (time.monotonic(), value)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return handle

    def get(self, handle: str) -> Any | None:
        with self._lock:
            self._expire()
            item = self._items.get(handle)
            if item is None:
                return None
            self._items.move_to_end(handle)
            return item[1]

    def _expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        while self._items and next(iter(self._items.values()))[0] < deadline:
            self._items.popitem(last=False)
