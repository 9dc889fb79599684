#!/usr/bin/env python3
"""Summarise side-by-side.sh result directories as Markdown tables (stdout).

One directory: the detailed table. Several: one line per directory (pass) with the highest
rate each design held, for judging run-to-run spread on a shared machine."""
import json
import sys
from pathlib import Path

ROWS = [
    ("Node.js design (cluster, WORKERS=2, socket.io, Redis)", "node-ramp", "node-idle"),
    ("Node.js design, finer ramp (250 + 250/step)", "node-ramp-fine", None),
    ("switchboard embedded, --cores 2", "embedded-ramp", "embedded-idle"),
    ("switchboard 2 instances, --backplane redis", "redis2-ramp", "redis2-idle"),
]


def load(d, name):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None


def uptime(d, name):
    p = d / f"{name}.uptime"
    if not p.exists():
        return "?"
    lines = p.read_text().splitlines()
    la = lambda l: l.split("load average:")[1].split(",")[0].strip()
    return f"{la(lines[1])}→{la(lines[2])}" if len(lines) >= 3 else "?"


def held(d, name):
    r = load(d, name)
    if r is None:
        return "–"
    h = r["ramp"]["highest_held_rate"]
    return f"{h:,.0f}" if h else "none"


def passes(dirs):
    print("| pass | " + " | ".join(label for label, _, _ in ROWS) + " | load avg 1 min |")
    print("|---|" + "---|" * (len(ROWS) + 1))
    for d in dirs:
        las = [uptime(d, r) for _, r, _ in ROWS if (d / f"{r}.uptime").exists()]
        print(f"| {d.name} | " + " | ".join(held(d, r) for _, r, _ in ROWS) +
              f" | {las[0].split('→')[0]}–{las[-1].split('→')[-1]} |")


def main():
    if len(sys.argv) > 2:
        return passes([Path(a) for a in sys.argv[1:]])
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/side-by-side")
    print("| design | highest rate held (msg/s) | deliveries/s | p50 | p99 | lost | "
          "generator CPU/delivery | first failing step | RSS/idle conn | load avg 1 min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, ramp_name, idle_name in ROWS:
        r = load(d, ramp_name)
        if r is None:
            continue
        held = r["ramp"]["highest_held_rate"]
        ph = next((p for p in r["phases"] if p["rate"] == held), None)
        lost = sum(p["missing"] for p in r["phases"])
        fail = r["ramp"]["stopped_because"] or "none (max steps)"
        if ph:
            cols = [f"{held:,.0f}", f"{ph['deliveries_per_s']:,.0f}",
                    f"{ph['latency']['p50_ms']:.2f} ms", f"{ph['latency']['p99_ms']:.2f} ms",
                    f"{lost}", f"{ph['generator_cpu_us_per_delivery']:.1f} µs"]
        else:
            p0 = r["phases"][0]
            cols = ["none", "–", "–", "–", f"{lost}",
                    f"{p0['generator_cpu_us_per_delivery']:.1f} µs (step 1)"]
        rss = "–"
        if idle_name:
            i = load(d, idle_name)
            if i and i.get("idle") and i["idle"].get("rss_per_connection_bytes") is not None:
                rss = f"{i['idle']['rss_per_connection_bytes']:,.0f} B"
        print(f"| {label} | " + " | ".join(cols) +
              f" | {fail} | {rss} | {uptime(d, ramp_name)} |")


if __name__ == "__main__":
    main()
