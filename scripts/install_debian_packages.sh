#!/usr/bin/env bash
# Installs the Debian packages whose commands are missing. Arguments: command:package pairs,
# e.g. `wrk:wrk nginx:nginx-light`. Without root or sudo it says what is missing and goes on:
# what needs the commands (a benchmark target, the real-speech tests) is then skipped, saying so.
set -eu
missing=()
for pair in "$@"; do
    command="${pair%%:*}"
    package="${pair#*:}"
    command -v "$command" >/dev/null 2>&1 || [ -x "/usr/sbin/$command" ] || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
else
    echo "not installed (needs root or sudo): ${missing[*]}" >&2
    exit 0
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
