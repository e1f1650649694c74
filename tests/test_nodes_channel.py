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


TOUCHED = []


def _touch():
    TOUCHED.append(1)
    return "touched"


class _Evil:
    def __reduce__(self):
        return (_touch, ())


def test_a_node_serves_only_a_head_with_its_token():
    """A node actor's listener (here in this process, a Unix socket) closes a connection whose first 32 bytes
    are not a registered token, without unpickling what follows; with the token it answers batches."""
    import torch

    from hetmem.runtime.nodes.cluster import TOKEN_BYTES, NodeActor

    node = NodeActor(0, torch.get_num_threads())
    token = b"t" * TOKEN_BYTES
    ch = node.open_channel(token, True)
    assert ch["kind"] == "unix"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(ch["address"])
        s.sendall(b"x" * TOKEN_BYTES)
        send_frames(s, pack([_Evil()]))
        try:
            assert s.recv(1) == b""  # closed (or reset: the node left the rest unread)
        except ConnectionResetError:
            pass
    assert TOUCHED == []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(ch["address"])
        s.sendall(token)
        assert recv_msg(s) == "ok"
        send_frames(s, pack([{"op": "echo", "x": np.arange(5)}]))
        status, res, _ = recv_msg(s)
        assert status == "ok" and np.array_equal(res["results"][0], np.arange(5))
        send_frames(s, pack([{"op": "score", "cache": "nope", "layer": 0}]))
        assert recv_msg(s)[:2] == ("error", "KeyError")
