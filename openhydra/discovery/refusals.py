"""One warning per refused record and reason, not one per lookup.

Every lookup re-reads the DHT, so a stranger's forged or stale record used to be logged again on every request
(and at every level of verification that refused it). A refusal is now logged at WARNING the first time a
(peer id, reason) pair is seen and again only after ``repeat_s``; the repeats in between go to DEBUG. Callers
keep counting every refusal (``/v1/network/status``, ``/metrics``)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

REPEAT_S = 600.0
MEMORY = 4096  # (peer id, reason) pairs remembered; the oldest go first


class RefusalLog:
    def __init__(self, logger: logging.Logger, repeat_s: float = REPEAT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.repeat_s, self.clock = logger, repeat_s, clock
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def dropped(self, peer_id: str, reason: object) -> bool:
        """Log that ``peer_id``'s record was dropped for ``reason``; True if it went out at WARNING."""
        key, now = (peer_id, str(reason)), self.clock()
        with self._lock:
            last = self._last.get(key)
            loud = last is None or now - last >= self.repeat_s
            if loud:
                self._last[key] = now
                self._last.move_to_end(key)
                while len(self._last) > MEMORY:
                    self._last.popitem(last=False)
        if loud:
            self.logger.warning("dropping record of %s: %s (repeats within %.0f s are logged at DEBUG)", peer_id,
                                reason, self.repeat_s)
        else:
            self.logger.debug("dropping record of %s: %s", peer_id, reason)
        return loud
