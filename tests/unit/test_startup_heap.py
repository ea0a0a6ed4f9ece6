"""A process freezes its start-up heap, and never freezes start-up garbage with it."""

from __future__ import annotations

import gc
import weakref

from services.core.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_start_up_objects_are_frozen_and_start_up_garbage_is_collected_first() -> None:
    kept = Node()
    garbage = Node()
    garbage.other = Node()
    garbage.other.other = garbage  # a cycle only a collection frees
    gone = weakref.ref(garbage)
    del garbage
    assert gone() is not None
    try:
        freeze_startup_heap()
        assert gone() is None  # collected, not frozen for the life of the process
        assert gc.get_freeze_count() > 0
        # Later collections leave the frozen objects alone: nothing of `kept` is visited.
        assert all(obj is not kept for obj in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
