#!/usr/bin/env python3
"""Blackhole shadow: accepts TCP connections, reads and discards whatever
arrives, never answers. Every 0.25 s it writes its counters as JSON to
STATS_FILE: connections accepted, connections open, HTTP/1.1 request lines
seen (approximate request count), bytes read.

    blackhole.py PORT STATS_FILE
"""
import asyncio
import json
import os
import sys

PATTERN = b" HTTP/1.1\r\n"  # 11 bytes; a 10-byte tail can never hold a whole match

stats = {"connections": 0, "open": 0, "requests": 0, "bytes": 0}


async def handle(reader, writer):
    stats["connections"] += 1
    stats["open"] += 1
    tail = b""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            stats["bytes"] += len(data)
            buf = tail + data
            stats["requests"] += buf.count(PATTERN)
            tail = buf[-10:]
    except (ConnectionError, OSError):
        pass
    finally:
        stats["open"] -= 1
        writer.close()


async def dump(path):
    tmp = path + ".tmp"
    while True:
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)
        await asyncio.sleep(0.25)


async def main():
    port, path = int(sys.argv[1]), sys.argv[2]
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await asyncio.gather(server.serve_forever(), dump(path))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
