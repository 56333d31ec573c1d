"""pbn_gluon.engine's deferred writes, the orderings SyncBatchNorm's meeting relies on: readers
of a reserved output wait for fulfil() and see its value; fulfil() before the engine even holds
the lock; fulfil() of a value that is itself still being computed; release() without a write;
many reservations fulfilled from other threads in any order."""
import random
import threading
import time

import mxnet as mx
import numpy as np

from pbn_gluon import engine


def read_in_thread(array):
    """Start reading `array` (asnumpy) in a thread; returns (thread, result list)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(array.asnumpy()), daemon=True)
    thread.start()
    return thread, result


def test_readers_wait_for_fulfil_and_see_its_value():
    out = mx.nd.zeros(3)
    reservation = engine.reserve(out)
    reader = out + 1
    thread, result = read_in_thread(reader)
    time.sleep(0.3)
    assert not result, 'a reader of a reserved output ran before fulfil'
    engine.fulfil(reservation, mx.nd.array([1, 2, 3]))
    thread.join(10)
    np.testing.assert_array_equal(result[0], [2, 3, 4])
    np.testing.assert_array_equal(out.asnumpy(), [1, 2, 3])


def test_fulfil_right_after_reserve():
    for _ in range(50):
        out = mx.nd.zeros(2)
        engine.fulfil(engine.reserve(out), mx.nd.array([5, 6]))
        np.testing.assert_array_equal(out.asnumpy(), [5, 6])


def test_fulfil_waits_for_a_value_still_being_computed():
    """The value depends on another reserved array: out gets it once both are fulfilled, in
    reverse order of reservation."""
    first, out = mx.nd.zeros(2), mx.nd.zeros(2)
    r_first = engine.reserve(first)
    r_out = engine.reserve(out)
    engine.fulfil(r_out, first * 10)
    thread, result = read_in_thread(out)
    time.sleep(0.2)
    assert not result
    engine.fulfil(r_first, mx.nd.array([1, 2]))
    thread.join(10)
    np.testing.assert_array_equal(result[0], [10, 20])


def test_release_keeps_the_old_value_and_unblocks_readers():
    out = mx.nd.array([7, 8])
    reservation = engine.reserve(out)
    thread, result = read_in_thread(out * 2)
    engine.release(reservation)
    thread.join(10)
    np.testing.assert_array_equal(result[0], [14, 16])


def test_many_reservations_fulfilled_from_threads_in_any_order():
    outs = [mx.nd.zeros(4) for _ in range(40)]
    reservations = [engine.reserve(o) for o in outs]
    order = list(range(len(outs)))
    random.Random(0).shuffle(order)
    threads = [threading.Thread(target=engine.fulfil,
                                args=(reservations[i], mx.nd.full(4, float(i))))
               for i in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    total = mx.nd.add_n(*outs).asnumpy()
    np.testing.assert_array_equal(total, np.full(4, sum(range(len(outs)))))
