"""The timing protocol every Python peer of `slabformer bench` follows, and its JSON line."""
import json
import statistics
import time


def peak_rss_mib():
    """The process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def report(step, warmup, repeats, **extra):
    """Runs `step` `warmup` times, then times `repeats` calls; prints median, range and peak RSS."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "peak_rss_mib": peak_rss_mib(),
        **extra,
    }))
