"""Whose turn it is to run the scheduler's next round (runtime/scheduler.py runs the rounds).

No thread of its own: a caller waiting for its next tokens runs the next round of passes for everyone (one caller at
a time; the others wait for the round to end), so a request alone pays no thread hand-off per pass, and requests
progress while any caller waits. `exclusive` hands the slots to one caller's own decode loop.
"""
from __future__ import annotations

import collections
import contextlib
import queue
import threading

from speccompile.runtime.acceptance import SpecDecodeStats
from speccompile.runtime.request import Request
from speccompile.runtime.slots import Handle, Slot, round_failed, without_cancelled
from speccompile.runtime.streams import CANCEL_POLL_S


class Turns:
    """The callers' side of a Scheduler: submitting requests, waiting for items, taking turns to run rounds. The
    subclass gives _round (a round for every request in a slot), _free_cancelled and _finish."""

    def __init__(self, gen, slots: list[Slot | None]):
        self.gen, self.slots = gen, slots
        self.waiting: collections.deque[Handle] = collections.deque()
        self.wake = threading.Condition()  # guards `waiting`, `driving` and `draining`
        self.driving = False  # a caller is running a round
        self.draining = 0  # callers waiting in exclusive(): no request takes a slot meanwhile, so the slots empty

    def submit(self, request: Request, stats: SpecDecodeStats) -> Handle:
        handle = Handle(self, request, stats)
        with self.wake:
            self.waiting = without_cancelled(self.waiting)  # streams dropped unread are only marked cancelled
            self.waiting.append(handle)
        return handle

    def next_item(self, handle: Handle):
        """The handle's next queued item, running rounds (or waiting for another caller's) until there is one."""
        while True:
            try:
                return handle.queue.get_nowait()
            except queue.Empty:
                pass
            with self.wake:  # nothing to run once the slots have drained for exclusive(), which runs next
                while (self.driving or self.draining and not any(self.slots)) and handle.queue.empty():
                    self._wait_for_turn(handle)
                if not handle.queue.empty():
                    continue
                self.driving = True
            self._drive(self._round, handle)

    def _wait_for_turn(self, handle: Handle) -> None:
        """Wait (holding self.wake) for another caller's round, or exclusive()'s hold, to end. The hold of a request in
        its own loop (runtime/request.py own_loop) lasts its whole generation and cancel() wakes no one: the wait looks at it every CANCEL_POLL_S, and
        a request cancelled while it waits for a slot ends then (DONE). The hold of this thread's own loop would
        never end while this thread waits: refused, as reading a second stream of one's own loop is."""
        if handle.cancelled:
            self.waiting = without_cancelled(self.waiting)
            if not handle.queue.empty():
                return
        self.gen.check_owner()
        self.wake.wait(CANCEL_POLL_S)

    @contextlib.contextmanager
    def exclusive(self, own=None):
        """The slots to one caller's own decode loop: runs rounds until no request holds a slot, then keeps every
        other caller from running one (they wait, as for another's round) until the block ends. Meanwhile no
        request takes a slot: under a steady stream of requests the slots would never all be free. own: the
        request that waits (streams.OwnLoop); cancelled meanwhile, it stops waiting (and stalling admissions) and
        gets no hold. Yields whether it holds the slots."""
        cancelled = lambda: own is not None and own.cancelled  # noqa: E731
        with self.wake:
            self.draining += 1
        held = False
        try:
            while not cancelled():
                with self.wake:
                    while self.driving and not cancelled():
                        self.wake.wait(None if own is None else CANCEL_POLL_S)  # cancel() wakes no one
                    if cancelled():
                        break
                    self.driving = True
                    if not any(self.slots):
                        held = True
                        break
                self._drive(self._round)
        finally:
            with self.wake:
                self.draining -= 1
                self.wake.notify_all()
        try:
            yield held
        finally:
            if held:
                with self.wake:
                    self.driving = False
                    self.wake.notify_all()

    def tidy(self) -> None:
        """Free the slots of cancelled requests now, unless a round (which does it first) is running."""
        with self.wake:
            self.waiting = without_cancelled(self.waiting)  # a stream closed before it took a slot
            if self.driving:
                return
            self.driving = True
        self._drive(self._free_cancelled)

    def _drive(self, work, own: Handle | None = None) -> None:
        """Run `work` as this caller's turn. If it raises, every request in a slot ends (the round may have left
        its state half-updated): `own`, this caller's request, with the exception itself, each other with an error
        of its own; a KeyboardInterrupt or SystemExit is this thread's alone and is raised here."""
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - the slots reset whatever the failure
            for s in filter(None, self.slots):
                self._finish(s, e if s.handle is own else round_failed(e))
            if not isinstance(e, Exception):
                raise
        finally:
            with self.wake:
                self.driving = False
                self.wake.notify_all()
