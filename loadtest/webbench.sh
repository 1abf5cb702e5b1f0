#!/bin/sh
# The seed's webbench load on /send. webbench is not packaged by Debian: build it
# from its source if you want this run (make bench uses ab and wrk instead).
#   loadtest/webbench.sh [URL] [CLIENTS] [SECONDS]
set -e
command -v webbench >/dev/null || {
    echo "webbench is not installed (Debian does not package it); use loadtest/ab.sh or loadtest/wrk.sh" >&2
    exit 1
}
url=${1:-http://127.0.0.1:3210/send}
dir=$(dirname "$0")
exec webbench -c "${2:-100}" -t "${3:-60}" -F "$dir/postdata.txt" "$url"
