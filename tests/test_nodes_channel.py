"""The memory nodes' direct channel (runtime.nodes.cluster): a message carries lists of dicts of numpy arrays
and plain values exactly, arrays arrive aligned and writable, large messages and objects only cloudpickle can
carry go through, and a closed channel is an error, not a hang (no Ray here: tests/test_nodes_ray.py runs it
between processes)."""

import socket
import threading

import numpy as np
import pytest

from hetmem.runtime.nodes.cluster import pack, recv_msg, send_frames


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_batch_round_trips_exactly(pair):
    a, b = pair
    rng = np.random.default_rng(0)
    batch = [{"op": "score", "cache": "c1", "layer": 3, "q": rng.standard_normal((1, 3, 3, 64)).astype(np.float32),
              "m": 64, "scale": 0.125, "softcap": None, "sinks": None},
             {"op": "append", "k": np.arange(7, dtype=np.int64)[::2], "v": np.zeros((2, 0), np.float32),
              "f": np.asfortranarray(rng.standard_normal((5, 3)))}]
    send_frames(a, pack(batch))
    got = recv_msg(b)
    assert got[0].keys() == batch[0].keys() and got[0]["softcap"] is None and got[0]["scale"] == 0.125
    for x, y in ((got[0]["q"], batch[0]["q"]), (got[1]["k"], batch[1]["k"]), (got[1]["v"], batch[1]["v"]),
                 (got[1]["f"], batch[1]["f"])):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    assert got[0]["q"].flags.writeable and got[0]["q"].ctypes.data % 16 == 0


def test_a_large_message_and_a_cloudpickled_object(pair):
    a, b = pair
    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB: more than one write
    box = {}
    t = threading.Thread(target=lambda: box.update(msg=recv_msg(b)))
    t.start()
    send_frames(a, pack([{"x": big, "f": lambda v: v + 1}]))
    t.join(30)
    assert np.array_equal(box["msg"][0]["x"], big) and box["msg"][0]["f"](1) == 2


def test_a_closed_channel_is_an_error(pair):
    a, b = pair
    send_frames(a, pack("ok")[:1])  # a header, then the other end goes away
    a.close()
    with pytest.raises(ConnectionError):
        recv_msg(b)
