#!/bin/sh
# /sbin/labctl-install-host-key of the labctl tiny image: install the OpenSSH ed25519
# private key in $1 as dropbear's host key and restart dropbear with it. ClonePrep runs
# this through the guest agent after an instant clone.
set -eu
key=/etc/dropbear/dropbear_ed25519_host_key
[ -f "$1" ] || { echo "no key file at $1" >&2; exit 1; }
umask 077
dropbearconvert openssh dropbear "$1" "$key.new" >/dev/null
mv "$key.new" "$key"
# The old dropbear must have exited before the new one binds port 22, or the new one
# fails with "Address in use" and the guest is left without SSH. Wait up to 5 s.
if [ -f /run/dropbear.pid ]; then
    old=$(cat /run/dropbear.pid)
    kill "$old" 2>/dev/null || true
    tries=0
    while kill -0 "$old" 2>/dev/null && [ "$tries" -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
fi
# Output and input detached: the agent waits for this script's pipes to close.
dropbear -F -E -s -g -p 22 -r "$key" >>/run/log/dropbear.log 2>&1 </dev/null &
echo $! >/run/dropbear.pid
