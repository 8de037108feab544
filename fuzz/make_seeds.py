#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (committed; rerun
after changing an input format). Each seed follows the input format that the
target's doc comment describes."""

import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- cow_header: control byte + COW file ----

MAGIC = 0x4F4F4F4D
BACKING = b"/tmp/base.img"


def round_up(v, a):
    return (v + a - 1) // a * a


def v3(size, ss=512, align=4096, mtime=1_700_000_000, name=BACKING, bits=b""):
    h = struct.pack(">IIIQIII", MAGIC, 3, mtime, size, ss, align, 0)
    h += name + b"\0" * (4096 - len(name))
    assert len(h) == 4128
    bo = round_up(4128, align)
    chunks = -(-size // ss)
    blen = -(-chunks // 8)
    f = h + b"\0" * (bo - len(h)) + (bits + b"\0" * blen)[:blen]
    return f


def v3_broken(size, ss=512, align=4096, mtime=7, name=BACKING):
    # mtime u32 at 8, 4 bytes padding, size u64 at 16, sectorsize at 24,
    # alignment at 28, cow_format at 32 (zero), name at 36.
    h = struct.pack(">III", MAGIC, 3, mtime) + b"\0" * 4
    h += struct.pack(">QIII", size, ss, align, 0) + name
    h += b"\0" * (4136 - len(h))
    bo = round_up(4136, align)
    chunks = -(-size // ss)
    return h + b"\0" * (bo - len(h)) + b"\xff" * (-(-chunks // 8))


def v2(size, ss=512, mtime=3, name=BACKING):
    h = struct.pack(">II", MAGIC, 2) + name + b"\0" * (4096 - len(name))
    h += struct.pack(">IQI", mtime, size, ss)
    assert len(h) == 4120
    blen = (size + ss - 1) // (8 * ss)
    return h + b"\x01" * blen


def v1(size, ss=512, mtime=3, name=BACKING, little=True):
    e = "<" if little else ">"
    h = struct.pack(e + "II", MAGIC, 1) + name + b"\0" * (256 - len(name))
    h += struct.pack(e + "IQI", mtime, size, ss)
    assert len(h) == 280
    blen = (size + ss - 1) // (8 * ss)
    return h + b"\x80" * blen


def full(f, data_offset, size):
    f = f + b"\0" * (data_offset - len(f))
    return f + bytes(i % 251 for i in range(size))


def cow_header_seeds():
    seeds = {
        "v3-64k": v3(65536),
        "v3-odd-size": v3(65536 + 17, bits=b"\x05"),
        "v3-align512": v3(40960, align=512),
        "v3-ss4096": v3(512 << 10, ss=4096, bits=b"\xff\x01"),
        # Whole files (data area included): check finds them clean.
        "v3-clean": full(v3(4096, align=512, bits=b"\x0f"), 5120, 4096),
        "v1-clean": full(v1(4096), 512, 4096),
        "v3-relative-name": v3(65536, name=b"base.img"),
        "v3-broken": v3_broken(65536),
        "v2": v2(65536 + 512),
        "v1-le": v1(4096 * 8 + 1024),
        "v1-be": v1(8192, little=False),
        "bad-magic": b"\0" * 64,
        "truncated-v3": v3(65536)[:100],
        "raw": b"hello raw image " * 40,
    }
    for name, body in seeds.items():
        # 0x03: fix up size/mtime and write the backing file's path into
        # the header; 0x10: open even if the header does not parse; 0x1D:
        # fix up, the header's name kept but the backing file passed
        # explicitly, the format named.
        for control in (0x03, 0x10, 0x1D):
            put("cow_header", f"{name}-{control:02x}", bytes([control]) + body)


# ---- virtio_request ----

NEXT, WRITE, INDIRECT = 1, 2, 4


def a(cls, off=0):
    return (cls << 60) | off


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def chain(descs):
    """Linked descriptors [(addr, len, write)] -> table bytes."""
    out = b""
    for i, (ad, ln, w) in enumerate(descs):
        f = (WRITE if w else 0) | (NEXT if i + 1 < len(descs) else 0)
        out += desc(ad, ln, f, i + 1)
    return out


def request(flags, t, sector, table, itable=b"", payload=b"", qlog=5, head=0):
    hdr = struct.pack("<IIQ", t, 0, sector)
    n, ni = len(table) // 16, len(itable) // 16
    return (
        bytes([flags, qlog])
        + struct.pack("<H", head)
        + hdr
        + bytes([n, ni])
        + table
        + itable
        + payload
    )


def virtio_request_seeds():
    H, D, S = a(0), a(1), a(2)
    seeds = {
        "in": request(0, 0, 8, chain([(H, 16, 0), (D, 4096, 1), (S, 1, 1)])),
        "in-3-segs": request(
            0, 0, 0, chain([(H, 16, 0), (D, 512, 1), (a(1, 0x1000), 1024, 1), (S, 1, 1)])
        ),
        "out": request(0, 1, 3, chain([(H, 16, 0), (D, 512, 0), (S, 1, 1)])),
        "out-readonly": request(2, 1, 3, chain([(H, 16, 0), (D, 512, 0), (S, 1, 1)])),
        "flush": request(0, 4, 0, chain([(H, 16, 0), (S, 1, 1)])),
        "get-id": request(0, 8, 0, chain([(H, 16, 0), (D, 20, 1), (S, 1, 1)])),
        "discard": request(
            0, 11, 0, chain([(H, 16, 0), (D, 16, 0), (S, 1, 1)]),
            payload=struct.pack("<QII", 16, 8, 0),
        ),
        "write-zeroes-unmap": request(
            0x40, 13, 0, chain([(H, 16, 0), (D, 32, 0), (S, 1, 1)]),
            payload=struct.pack("<QII", 16, 8, 1) + struct.pack("<QII", 100, 1, 0),
        ),
        "header-and-status-in-one": request(0, 4, 0, chain([(H, 17, 1)])),
        "two-regions-split-segment": request(
            1, 0, 0, chain([(H, 16, 0), (a(4, 0), 512, 1), (S, 1, 1)])
        ),
        "status-at-end-of-memory": request(
            0, 4, 0, chain([(H, 16, 0), (a(5, 0xff), 1, 1)])
        ),
        "indirect-in": request(
            0, 0, 8,
            desc(a(3), 48, INDIRECT, 0),
            itable=chain([(H, 16, 0), (D, 4096, 1), (S, 1, 1)]),
        ),
        "indirect-out": request(
            1, 1, 0,
            desc(a(3), 48, INDIRECT, 0),
            itable=chain([(H, 16, 0), (D, 1024, 0), (S, 1, 1)]),
        ),
        "head-in-middle": request(
            0, 0, 0,
            desc(0, 0, 0, 0) + desc(H, 16, NEXT, 2) + desc(D, 512, NEXT | WRITE, 3)
            + desc(S, 1, WRITE, 0),
            head=1,
        ),
        "loop": request(0, 0, 0, desc(H, 16, NEXT, 1) + desc(D, 512, NEXT | WRITE, 0)),
    }
    for name, body in seeds.items():
        put("virtio_request", name, body)


# ---- vhost_user_messages: control byte + message stream ----

V1, REPLY, NEED_REPLY = 0x1, 0x4, 0x8


def msg(req, payload=b"", flags=V1):
    return struct.pack("<III", req, flags, len(payload)) + payload


def u64(v):
    return struct.pack("<Q", v)


def vring_state(index, num):
    return struct.pack("<II", index, num)


VIRTIO_F_VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30
PROTO = 0x1 | 0x8 | 0x200 | 0x8000  # MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS
MEM = 0x10_0000


def handshake(ack=False, mem=True, features=VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES):
    f = V1 | (NEED_REPLY if ack else 0)
    s = msg(1)  # GET_FEATURES
    s += msg(3)  # SET_OWNER
    s += msg(15)  # GET_PROTOCOL_FEATURES
    s += msg(16, u64(PROTO))  # SET_PROTOCOL_FEATURES
    s += msg(17)  # GET_QUEUE_NUM
    s += msg(36)  # GET_MAX_MEM_SLOTS
    s += msg(24, struct.pack("<III", 0, 60, 0) + b"\0" * 60)  # GET_CONFIG
    s += msg(2, u64(features), f)  # SET_FEATURES
    if mem:
        # SET_MEM_TABLE: one region of 1 MiB at guest 0, user address MEM.
        s += msg(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEM, MEM, 0), f)
    s += msg(8, vring_state(0, 128), f)  # SET_VRING_NUM
    s += msg(10, vring_state(0, 0), f)  # SET_VRING_BASE
    # SET_VRING_ADDR: desc, used, avail (user addresses), log.
    s += msg(9, struct.pack("<IIQQQQ", 0, 0, MEM, MEM + 0x2000, MEM + 0x1000, 0), f)
    s += msg(13, u64(0), f)  # SET_VRING_CALL (fd)
    s += msg(14, u64(0x100), f)  # SET_VRING_ERR (no fd)
    s += msg(12, u64(0), f)  # SET_VRING_KICK (fd)
    s += msg(18, vring_state(0, 1), f)  # SET_VRING_ENABLE
    s += msg(25, struct.pack("<III", 32, 1, 0) + b"\x01", f)  # SET_CONFIG writeback
    s += msg(11, vring_state(0, 0))  # GET_VRING_BASE
    return s


def guest_io(t, sector, n=1, data_len=4096):
    """Pseudo-messages: a virtio-blk request in guest memory (rings as
    SET_VRING_ADDR of `handshake` puts them), then a kick of queue 0."""
    WM, KICK = 0x7F000000, 0x7F000001
    table = b""
    for i in range(n):
        base = i * 0x100
        table += desc(0x10000 + base, 16, NEXT, 3 * i + 1)
        table += desc(0x20000 + 0x2000 * i, data_len, NEXT | (WRITE if t == 0 else 0), 3 * i + 2)
        table += desc(0x30000 + base, 1, WRITE, 0)
    s = msg(WM, struct.pack("<I", 0) + table)
    avail = struct.pack("<HH", 0, n) + b"".join(struct.pack("<H", 3 * i) for i in range(n))
    s += msg(WM, struct.pack("<I", 0x1000) + avail)
    for i in range(n):
        s += msg(WM, struct.pack("<I", 0x10000 + i * 0x100) + struct.pack("<IIQ", t, 0, sector + 8 * i))
    s += msg(KICK, b"\0")
    return s


def vhost_user_messages_seeds():
    hs = handshake()
    seeds = {
        "handshake-fds": b"\x01" + hs,
        "handshake-fds-ack": b"\x01" + handshake(ack=True),
        "handshake-in-request": b"\x01" + handshake()[:-20] + guest_io(0, 8) + msg(11, vring_state(0, 0)),
        "handshake-out-requests": b"\x01" + handshake(ack=True)[:-20] + guest_io(1, 0, n=3)
        + msg(11, vring_state(0, 0)),
        "handshake-no-fds": b"\x00" + hs,
        "handshake-readonly-4q": b"\x0f" + handshake(ack=True),
        "no-protocol-features": b"\x01"
        + msg(1) + msg(3) + msg(2, u64(VIRTIO_F_VERSION_1))
        + msg(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEM, MEM, 0)),
        "add-remove-region": b"\x01"
        + msg(15) + msg(16, u64(PROTO)) + msg(36)
        + msg(37, u64(0) + struct.pack("<QQQQ", 0, MEM, MEM, 0))
        + msg(37, u64(0) + struct.pack("<QQQQ", MEM, MEM, 2 * MEM, 0))
        + msg(38, u64(0) + struct.pack("<QQQQ", 0, MEM, MEM, 0)),
        "refused": b"\x01"
        + msg(15) + msg(16, u64(PROTO))
        + msg(34) + msg(31, b"\0" * 24) + msg(6, b"\0" * 16) + msg(44),
        "bad-version": b"\x00" + msg(1, flags=0x2),
    }
    for name, body in seeds.items():
        put("vhost_user_messages", name, body)


# ---- scheduler: config, script, choices ----


def scheduler_seeds():
    rng = random.Random(12)

    def script(reqs):
        return bytes([len(reqs)]) + b"".join(bytes(r) for r in reqs)

    W, R, Z, F = 0, 4, 8, 9
    T1 = 0x80
    scripts = {
        "writes-same-byte-read": [(W, 0, 0), (W | T1, 1, 1), (R, 1, 1)],
        "same-sector-flush": [(W, 3, 0), (W | T1, 3, 0), (F, 0, 0)],
        "merge-zero-read": [(W, 0, 0), (W | T1, 2, 0), (Z, 4, 0), (R | T1, 0, 11)],
        "copy-up-race": [(W, 0, 0), (W | T1, 2, 0), (R, 0, 3)],
    }
    for name, reqs in scripts.items():
        for cfg in (0x05, 0x00, 0x20, 0x48, 0x60):
            choices = bytes(rng.randrange(256) for _ in range(120))
            put("scheduler", f"{name}-{cfg:02x}", bytes([cfg]) + script(reqs) + choices)
    for i in range(6):
        n = rng.randrange(20, 70)
        reqs = [(rng.randrange(256), rng.randrange(40), rng.randrange(5)) for _ in range(n)]
        choices = bytes(rng.randrange(256) for _ in range(600))
        put("scheduler", f"random-{i}", bytes([rng.randrange(128)]) + script(reqs) + choices)


if __name__ == "__main__":
    cow_header_seeds()
    virtio_request_seeds()
    vhost_user_messages_seeds()
    scheduler_seeds()
