#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md ("On a GPU (H200)") as one script, for one call of a
# lent machine that reaches no registry and no model hub. Run from a folder that holds src/ and
# benchmarks/ of this repository, whl/ (the wheels the machine lacks) and the configs that
# benchmarks/random_base.py wrote (base-135m/, base-1b/); docs/BENCHMARKS.md gives the commands that
# fill it. Each part has its own time limit (T1, T2_CUDA, T2_CPU, T3 seconds), so a slow part leaves
# the later ones their share, and the whole ends inside the 600 s of one call:
#
#   1. SmolLM2-135M (random weights): tunelab against TRL, whole runs, full and LoRA, TRL padded
#      and packed (benchmarks/train_throughput.py): step time, tokens/s, MFU, the whole-run ratio;
#   2. `tunelab eval` of the tunelab LoRA run on the GPU, then on the CPU (--device);
#   3. a ~0.9B model (SmolLM2-1.7B's shape, 12 of its 24 layers): tunelab full and LoRA.
#
# Everything goes to $OUT (gpu_session.log and the results files). SMALL=1 is the dry run on a
# CPU with tiny sizes, to find a typo before the lent minutes are spent.
set -u
OUT=${OUT:-/tmp/gpu-session}
SMALL=${SMALL:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TUNELAB_CACHE=/tmp/tunelab-cache
step() { echo "=== $(date +%T) $*"; }

if compgen -G "whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}

if [ "$SMALL" = 1 ]; then
    EXAMPLES=40 BATCH=8 EXAMPLES_1B=40 BATCH_1B=8 EVAL_LIMIT=4 NEW_TOKENS=8
else
    EXAMPLES=2400 BATCH=32 EXAMPLES_1B=2400 BATCH_1B=64 EVAL_LIMIT=64 NEW_TOKENS=64
fi

step versions
python3 - <<'EOF'
import importlib.metadata as m
import torch
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print(", ".join(f"{p} {m.version(p)}" for p in ("transformers", "peft", "accelerate", "trl", "datasets", "pyarrow")))
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
          "bf16", torch.cuda.is_bf16_supported())
EOF

step "random weights"
python3 benchmarks/random_base.py weights /tmp/base-135m --from base-135m || exit 1
python3 benchmarks/random_base.py weights /tmp/base-1b --from base-1b || exit 1

step "1. SmolLM2-135M shape: tunelab against TRL"
timeout "${T1:-300}" python3 benchmarks/train_throughput.py --base /tmp/base-135m --examples "$EXAMPLES" --batch "$BATCH" \
    --settings tunelab-full,tunelab-lora,trl-full,trl-lora,trl-packing-full --out /tmp/tt-135m
# tunelab first, so part 2 has its run even if TRL fails; each setting's own figures come back
# even when the table at the end is not reached.
cp /tmp/tt-135m/results.json "$OUT/train_135m.json" 2>/dev/null
tar czf "$OUT/settings_135m.tgz" -C /tmp/tt-135m $(cd /tmp/tt-135m && ls *-seed*.json 2>/dev/null) 2>/dev/null

step "2. tunelab eval on the GPU, then on the CPU"
RUN=/tmp/tt-135m/tunelab-lora-seed0
head -n "$EVAL_LIMIT" /tmp/tt-135m/bookings.jsonl >/tmp/eval-data.jsonl
for device in cuda cpu; do
    if [ "$device" = cuda ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "no CUDA here: skipping --device cuda"; continue
    fi
    limit=$([ "$device" = cuda ] && echo "${T2_CUDA:-60}" || echo "${T2_CPU:-90}")
    started=$(date +%s.%N)
    timeout "$limit" python3 -c "import sys; from tunelab.cli import main; sys.exit(main(sys.argv[1:]))" \
        eval "$RUN" --data /tmp/eval-data.jsonl --no-base --no-forgetting --max-new-tokens "$NEW_TOKENS" \
        --device "$device"
    echo "eval --device $device: exit $?, $(python3 -c "print(f'{$(date +%s.%N) - $started:.1f}')") s wall"
    python3 -c "import json; r = json.load(open('$RUN/eval.json')); c = r['cost']['tuned'];
print('eval.json says', r['device'], r['precision'], f\"{c['seconds_per_request']:.4f} s/request\",
      f\"{c['generated_tokens']:.1f} tokens/request\")" && cp "$RUN/eval.json" "$OUT/eval_$device.json"
done

step "3. ~0.9B shape (SmolLM2-1.7B, 12 layers): tunelab full and LoRA"
timeout "${T3:-110}" python3 benchmarks/train_throughput.py --base /tmp/base-1b --examples "$EXAMPLES_1B" \
    --batch "$BATCH_1B" --settings tunelab-full,tunelab-lora --out /tmp/tt-1b
cp /tmp/tt-1b/results.json "$OUT/train_1b.json" 2>/dev/null
tar czf "$OUT/settings_1b.tgz" -C /tmp/tt-1b $(cd /tmp/tt-1b && ls *-seed*.json 2>/dev/null) 2>/dev/null
step done
