"""Page faults of a training-sized tensor made again and again, with glibc's defaults and with
qwenkit.runtime.allocator.keep_all_freed_memory (what the trainer sets on the CPU).

    python benchmarks/allocator.py [--mib 64] [--repeats 6]

Each setting runs in a fresh process. Prints the minor page faults of the repeats; nothing is
asserted (tests/test_quant.py checks where glibc puts the block, which does not vary).
"""

import argparse
import subprocess
import sys

MEASURE = """if True:
    import resource, sys, torch
    from qwenkit.runtime.allocator import keep_all_freed_memory
    mib, repeats, on = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    on = keep_all_freed_memory() if on else False
    torch.ones(mib << 20, dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.ones(mib << 20, dtype=torch.uint8)
    print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="tensor size (above 32 MiB: glibc maps it by default)")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    pages = (args.mib << 20) // 4096
    print(f"{args.repeats} x a {args.mib} MiB tensor ({pages} pages of 4 KiB each time)")
    for mode, name in (("0", "glibc defaults"), ("1", "keep_all_freed_memory")):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(args.mib), str(args.repeats), mode],
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"{name:>22}: in effect {out[0]:>5}, {int(out[1]):>8} minor page faults")


if __name__ == "__main__":
    main()
