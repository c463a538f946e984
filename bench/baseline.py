#!/usr/bin/env python3
"""slabformer against an older build of itself, side by side in one run on this machine.

    python3 bench/baseline.py BASELINE_BINARY [--current BINARY] [--repeats N] [--rounds N]

Times the DeiT-family rows of `bench/compare.sh` (CPU runtime inference at batch 1 and 32, a CPU
trainer step at batch 32) for DeiT-T, PRepBN-DeiT-T and SLAB-DeiT-T with both binaries'
`slabformer bench-case`, each case in its own process, the two binaries alternating round after
round so that drifts of the machine hit both alike, and prints a Markdown table: the best median
of the rounds per binary and the ratio new / baseline. Build the baseline from an older commit
into its own target folder, e.g.

    git worktree add --detach ../base <commit>
    (cd ../base && CARGO_TARGET_DIR=../base-target cargo build --release -p slabformer-cli)
    python3 bench/baseline.py ../base-target/release/slabformer
"""

import argparse
import json
import platform
import subprocess
import sys

MODELS = ["deit_tiny", "prepbn_deit_tiny", "slab_deit_tiny"]
CASES = [("runtime", 1, 5), ("runtime", 32, 1), ("train", 32, 1)]  # (engine, batch, warm-up)


def run_case(binary, engine, model, batch, warmup, repeats):
    cmd = [binary, "bench-case", "--engine", engine, "--model", model, "--batch", str(batch),
           "--warmup", str(warmup), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr.strip()}")
    line = next((l for l in reversed(out.stdout.splitlines()) if l.startswith("{")), None)
    if line is None:
        sys.exit(f"{' '.join(cmd)} printed no result")
    return json.loads(line)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", help="the older slabformer binary")
    parser.add_argument("--current", default="target/release/slabformer", help="the binary under test")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    args = parser.parse_args()

    rows = []
    for model in MODELS:
        for engine, batch, warmup in CASES:
            best = {"baseline": None, "current": None}
            for _ in range(args.rounds):
                for name, binary in (("baseline", args.baseline), ("current", args.current)):
                    m = run_case(binary, engine, model, batch, warmup, args.repeats)
                    if best[name] is None or m["median_ms"] < best[name]["median_ms"]:
                        best[name] = m
            rows.append((model, engine, batch, best["baseline"], best["current"]))
            b, c = best["baseline"]["median_ms"], best["current"]["median_ms"]
            print(f"{model} {engine} b{batch}: {b:.1f} → {c:.1f} ms ({c / b:.3f}×)", file=sys.stderr)

    print(f"Machine: {cpu_name()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} threads. "
          f"Best of {args.rounds} alternating rounds of the median of {args.repeats} calls.\n")
    print("| model | case | baseline ms | current ms | current / baseline | peak MiB (baseline → current) |")
    print("|---|---|---:|---:|---:|---:|")
    for model, engine, batch, b, c in rows:
        case = f"{'inference' if engine == 'runtime' else 'training step'} batch {batch}"
        ratio = c["median_ms"] / b["median_ms"]
        print(f"| {model} | {case} | {b['median_ms']:.1f} | {c['median_ms']:.1f} | {ratio:.3f} | "
              f"{b['peak_rss_mib']:.0f} → {c['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
