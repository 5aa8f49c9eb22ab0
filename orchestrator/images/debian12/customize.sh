#!/bin/sh
# Customize and generalize the Debian 12 root tree. labctl runs this script inside the
# tree with chroot, after copying files/ over it, and passes it no arguments.
set -eu

# Networking: files/etc/systemd/network/ has the DHCP configuration for every NIC.
systemctl enable systemd-networkd.service
if [ -e /lib/systemd/system/systemd-resolved.service ]; then
    systemctl enable systemd-resolved.service
fi

# The package's udev rule already adds this Wants= through SYSTEMD_WANTS. The link keeps
# the agent wanted by its port even if a local udev rule overrides the packaged one.
agent_wants='/etc/systemd/system/dev-virtio\x2dports-org.qemu.guest_agent.0.device.wants'
mkdir -p "$agent_wants"
ln -sfn /lib/systemd/system/qemu-guest-agent.service "$agent_wants/qemu-guest-agent.service"

# Jobs that slow a boot under TCG (e2scrub_reap cost about 20 s per boot there) or write to
# every clone's disk for no gain, because clones are short-lived and share their base.
for unit in e2scrub_reap.service e2scrub_all.timer apt-daily.timer apt-daily-upgrade.timer \
    man-db.timer fstrim.timer dpkg-db-backup.timer; do
    if [ -e "/lib/systemd/system/$unit" ]; then
        systemctl disable "$unit"
    fi
done

# The kernel package built the initramfs while the root filesystem's type was unknown, so
# it lacks fsck.ext4 and skips the root check. conf.d/labctl-fstype now names the type.
update-initramfs -u

# Generalize: every clone must get its own identity on first boot.
passwd --lock root
# Empty, not absent: systemd writes a new id into an empty file at boot. Without the file,
# a boot with a read-only root fails.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*
rm -rf /var/lib/cloud
rm -f /var/lib/systemd/random-seed
# mmdebstrap may leave the build host's resolver configuration here.
rm -f /etc/resolv.conf
if [ -e /lib/systemd/system/systemd-resolved.service ]; then
    ln -s ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf
else
    : > /etc/resolv.conf
fi

apt-get clean
rm -rf /var/lib/apt/lists/*
rm -f /var/cache/apt/*.bin
