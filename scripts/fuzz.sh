#!/usr/bin/env bash
# Runs every fuzz target of sluice for SECONDS each (default 60) on the stable toolchain.
#
#   scripts/fuzz.sh [--jobs N] [--skip TARGET]... [SECONDS] [TARGET...]
#
# cargo-fuzz wants nightly for its sanitizer flags; RUSTC_BOOTSTRAP=1 lets the stable
# compiler accept them, so no second toolchain is needed. Each target starts from its
# committed seeds (crates/CRATE/fuzz/seeds/TARGET, made by scripts/fuzz-seeds.py) and grows a
# corpus in crates/CRATE/fuzz/corpus/TARGET (ignored by git, kept between runs). A crash
# leaves its input in crates/CRATE/fuzz/artifacts/TARGET: add it to the seeds (so the
# crate's tests/fuzz_seeds.rs runs it every time) and fix the bug. The last lines print the
# run count of every target; the exit status is non-zero if any target failed.
#
# --jobs N runs N targets at once (libFuzzer uses one core per target; each still gets its
# SECONDS). --skip leaves a target out. All targets are built before any runs, so the timed
# runs do not share the cores with the compiler.
#
# CI (scripts/test.sh) runs every target but daemon/qmp_dispatch for 10 s, two at a time:
# about 4 minutes here, most of it the build. qmp_dispatch's build takes the whole server
# with it (OpenSSL from source, with the sanitizer flags), 4 more minutes, so CI runs only
# its seeds (crates/daemon/tests/fuzz_seeds.rs); run it here by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=1
skip=()
while (($#)); do
    case $1 in
        --jobs) jobs=$2; shift 2 ;;
        --skip) skip+=("$2"); shift 2 ;;
        *) break ;;
    esac
done
secs=${1:-60}
shift || true
only=("$@")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

# One build directory for every fuzz crate: their dependencies (built with the sanitizer
# flags, unlike the main build's) are compiled once instead of once per crate.
target_dir="$PWD/target/fuzz"

# The chosen targets, as "fuzz-dir target" pairs; each crate's are built together.
chosen=()
for dir in crates/*/fuzz; do
    picked=()
    for target in $(cd "$dir" && cargo fuzz list); do
        if ((${#only[@]})) && [[ ! " ${only[*]} " =~ " $target " ]]; then
            continue
        fi
        if ((${#skip[@]})) && [[ " ${skip[*]} " =~ " $target " ]]; then
            continue
        fi
        picked+=("$target")
        chosen+=("$dir $target")
    done
    for target in "${picked[@]}"; do
        echo "== build $dir $target" >&2
        (cd "$dir" && cargo fuzz build --release --target-dir "$target_dir" "$target") >&2
    done
done

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# Runs one target; its outcome line goes to $logs/N.result.
run_one() {
    local n=$1 dir=$2 target=$3 crate status runs corpus
    crate=$(basename "$(dirname "$dir")")
    mkdir -p "$dir/corpus/$target" "$dir/seeds/$target"
    echo "== $crate/$target: $secs s" >&2
    # -rss_limit_mb: the qcow2 target holds an image and a node; 2 GiB is libFuzzer's
    # default and stays the limit so a leak or a huge allocation is a finding.
    if (cd "$dir" && cargo fuzz run --release --target-dir "$target_dir" "$target" "corpus/$target" "seeds/$target" \
            -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1) \
            >"$logs/$n.log" 2>&1; then
        status=ok
    else
        status=FAILED
        tail -40 "$logs/$n.log" >&2
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$logs/$n.log" | tail -1 | awk '{print $2}' || true)
    corpus=$(ls "$dir/corpus/$target" | wc -l)
    echo "$crate/$target: $status, ${runs:-?} runs in $secs s, corpus $corpus" | tee "$logs/$n.result" >&2
}

n=0
for pair in "${chosen[@]}"; do
    while (($(jobs -rp | wc -l) >= jobs)); do
        wait -n || true
    done
    run_one "$n" $pair &
    n=$((n + 1))
done
wait

failed=0
for ((i = 0; i < n; i++)); do
    cat "$logs/$i.result"
    grep -q ': ok,' "$logs/$i.result" || failed=1
done
exit $failed
