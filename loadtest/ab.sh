#!/bin/sh
# The seed's ApacheBench load on /send: a new connection per request.
#   loadtest/ab.sh [URL] [CONCURRENCY] [REQUESTS]
# (ab is in Debian's apache2-utils.)
set -e
url=${1:-http://127.0.0.1:3210/send}
dir=$(dirname "$0")
exec ab -q -c "${2:-100}" -n "${3:-100000}" -T application/json -p "$dir/postdata.txt" "$url"
