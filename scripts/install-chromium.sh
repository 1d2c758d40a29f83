#!/usr/bin/env bash
# Headless Chromium (Debian package `chromium`) for the report test: it opens the HTML report and takes a
# screenshot. Installed by `make test` when missing and we may use apt-get; about 30 s, 330 MB.
set -u
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing headless Chromium from Debian (chromium) for the report test"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; } \
        >/tmp/searchsvc-apt-chromium.log 2>&1 || echo "note: could not install chromium (see /tmp/searchsvc-apt-chromium.log)"
else
    echo "note: chromium not found; the report test needs 'sudo apt-get install chromium'"
fi
exit 0
