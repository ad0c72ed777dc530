#!/usr/bin/env bash
# The gap study's time budget: the best decoder and the classifier row validation chooses, trained side by side.
#   bash bench/best_runs.sh DATA_DIR [OUT]
# The decoder is Kneser-Ney noising at gamma0 0.4 for 2,000 iterations with the novel-word mass (seed 42: its
# selection run and refit); the classifier is token dropout over seeds 42-44 and their ensemble (docs/gap.md,
# docs/classifier_gap.md). The two run side by side on the machine's two cores, the decoder with DECODER_THREADS
# threads (default 2: it has the longer run, and the cores once the classifier is done), the classifier with one;
# the wall time of the pair is what the target "together in 10 minutes" is checked against.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
DATA="${1:?usage: bash bench/best_runs.sh DATA_DIR [OUT]}"
OUT="${2:-results/best_runs}"
# classifier_gap.py reuses the runs it finds in its folder, which would leave them out of the time
if [ -e "$OUT/decoder" ] || [ -e "$OUT/classifier" ]; then
  echo "best_runs.sh: $OUT already holds a run; give a new folder" >&2
  exit 2
fi
mkdir -p "$OUT"
DECODER_THREADS="${DECODER_THREADS:-2}"
started=$(date +%s.%N)
OMP_NUM_THREADS="$DECODER_THREADS" /usr/bin/time -f "decoder: %e s wall" -o "$OUT/time_decoder.txt" \
  python bench/gap_study.py --data-dir "$DATA" --out "$OUT/decoder" --decoders half_kneser_ney_noise_0.4_2000_steps \
  > "$OUT/decoder.log" 2>&1 &
decoder=$!
OMP_NUM_THREADS=1 /usr/bin/time -f "classifier: %e s wall" -o "$OUT/time_classifier.txt" \
  python bench/classifier_gap.py --data-dir "$DATA" --out "$OUT/classifier" --rows dropout --workers 1 \
  > "$OUT/classifier.log" 2>&1 &
classifier=$!
status=0
wait "$decoder" || { status=1; tail -n 5 "$OUT/decoder.log"; }
wait "$classifier" || { status=1; tail -n 5 "$OUT/classifier.log"; }
[ "$status" = 0 ] || exit 1
cat "$OUT/time_decoder.txt" "$OUT/time_classifier.txt"
grep "half_kneser_ney_noise_0.4_2000_steps_novel_mass |" "$OUT/decoder.log"
grep "ensemble of 3" "$OUT/classifier.log"
python -c "import sys; print(f'together: {float(sys.argv[2]) - float(sys.argv[1]):.0f} s wall')" "$started" "$(date +%s.%N)"
