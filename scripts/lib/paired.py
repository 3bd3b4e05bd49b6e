"""Summary of paired windows (scripts/lib/paired.sh): per group, each side's median and
the median of the per-window ratios, with a verdict where a target is given.

    paired.py RESULTS [--metric cpu|rate|p99|max] [--ratio A/B[<=X|>=X]]... [--sides A,B,...]
    (--ratio also takes (A/B)/(C/D): how the ratio A/B moved against C/D, per window)

RESULTS holds lines "GROUP REP NAME JSON" (echoload's JSON, or any JSON with msgs,
msgs_per_s, server_cpu_s or server_cpu_pct, errors). --metric cpu (the default) compares
server CPU µs per message (server CPU seconds over the window / messages answered in it);
--metric rate compares MB/s (msgs_per_s x size); --metric p99 and max compare the
round-trip latency in ms (`latency_us` of `reverb bench --json`, `lat_us` of echoload). A ratio is computed per window, from the
two sides measured in that same window, and its median is the verdict's figure. Exit 0
always: the verdicts are for reading.
"""

import argparse
import json
import re
import statistics
import sys


def cpu_us_per_msg(r):
    msgs = r.get("msgs") or 0
    if r.get("server_cpu_s") is not None and msgs:
        return r["server_cpu_s"] / msgs * 1e6
    if r.get("server_cpu_pct") is not None and r.get("msgs_per_s"):
        return r["server_cpu_pct"] / 100 / r["msgs_per_s"] * 1e6
    return None


def mbytes_per_s(r):
    if r.get("mbytes_per_s"):
        return r["mbytes_per_s"]
    if r.get("msgs_per_s") and r.get("size"):
        return r["msgs_per_s"] * r["size"] / 1e6
    return None


def latency_ms(key):
    def value(r):
        lat = r.get("latency_us") or r.get("lat_us") or {}
        return lat[key] / 1000 if lat.get(key) is not None else None
    return value


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--metric", choices=("cpu", "rate", "p99", "max"), default="cpu")
    p.add_argument("--ratio", action="append", default=[])
    p.add_argument("--sides", help="the order the sides are printed in")
    a = p.parse_args()
    value, unit = {
        "cpu": (cpu_us_per_msg, "µs/msg"),
        "rate": (mbytes_per_s, "MB/s"),
        "p99": (latency_ms("p99"), "p99 ms"),
        "max": (latency_ms("max"), "max ms"),
    }[a.metric]
    groups = {}
    for line in open(a.results):
        parts = line.rstrip("\n").split(" ", 3)
        if len(parts) < 4:
            continue
        group, rep, name, text = parts
        try:
            r = json.loads(text)
        except ValueError:
            r = {}
        v = value(r) if r else None
        windows = groups.setdefault(group, {})
        if v is None or r.get("errors"):
            print(f"{group} window {rep} {name}: no valid result ({text.strip()[:200]})")
            windows.setdefault(rep, {})["!"] = True
            continue
        windows.setdefault(rep, {})[name] = v
    for group, windows in groups.items():
        # A window counts only if every side in it gave a valid result.
        names = sorted({n for w in windows.values() for n in w if n != "!"})
        if a.sides:
            order = a.sides.split(",")
            names = [n for n in order if n in names] + [n for n in names if n not in order]
        full = [w for w in windows.values() if "!" not in w and all(n in w for n in names)]
        print(f"{group}: {len(full)} windows")
        if not full:
            continue
        for n in names:
            vals = [w[n] for w in full]
            print(f"  {n:12s} {unit} median {statistics.median(vals):9.3f}   per window "
                  + " ".join(f"{x:.3f}" for x in vals))
        for spec in a.ratio:
            # A/B, or (A/B)/(C/D): how a ratio moved between two pairs of the same window.
            m = re.fullmatch(r"(?:\(([^/()<>=]+)/([^/()<>=]+)\)/\(([^/()<>=]+)/([^/()<>=]+)\)"
                             r"|([^/()<>=]+)/([^/()<>=]+?))(?:(<=|>=)([0-9.]+))?", spec)
            if not m:
                sys.exit(f"paired.py: bad --ratio {spec!r}; expected A/B or (A/B)/(C/D), "
                         "optionally followed by <=X or >=X")
            x1, y1, x2, y2, x, y, op, bound = m.groups()
            sides = [x1, y1, x2, y2] if x1 else [x, y]
            if any(n not in names for n in sides):
                continue
            if x1:
                x = f"({x1}/{y1})/({x2}/{y2})"
                ratios = [(w[x1] / w[y1]) / (w[x2] / w[y2]) for w in full]
            else:
                ratios = [w[x] / w[y] for w in full]
            med = statistics.median(ratios)
            verdict = ""
            if op:
                ok = med <= float(bound) if op == "<=" else med >= float(bound)
                verdict = f"   target {op.replace('<=', '≤').replace('>=', '≥')} {bound}: " + (
                    "PASS" if ok else "FAIL")
            label = x if x1 else f"{x}/{y}"
            print(f"  ratio {label} median {med:.3f}   per window "
                  + " ".join(f"{r:.3f}" for r in ratios) + verdict)


main()
