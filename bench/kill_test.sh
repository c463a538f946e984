#!/usr/bin/env bash
# Kill test (issue 12, docs/reliability.md): SIGKILLs a small training at random moments —
# at least once before its first checkpoint, some while a checkpoint is being written, the rest
# at random times — resumes it after each kill, and compares the final model tensors and the
# metrics with an uninterrupted run of the same config.
#
#   bash bench/kill_test.sh          # short form: 5 kills, about a minute
#   bash bench/kill_test.sh 50       # long form: 50 kills
#
# Needs target/release/slabformer (cargo build --release -p slabformer-cli) and Fashion-MNIST
# in $SLABFORMER_DATA (default data/fashion-mnist; `slabformer data fetch fashion-mnist`).
# KEEP=1 keeps the work folder. Exit status 0: every check passed.
set -euo pipefail

KILLS=${1:-5}
B=$(realpath "${SLABFORMER:-target/release/slabformer}")
DATA=$(realpath "${SLABFORMER_DATA:-data/fashion-mnist}")
WORK=$(mktemp -d /tmp/slabformer-kill.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# 3000 images, batch 20: 150 steps per epoch, 2 epochs, 1 re-calibration epoch, a checkpoint
# every 25 steps and at every epoch end; mixing and drop-path on, so resume must restore every
# random stream.
cat > tiny.toml <<TOML
[model]
preset = "slab_deit_tiny"
img_size = 28
patch_size = 4
in_chans = 1
num_classes = 10
embed_dim = 32
depth = 2
num_heads = 2
mlp_ratio = 2.0
drop_path_rate = 0.1

[data]
root = "$DATA"
train_per_class = 300
eval_per_class = 20

[run]
epochs = 2
batch_size = 20
recalibrate_epochs = 1
eval_batch_size = 100
ema_decay = 0.99

[optim]
lr = 0.12
clip_grad = 5.0

[schedule]
warmup_epochs = 0.3
warmup_lr = 1e-5
min_lr = 1e-5

[augment]
random_resized_crop = false
hflip = 0.5
mean = [0.286]
std = [0.353]

[mix]
mixup_alpha = 0.8
cutmix_alpha = 1.0
label_smoothing = 0.1

[checkpoint]
every_steps = 25
TOML

# Milliseconds, without a fork (the polling loops below must be tight).
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
fail() { echo "FAIL: $*"; exit 1; }

t0=$(now_ms)
"$B" train --config tiny.toml --out ref > ref.log 2>&1 || { cat ref.log; fail "the uninterrupted run failed"; }
T=$(( $(now_ms) - t0 ))
echo "uninterrupted run: $T ms"

# Starts (or resumes) the run in the background; sets $pid.
start() {
    if [ -f run/config.toml ]; then
        "$B" train --resume --out run >> run.log 2>&1 &
    else
        # Killed before config.toml was written (or never started): a fresh start.
        "$B" train --config tiny.toml --out run >> run.log 2>&1 &
    fi
    pid=$!
}
checkpoints() { { compgen -G "run/checkpoints/step-*.safetensors" || true; } | wc -l; }
temp_left() { compgen -G "run/checkpoints/.step-*.tmp-*" > /dev/null || compgen -G "run/.*.tmp-*" > /dev/null; }

kills=0 before_first=0 during_write=0 finished_early=0
while [ "$kills" -lt "$KILLS" ]; do
    start
    if [ "$before_first" -eq 0 ]; then
        mode=early
    elif [ $((kills % 2)) -eq 1 ]; then
        mode=write
    else
        mode=random
    fi
    case $mode in
        early)  # as soon as the run has started, before its first checkpoint
            while ! [ -f run/config.toml ] && kill -0 "$pid" 2> /dev/null; do :; done ;;
        write)  # the moment a checkpoint's temporary file is seen (on a fast disk the kill often
                # lands just after its rename: the window of the old metrics.csv loss)
            deadline=$(( ${EPOCHREALTIME/[.,]/} + T * 1000 ))
            while ! compgen -G "run/checkpoints/.step-*.tmp-*" > /dev/null && [ "${EPOCHREALTIME/[.,]/}" -lt "$deadline" ]; do :; done ;;
        random) # anywhere in the next stretch of the run
            sleep "$(awk -v t="$T" -v k="$KILLS" -v r="$RANDOM" 'BEGIN { printf "%.3f", (0.2 + 1.5 * r / 32768) * t / 1000 / k + 0.3 }')" ;;
    esac
    had_checkpoint=$(checkpoints)
    if kill -KILL "$pid" 2> /dev/null; then
        wait "$pid" 2> /dev/null || true
        kills=$((kills + 1))
        if [ "$had_checkpoint" -eq 0 ] && [ "$(checkpoints)" -eq 0 ]; then before_first=$((before_first + 1)); fi
        if temp_left; then during_write=$((during_write + 1)); fi
        echo "kill $kills ($mode): $(checkpoints) checkpoint(s) on disk$(temp_left && echo ', a write cut short')"
    else
        wait "$pid" || fail "a resumed run failed: $(tail -3 run.log)"
        finished_early=1
        echo "the run finished before kill $((kills + 1)); starting it over"
        rm -rf run
    fi
done
# Resume to the end.
start
wait "$pid" || fail "the final resume failed: $(tail -3 run.log)"

# The tensors: the bytes after the safetensors header (its metadata map is unordered).
payload() { local n; n=$(od -An -t u8 -N8 "$1" | tr -d ' '); tail -c +$((9 + n)) "$1" | sha256sum | cut -d' ' -f1; }
[ "$(payload ref/model.safetensors)" = "$(payload run/model.safetensors)" ] || fail "the final model tensors differ from the uninterrupted run"
# The metrics, all but the throughput column; every step exactly once.
rows() { cut -d, -f1-8,10-11 "$1/metrics.csv"; }
diff <(rows ref) <(rows run) > metrics.diff || fail "metrics.csv differs from the uninterrupted run: $(head -5 metrics.diff)"
dups=$(grep '^step,' run/metrics.csv | cut -d, -f2 | sort | uniq -d | wc -l)
[ "$dups" -eq 0 ] || fail "$dups steps appear twice in metrics.csv"
! temp_left || fail "temporary files left after the run finished"
[ "$before_first" -ge 1 ] || fail "no kill landed before the first checkpoint"
echo "PASS: $kills kills ($before_first before the first checkpoint, $during_write during a write), model tensors and metrics equal to the uninterrupted run"
