#!/usr/bin/env bash
# Benchmark and seed spread for the course parts (speed targets are checked here, not in tests).
#   bash bench/bench.sh [DATA_DIR]  times each part with the default seed, then seeds 43 and 44,
#                                 and prints mean +- standard deviation over the three seeds.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: main.py and the default data folder
DATA="${1:-speechesdataset}"
OUT="${BENCH_OUT:-results/bench}"
mkdir -p "$OUT"
for part in one two three; do
  save=(); [ "$part" = two ] && save=(--save "$OUT/decoder")  # the decoder the README's generation examples use
  /usr/bin/time -f "part $part: %e s wall, %M KB peak memory" -o "$OUT/time_$part.txt" \
    python main.py --part "$part" --data-dir "$DATA" --out "$OUT/seed42" "${save[@]}" > "$OUT/part_$part.log" 2>&1 \
    || { cat "$OUT/part_$part.log"; exit 1; }
  cat "$OUT/time_$part.txt"
done
for seed in 43 44; do
  for part in one two; do
    python main.py --part "$part" --data-dir "$DATA" --out "$OUT/seed$seed" --seed "$seed" --no-plots > /dev/null
  done
done
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
runs = [Path(sys.argv[1]) / f"seed{s}" for s in (42, 43, 44)]
def spread(values):
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}  ({', '.join(f'{v:.2f}' for v in values)})"
one = [json.loads((r / "part_one.json").read_text()) for r in runs]
for key in ("test_accuracy", "test_accuracy_seen", "test_accuracy_unseen"):
    print(f"part one {key:22s} {spread([o['final'][key] for o in one])}")
two = [json.loads((r / "part_two.json").read_text())["final"] for r in runs]  # the returned model's figures
print(f"part two {'train perplexity':22s} {spread([t['train_perplexity'] for t in two])}")
for name in ("obama", "wbush", "hbush"):
    print(f"part two {name + ' perplexity':22s} {spread([t['perplexity'][name] for t in two])}")
PY
