"""The operator's garbage-collector settings (stdlib ``gc`` only; no Kubernetes).

The operator keeps a copy of every node, GPUNode and cluster it watches (kopf's indexes)
and decodes thousands of short-lived watch events a second in a burst. With CPython's
default thresholds (700, 10, 10) the young generation fills every few events, whatever
is in flight at that moment survives into the old generations, and full collections
keep walking the few hundred thousand long-lived objects listed at start: in a burst of
1,000 GPUClusters on 1,000 nodes that was about a quarter of the operator's CPU
(docs/benchmarks-reconcile.md). Two settings, as long-running CPython services use:

- a larger young generation, so the temporaries of an event die (by reference count)
  before a collection looks at them;
- once the first listing is in, what exists is frozen (``gc.freeze``): the collector
  stops walking it. Those objects are still freed by reference count when they go; only
  a reference cycle among them would outlive its use, once.
"""

from __future__ import annotations

import gc
import threading

#: Young, middle and old generation thresholds (CPython's defaults: 700, 10, 10).
THRESHOLDS = (20_000, 20, 10)

_frozen = threading.Event()
_lock = threading.Lock()


def tune() -> None:
    """Set the thresholds; call once, before the operator starts listing."""
    gc.set_threshold(*THRESHOLDS)


def freeze_listed() -> bool:
    """Freeze what exists now, the first time only; True when this call froze it.

    Called when the first handler runs: kopf lists every indexed resource before any
    handler runs, so the heap then holds what lives as long as the process.
    """
    if _frozen.is_set():
        return False
    with _lock:
        if _frozen.is_set():
            return False
        gc.collect()  # garbage from start-up is not frozen with the rest
        gc.freeze()
        _frozen.set()
        return True
