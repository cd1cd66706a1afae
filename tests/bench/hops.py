#!/usr/bin/env python3
"""Where an event's time goes between its publish and its POST, hop by hop.

Reads a loopback capture taken while `swallow-load` runs its latency step
and sweep (step 4/5), finds every packet that carries a load event's text
(`load 123`, `load s0 123`; in the POST's form body `load+s0+123`), and
times each hop from the wire:

  1. broker: event published by the load generator -> delivered to the matcher
  2. matcher: event delivered -> delivery job published
  3. broker: job published -> delivered to the deliverer
  4. deliverer: job delivered -> POST sent to the handler

Usage (root, for tcpdump; standard library only):

  target/dist/swallow-load --seconds 30 > load.log &
  until grep -q 4/5 load.log; do sleep 0.2; done
  tcpdump -i lo -s 0 -B 65536 -w cap.pcap tcp & sleep 1
  until grep -q 5/5 load.log; do sleep 0.2; done; kill %2
  python3 tests/bench/hops.py cap.pcap

Or a capture of `swallow-load --latency-only --latency-rate R` (texts
`load rK N`, counted as "half load": the rate given).

Prints p50/p90/p99 per hop for the half-load window (texts `load N`) and
for each sweep step (`load sK N`), and the same per half-second window of
the half-load run where any event took over 60 ms (`--windows`, or
`--windows=MS` for another bound). `--slow=MS`: of the half-load events
that took over MS, which hop was the slowest, and the mean of each hop.
`--text=WORD`: events whose text starts with WORD instead of `load` (the
failing-handlers step's healthy events are `ok N`, `ok N.J` in its bursts
variant; capture one of its runs only, their numbers start again in each).
"""
import collections
import re
import struct
import sys

AMQP = 5672
HOPS = ["broker: event -> matcher", "matcher: event -> job", "broker: job -> deliverer", "deliverer: job -> POST"]
SHORT = dict(zip(HOPS, ["broker(event)", "matcher", "broker(job)", "deliverer"]))


def text_pattern(word):
    """An event's text as the load generator writes it: `WORD N`, `WORD sK N`
    (a sweep step) or `WORD rK N` (a round); `N.J` is the J-th event of a
    burst; `+` for spaces in a form body."""
    return re.compile(rb"%s[ +](?:([sr])(\d)[ +])?(\d+(?:\.\d+)?)\b" % re.escape(word.encode()))


def packets(path):
    """(time, src port, dst port, payload) of each IPv4 TCP packet with data."""
    with open(path, "rb") as f:
        magic = f.read(24)[:4]
        endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
        while True:
            header = f.read(16)
            if len(header) < 16:
                return
            sec, frac, length, _ = struct.unpack(endian + "IIII", header)
            frame = f.read(length)
            if frame[12:14] != b"\x08\x00":  # Ethernet (tcpdump's lo), IPv4
                continue
            ip = frame[14:]
            tcp = ip[(ip[0] & 15) * 4 :]
            src, dst = struct.unpack(">HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if payload:
                yield sec + frac * scale, src, dst, payload


def hop_of(seen, src, dst, payload):
    """Which hop ends with this packet, given the packets seen so far."""
    if dst == AMQP and not seen:
        return "published"
    if src == AMQP and len(seen) == 1:
        return HOPS[0]
    if dst == AMQP and len(seen) == 2:
        return HOPS[1]
    if src == AMQP and len(seen) == 3:
        return HOPS[2]
    if payload.startswith(b"POST ") and len(seen) == 4:
        return HOPS[3]
    return None


def main():
    path = sys.argv[1]
    text = text_pattern(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--text=")), "load"))
    events = {}  # (step, round, n) -> [(hop, time)]
    for at, src, dst, payload in packets(path):
        for m in text.finditer(payload):
            # A sweep step's number, or None at half load (a round of
            # `--latency-only` is at the rate it was given: "half load").
            kind, number, n = m.groups()
            key = (number if kind == b"s" else None, number if kind == b"r" else None, n)
            seen = events.setdefault(key, [])
            if seen and seen[-1][1] == at:
                continue
            hop = hop_of(seen, src, dst, payload)
            if hop:
                seen.append((hop, at))
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    windows = collections.defaultdict(list)
    starts = [s[0][1] for (step, _, _), s in events.items() if step is None and s]
    t0 = min(starts) if starts else 0
    for (step, _, _), seen in events.items():
        if len(seen) < 5:
            continue
        name = "half load" if step is None else f"sweep step {int(step) + 1}"
        for (_, a), (hop, b) in zip(seen, seen[1:]):
            groups[name][hop].append((b - a) * 1000)
        total = (seen[-1][1] - seen[0][1]) * 1000
        groups[name]["total: publish -> POST"].append(total)
        if step is None:
            windows[int((seen[0][1] - t0) * 2) / 2].append(seen)

    def pct(v):
        v = sorted(v)
        return " ".join(f"{q}={v[min(len(v) - 1, int(len(v) * f))]:7.2f}" for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)))

    for name in sorted(groups):
        print(f"{name} ({len(groups[name]['total: publish -> POST'])} events), ms:")
        for hop in HOPS + ["total: publish -> POST"]:
            if groups[name][hop]:
                print(f"  {hop:<26} {pct(groups[name][hop])}")
    slow_bound = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--slow=")), None)
    if slow_bound is not None:
        slow = [s for (step, _, _), s in events.items() if step is None and len(s) >= 5 and (s[-1][1] - s[0][1]) * 1000 > slow_bound]
        slowest = collections.Counter()
        spent = collections.defaultdict(float)
        for s in slow:
            hops = [((b - a) * 1000, hop) for (_, a), (hop, b) in zip(s, s[1:])]
            slowest[max(hops)[1]] += 1
            for took, hop in hops:
                spent[hop] += took
        print(f"half-load events over {slow_bound:g} ms: {len(slow)}; the slowest hop of each, and the mean per hop (ms):")
        for hop in HOPS:
            print(f"  {hop:<26} slowest in {slowest[hop]:6}  mean {spent[hop] / max(1, len(slow)):6.2f}")
    if any(a.startswith("--windows") for a in sys.argv):
        bound = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--windows=")), 60.0)
        print(f"half-second windows of the half-load run with an event over {bound:g} ms (p50 per hop, ms):")
        for w in sorted(windows):
            seens = windows[w]
            if max((s[-1][1] - s[0][1]) * 1000 for s in seens) <= bound:
                continue
            per = collections.defaultdict(list)
            for s in seens:
                for (_, a), (hop, b) in zip(s, s[1:]):
                    per[hop].append((b - a) * 1000)
            print(f"  {w:5.1f} s", "  ".join(f"{SHORT[h]} {sorted(v)[len(v) // 2]:.1f}" for h, v in per.items()))


if __name__ == "__main__":
    main()
