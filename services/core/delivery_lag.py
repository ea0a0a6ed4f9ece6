"""How long the orchestrator's own hops take to move an event to the sockets, per hop.

The chat latency histograms (queue wait, time to first chunk, answer time) measure a task from
its acceptance, the AES's time included, and say nothing about a `websocket.send` or a chunk
that reached its socket late. A realtime gateway is judged by the gap between the AES handing
over an event and the socket getting it, and an SRE paged for slow answers must tell "the AES
is slow" from "we are". Two hops make that gap, each timed from a stream id (the Redis clock's
milliseconds, given when the entry was added):

- `worker`: from the callback's XADD to the partition stream to its effect (the session-log
  append and publish) being sent by the worker;
- `api`: from the event's session-log append to an api pod handing it to its sockets.

Each compares the process's clock with the Redis server's, so a skew between the two shifts
the figures by that much (a lag below zero counts as zero); the ids are whole milliseconds.
A replay from the log (a resume, a catch-up after an outage) is not a live delivery and is not
counted.
"""

from __future__ import annotations

from prometheus_client import Histogram

from services.core import clock
from services.core.metric_buckets import LATENCY_BUCKETS

DELIVERY_LAG_METRIC = "orchestrator_delivery_lag_seconds"

delivery_lag = Histogram(
    DELIVERY_LAG_METRIC,
    "From an event's stream id (Redis clock) to this process passing it on, by hop: worker "
    "(callback XADD -> effect sent), api (session-log append -> handed to the pod's sockets)",
    ["hop"],
    buckets=LATENCY_BUCKETS,
)


class LagClock:
    """One hop's observations: `since(stream_id)` records how old an entry is now."""

    def __init__(self, hop: str) -> None:
        self._observe = delivery_lag.labels(hop).observe

    def since(
        self,
        stream_id: str,
        now: float | None = None,
        exemplar: dict[str, str] | None = None,
    ) -> None:
        """Record the time from `stream_id`'s millisecond part to `now` (epoch seconds; the
        current time when not given), with the `exemplar` of a traced event (its trace id: a
        slow delivery on the dashboard opens its trace). An id that is not `<ms>-<seq>` is
        ignored: a metric must never fail a delivery."""
        millis, _, _ = stream_id.partition("-")
        if not millis.isdigit():
            return
        lag = (clock.now() if now is None else now) - int(millis) / 1000
        self._observe(lag if lag > 0 else 0.0, exemplar)
