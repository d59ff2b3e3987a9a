"""NBD helper for tidemark's daemon tests, on python3-libnbd (run with /usr/bin/python3).

  dirty URI BITMAP            print the dirty extents of qemu:dirty-bitmap:BITMAP as JSON
  apply URI BITMAP IMAGE      copy those extents from the export into IMAGE (an incremental
                              restore); print the extents as JSON
  contexts URI                print every meta context the export offers, as JSON
  read8 URI OFFSET            print the little-endian u64 at OFFSET
  counter A_URI B_URI         forever: n += 1; write n at offset 0 of A, then of B
  pattern URI SEED            forever: write random blocks, one line "offset length byte"
                              per acknowledged write (flushed)
  fragment URI BLOCK COUNT    write 512 bytes at the start of every other BLOCK-sized block
                              of the first 2 * COUNT blocks (64 writes in flight)
  latency URI SECONDS         for SECONDS: 4 KiB writes at random offsets of the upper half
                              of the export, one at a time;
                              print "running" after the first, then {"writes", "p99"} JSON
                              (p99 latency in seconds)
"""
import json
import random
import struct
import sys
import time

import nbd


def connect(uri, contexts=()):
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(uri)
    return h


def dirty_extents(h, context):
    if not h.can_meta_context(context):
        sys.exit(f"the export does not offer {context}")
    size = h.get_size()
    extents = []
    offset = 0
    while offset < size:
        reached = [offset]

        def callback(metacontext, start, entries, err):
            if metacontext != context:
                return 0
            at = start
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                if flags & 1:
                    if extents and extents[-1][0] + extents[-1][1] == at:
                        extents[-1][1] += length
                    else:
                        extents.append([at, length])
                at += length
            reached[0] = at
            return 0

        h.block_status(min(size - offset, 1 << 30), offset, callback)
        if reached[0] <= offset:
            sys.exit(f"block status made no progress at {offset}")
        offset = reached[0]
    return [[o, min(l, size - o)] for o, l in extents if o < size]


def main():
    mode = sys.argv[1]
    if mode == "dirty":
        context = "qemu:dirty-bitmap:" + sys.argv[3]
        h = connect(sys.argv[2], [context])
        print(json.dumps(dirty_extents(h, context)))
    elif mode == "apply":
        context = "qemu:dirty-bitmap:" + sys.argv[3]
        h = connect(sys.argv[2], [context])
        extents = dirty_extents(h, context)
        with open(sys.argv[4], "r+b") as image:
            for offset, length in extents:
                done = 0
                while done < length:
                    n = min(length - done, 8 << 20)
                    image.seek(offset + done)
                    image.write(h.pread(n, offset + done))
                    done += n
        print(json.dumps(extents))
    elif mode == "contexts":
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(sys.argv[2])
        found = []
        h.opt_list_meta_context(lambda name: found.append(name) or 0)
        h.opt_abort()
        print(json.dumps(sorted(found)))
    elif mode == "read8":
        h = connect(sys.argv[2])
        print(struct.unpack("<Q", h.pread(8, int(sys.argv[3])))[0])
    elif mode == "counter":
        a, b = connect(sys.argv[2]), connect(sys.argv[3])
        n = 0
        while True:
            n += 1
            block = struct.pack("<Q", n) + bytes(4088)
            a.pwrite(block, 0)
            b.pwrite(block, 0)
            if n == 50:
                print("running", flush=True)
    elif mode == "pattern":
        h = connect(sys.argv[2])
        rng = random.Random(int(sys.argv[3]))
        size = h.get_size()
        while True:
            length = rng.choice([4096, 16384, 65536, 200000])
            offset = rng.randrange(0, size - length) & ~511
            byte = rng.randrange(1, 256)
            h.pwrite(bytes([byte]) * length, offset)
            print(offset, length, byte, flush=True)
    elif mode == "fragment":
        h = connect(sys.argv[2])
        block, count = int(sys.argv[3]), int(sys.argv[4])
        data = nbd.Buffer.from_bytearray(bytearray(b"\x07" * 512))
        for i in range(count):
            while h.aio_in_flight() >= 64:
                h.poll(-1)
            h.aio_pwrite(data, 2 * i * block)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
    elif mode == "latency":
        h = connect(sys.argv[2])
        size = h.get_size()
        rng = random.Random(1)
        block = bytes([9]) * 4096
        deadline = time.monotonic() + float(sys.argv[3])
        latencies = []
        while time.monotonic() < deadline:
            offset = size // 2 + rng.randrange(0, size // 2 // 4096) * 4096
            start = time.monotonic()
            h.pwrite(block, offset)
            latencies.append(time.monotonic() - start)
            if len(latencies) == 1:
                print("running", flush=True)
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)]
        print(json.dumps({"writes": len(latencies), "p99": p99}), flush=True)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
