"""How close does a tbf-shaped lab link get to its rate on this machine?

    python perf/netlab_rate.py [--rate 400mbit] [--seconds 3] [--burst 256kb] [--latency 50ms]

Builds a two-host lab (tests/netlab.py; root needed), shapes the sender's uplink with tbf at
``--rate`` and pushes one TCP stream of zeros through it for ``--seconds``. The receiver counts
payload bytes from its first byte to EOF, and over the same run the script reads tbf's own
byte counter. It prints both rates against the asked one. tbf counts whole frames (Ethernet and
IP/TCP headers included), so TCP payload tops out near 1448/1514 of the rate at MTU 1500 even
when tbf itself holds its rate. The lab is always removed, even when interrupted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Lab, available  # noqa: E402

#: argv: ADDR. Prints its port; for one connection, prints "<payload bytes> <seconds>"
#: from the first byte to EOF.
RECEIVER = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
buf = bytearray(1 << 20)
n = c.recv_into(buf)
t0 = time.monotonic()
while k := c.recv_into(buf):
    n += k
print(n, time.monotonic() - t0, flush=True)
"""

#: argv: ADDR PORT SECONDS. Sends zeros in 4 MiB writes until SECONDS have passed.
SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
buf = memoryview(bytes(4 << 20))
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(buf)
c.close()
"""

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def bits_per_s(rate: str) -> float:
    """``"400mbit"`` -> 4e8 (tc's decimal units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise SystemExit(f"rate must look like 400mbit, not {rate!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def tbf_sent(stats: str) -> int:
    m = re.search(r"Sent (\d+) bytes", stats)
    return int(m.group(1)) if m else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="400mbit")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--burst", default="256kb")
    ap.add_argument("--latency", default="50ms")
    args = ap.parse_args()
    asked = bits_per_s(args.rate)
    if (reason := available()) is not None:
        print(f"netlab_rate: {reason}", file=sys.stderr)
        return 2
    with Lab() as lab:
        src = lab.add_host("src", rate=args.rate, burst=args.burst, latency=args.latency)
        dst = lab.add_host("dst")
        recv = dst.popen(
            [sys.executable, "-c", RECEIVER, dst.addr], stdout=subprocess.PIPE, text=True
        )
        assert recv.stdout is not None
        port = recv.stdout.readline().strip()
        sent0 = tbf_sent(src.qdisc_stats())
        src.run(
            [sys.executable, "-c", SENDER, dst.addr, port, str(args.seconds)],
            timeout=args.seconds + 60,
            check=True,
        )
        nbytes, secs = recv.stdout.readline().split()
        recv.wait(timeout=30)
        frames = tbf_sent(src.qdisc_stats()) - sent0
    payload = int(nbytes) * 8 / float(secs)
    on_wire = frames * 8 / float(secs)
    print(f"asked {asked / 1e6:.0f} Mbit/s ({args.rate}, burst {args.burst}, {args.latency})")
    print(f"tbf   {on_wire / 1e6:.1f} Mbit/s of frames ({on_wire / asked:.1%} of the rate)")
    print(f"TCP   {payload / 1e6:.1f} Mbit/s of payload ({payload / asked:.1%} of the rate)")
    print(f"      {int(nbytes)} bytes in {float(secs):.2f} s, one stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
