#!/usr/bin/env bash
# Runs every fuzz target of sluice for SECONDS each (default 60) on the stable toolchain.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# cargo-fuzz wants nightly for its sanitizer flags; RUSTC_BOOTSTRAP=1 lets the stable
# compiler accept them, so no second toolchain is needed. Each target starts from its
# committed seeds (crates/CRATE/fuzz/seeds/TARGET, made by scripts/fuzz-seeds.py) and grows a
# corpus in crates/CRATE/fuzz/corpus/TARGET (ignored by git, kept between runs). A crash
# leaves its input in crates/CRATE/fuzz/artifacts/TARGET: add it to the seeds (so the
# crate's tests/fuzz_seeds.rs runs it every time) and fix the bug. The last lines print the
# run count of every target; the exit status is non-zero if any target failed.
#
# Building the fuzzers takes about 10 minutes of CPU, so CI does not run this: it runs the
# seeds through the same checks as ordinary tests (tests/fuzz_seeds.rs in each crate).
set -euo pipefail
cd "$(dirname "$0")/.."

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

summary=()
failed=0
for dir in crates/*/fuzz; do
    crate=$(basename "$(dirname "$dir")")
    for target in $(cd "$dir" && cargo fuzz list); do
        if ((${#only[@]})) && [[ ! " ${only[*]} " =~ " $target " ]]; then
            continue
        fi
        mkdir -p "$dir/corpus/$target" "$dir/seeds/$target"
        log=$(mktemp)
        echo "== $crate/$target: $secs s" >&2
        # -rss_limit_mb: the qcow2 target holds an image and a node; 2 GiB is libFuzzer's
        # default and stays the limit so a leak or a huge allocation is a finding.
        if (cd "$dir" && cargo fuzz run --release --target-dir "$target_dir" "$target" "corpus/$target" "seeds/$target" \
                -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1) \
                >"$log" 2>&1; then
            status=ok
        else
            status=FAILED
            failed=1
            tail -40 "$log" >&2
        fi
        runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | awk '{print $2}' || true)
        corpus=$(ls "$dir/corpus/$target" | wc -l)
        summary+=("$crate/$target: $status, ${runs:-?} runs in $secs s, corpus $corpus")
        echo "${summary[-1]}" >&2
        rm -f "$log"
    done
done
printf '%s\n' "${summary[@]}"
exit $failed
