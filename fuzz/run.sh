#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 600) on stable Rust (no sanitizer), one after
# another, growing fuzz/corpus/<target>. Findings land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
targets=${TARGETS:-"onnx safetensors gguf reference fetch_request node_response"}
for target in $targets; do
    cargo +stable fuzz run -s none "$target" -- -max_total_time="$seconds" \
        -rss_limit_mb=1024 -malloc_limit_mb=256 -print_final_stats=1
done
