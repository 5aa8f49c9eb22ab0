#!/bin/sh
# /sbin/shutdown of the labctl tiny image. qemu-ga's guest-shutdown runs
# "/sbin/shutdown -P|-H|-r +0 MESSAGE", and busybox has no shutdown applet. This script
# maps the flag to busybox poweroff, halt or reboot, which signal /init to stop the guest.
case "$1" in
    -r) exec reboot ;;
    -H) exec halt ;;
    *) exec poweroff ;;
esac
