#!/bin/sh
# The same /send load over keep-alive connections with wrk.
#   loadtest/wrk.sh [URL] [CONNECTIONS] [SECONDS] [THREADS]
# (wrk is in Debian's wrk package.)
set -e
url=${1:-http://127.0.0.1:3210/send}
dir=$(dirname "$0")
POSTDATA="$dir/postdata.txt" exec wrk -t "${4:-1}" -c "${2:-100}" -d "${3:-10}s" -s "$dir/post.lua" "$url"
