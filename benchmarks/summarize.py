"""Print each benchmark group's times and the engine's speedup over every other entry of the same run.

python benchmarks/summarize.py out/bench_perturbation.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}")
    for group, benches in groups.items():
        print(f"\n[{group}]")
        engine = [b for b in benches if "engine" in b["name"]]
        best_engine = min(engine, key=lambda b: b["stats"]["median"]) if engine else None
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            t = b["stats"]["median"]
            ratio = f"  engine best is {t / best_engine['stats']['median']:.2f}x faster" if best_engine else ""
            info = b["extra_info"].items()
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info)
            print(f"  {b['name']:<55s} {t:8.2f} s{ratio}  {extra}")


if __name__ == "__main__":
    main(sys.argv[1])
