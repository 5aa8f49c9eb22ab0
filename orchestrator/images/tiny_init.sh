#!/bin/sh
# /init of the labctl tiny image. It runs as PID 1 from the initramfs for the guest's whole
# life. It applies the identity from the NoCloud seed and starts dropbear and qemu-ga. Then
# it loops, starting a DHCP client on each new NIC and reaping orphaned processes.
# Seed values are never sourced or evaluated, and each one must match [A-Za-z0-9.-]+.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
SEED=/run/seed
AGENT_PORT_NAME=org.qemu.guest_agent.0

log() {
    echo "labctl-tiny: $*" >/dev/console
}

mount_filesystems() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o gid=5,mode=620 devpts /dev/pts
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
    mkdir -p /run/udhcpc /run/qemu-ga /run/log
}

load_modules() {
    while read -r module; do
        [ -n "$module" ] || continue
        insmod "/lib/modules/labctl/$module" || log "insmod $module failed"
    done </etc/labctl-tiny/modules
}

# Succeed when $1 is not empty and contains only [A-Za-z0-9.-].
is_plain() {
    case "$1" in
        "" | *[!A-Za-z0-9.-]*) return 1 ;;
    esac
    return 0
}

# Usage: read_bytes DEVICE OFFSET LENGTH. Prints nothing when the device has no medium.
read_bytes() {
    dd if="$1" bs=1 skip="$2" count="$3" 2>/dev/null
}

# An ISO 9660 primary volume descriptor starts at byte 32768: type 1, "CD001", and the
# 32-byte space-padded volume identifier at byte 32808.
is_seed_device() {
    [ "$(read_bytes "$1" 32769 5)" = CD001 ] || return 1
    label=$(read_bytes "$1" 32808 32 | tr -d ' ')
    case "$label" in
        CIDATA | cidata) return 0 ;;
    esac
    return 1
}

find_seed_device() {
    for block in /sys/block/vd* /sys/block/sr*; do
        [ -e "$block" ] || continue
        device=/dev/${block##*/}
        if is_seed_device "$device"; then
            echo "$device"
            return 0
        fi
    done
    return 1
}

# CD-ROMs on an ATA or SCSI bus are probed asynchronously, so retry for about a second.
mount_seed() {
    tries=0
    while [ "$tries" -lt 5 ]; do
        if device=$(find_seed_device); then
            mkdir -p "$SEED"
            if mount -t iso9660 -o ro "$device" "$SEED"; then
                log "seed found on $device"
                return 0
            fi
            log "mounting the seed on $device failed"
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.2
    done
    log "no seed found (no iso9660 device labelled CIDATA); using defaults"
    return 1
}

read_identity_env() {
    file="$SEED/labctl/identity.env"
    [ -f "$file" ] || return 0
    while IFS='=' read -r key value || [ -n "$key" ]; do
        case "$key" in
            "" | "#"*) continue ;;
        esac
        if ! is_plain "$value"; then
            log "ignoring $key in identity.env: empty or not [A-Za-z0-9.-]"
            continue
        fi
        case "$key" in
            LABCTL_HOSTNAME) seed_hostname=$value ;;
            LABCTL_MACHINE_ID) seed_machine_id=$value ;;
            LABCTL_INSTANCE_ID) seed_instance_id=$value ;;
            LABCTL_FQDN) seed_fqdn=$value ;;
            *) log "ignoring unknown key $key in identity.env" ;;
        esac
    done <"$file"
}

# Print the value of a top-level "KEY: value" line of meta-data, without quotes.
meta_data_value() {
    sed -n "s/^$1:[[:space:]]*//p" "$SEED/meta-data" 2>/dev/null | head -n 1 | tr -d "\"'\r"
}

read_meta_data() {
    [ -f "$SEED/meta-data" ] || return 0
    value=$(meta_data_value local-hostname)
    if [ -z "$seed_hostname" ] && is_plain "$value"; then
        seed_hostname=$value
    fi
    value=$(meta_data_value instance-id)
    if [ -z "$seed_instance_id" ] && is_plain "$value"; then
        seed_instance_id=$value
    fi
}

random_machine_id() {
    tr -d '-' </proc/sys/kernel/random/uuid
}

apply_identity() {
    hostname_value=${seed_hostname:-tiny}
    # A host name is one DNS label, so only the part before the first dot is kept.
    hostname_value=${hostname_value%%.*}
    [ -n "$hostname_value" ] || hostname_value=tiny
    hostname "$hostname_value"
    echo "$hostname_value" >/etc/hostname
    fqdn=${seed_fqdn:-$hostname_value}
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s %s\n' "$fqdn" "$hostname_value" >/etc/hosts

    machine_id=$seed_machine_id
    case "$machine_id" in
        *[!0-9a-f]*) machine_id= ;;
    esac
    if [ "${#machine_id}" -ne 32 ]; then
        [ -n "$seed_machine_id" ] && log "LABCTL_MACHINE_ID is not 32 lowercase hex digits"
        machine_id=$(random_machine_id)
    fi
    echo "$machine_id" >/etc/machine-id
    [ -n "$seed_instance_id" ] && echo "$seed_instance_id" >/run/labctl-instance-id
}

install_host_key() {
    key=/etc/dropbear/dropbear_ed25519_host_key
    mkdir -p /etc/dropbear
    rm -f "$key"
    if [ -f "$SEED/labctl/ssh_host_ed25519_key" ]; then
        if ! dropbearconvert openssh dropbear "$SEED/labctl/ssh_host_ed25519_key" "$key" \
            >/run/log/dropbearconvert.log 2>&1; then
            log "converting the seed's SSH host key failed; generating one"
            cat /run/log/dropbearconvert.log >/dev/console
            rm -f "$key"
        fi
    fi
    if [ ! -s "$key" ]; then
        dropbearkey -t ed25519 -f "$key" >/dev/null 2>&1 || log "dropbearkey failed"
    fi
    chmod 600 "$key"
}

install_authorized_keys() {
    mkdir -p /root/.ssh
    chmod 700 /root /root/.ssh
    if [ -f "$SEED/labctl/authorized_keys" ]; then
        cat "$SEED/labctl/authorized_keys" >/root/.ssh/authorized_keys
    else
        : >/root/.ssh/authorized_keys
    fi
    chmod 600 /root/.ssh/authorized_keys
}

# A hypervisor's ACPI shutdown request (libvirt's default without an agent) arrives as a
# power button press on /dev/input/event*.
start_acpid() {
    if ls /dev/input/event* >/dev/null 2>&1; then
        acpid -d -c /etc/acpi >>/run/log/acpid.log 2>&1 &
    else
        log "no input event device; ACPI power button requests are ignored"
    fi
}

# -s and -g turn password logins off, so only keys in authorized_keys open a session.
start_dropbear() {
    dropbear -F -E -s -g -p 22 -r /etc/dropbear/dropbear_ed25519_host_key \
        >>/run/log/dropbear.log 2>&1 </dev/null &
    echo $! >/run/dropbear.pid
}

mount_data_disk() {
    [ -b /dev/vda ] || return 0
    # The ext4 superblock starts at byte 1024 and contains the magic 0xEF53 at offset 56.
    magic=$(read_bytes /dev/vda 1080 2 | od -An -tx1 | tr -d ' \n')
    if [ "$magic" != 53ef ]; then
        log "/dev/vda has no ext4 file system; /data stays in memory"
        return 0
    fi
    mkdir -p /data
    mount -t ext4 -o rw /dev/vda /data || log "mounting /dev/vda on /data failed"
}

agent_port() {
    for name_file in /sys/class/virtio-ports/*/name; do
        [ -f "$name_file" ] || continue
        if [ "$(cat "$name_file")" = "$AGENT_PORT_NAME" ]; then
            port_dir=${name_file%/name}
            echo "/dev/${port_dir##*/}"
            return 0
        fi
    done
    return 1
}

agent_running() {
    [ -f /run/qemu-ga.pid ] && kill -0 "$(cat /run/qemu-ga.pid)" 2>/dev/null
}

start_agent_if_needed() {
    agent_running && return 0
    port=$(agent_port) || return 1
    [ -c "$port" ] || return 1
    qemu-ga -m virtio-serial -p "$port" -t /run/qemu-ga >>/dev/console 2>&1 &
    echo $! >/run/qemu-ga.pid
    log "qemu-ga started on $port"
}

# virtio-serial ports appear once the host side has set them up, after the driver loads.
wait_for_agent() {
    tries=0
    while [ "$tries" -lt 30 ]; do
        start_agent_if_needed && return 0
        tries=$((tries + 1))
        sleep 0.1
    done
    log "no virtio-serial port named $AGENT_PORT_NAME yet; still watching"
}

start_dhcp_if_needed() {
    iface=$1
    pid_file=/run/udhcpc/$iface.pid
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        return 0
    fi
    ip link set "$iface" up
    udhcpc -f -i "$iface" -s /etc/udhcpc/default.script -p "$pid_file" -T 1 -A 2 \
        -x "hostname:$(hostname)" >>/dev/console 2>&1 &
    echo $! >"$pid_file"
}

scan_nics() {
    for device in /sys/class/net/*; do
        iface=${device##*/}
        [ "$iface" = lo ] && continue
        # Type 1 is ARPHRD_ETHER.
        [ "$(cat "$device/type" 2>/dev/null)" = 1 ] || continue
        start_dhcp_if_needed "$iface"
    done
}

# Busybox poweroff, halt and reboot without -f signal PID 1 and expect it to act.
stop_guest() {
    log "stopping: $1"
    sync
    umount /data 2>/dev/null
    "$1" -f
}

main() {
    # Set first: PID 1 ignores every signal it has no handler for, so a shutdown request
    # that arrives during setup would otherwise be lost.
    trap 'stop_guest halt' USR1
    trap 'stop_guest poweroff' USR2
    trap 'stop_guest reboot' TERM
    mount_filesystems
    log "starting"
    ip link set lo up
    load_modules
    if mount_seed; then
        read_identity_env
        read_meta_data
    fi
    apply_identity
    mount_data_disk
    start_acpid
    # The agent goes first: the SSH key tools block until the kernel's random pool is
    # initialized, which takes about a second more under TCG.
    wait_for_agent
    scan_nics
    install_host_key
    install_authorized_keys
    start_dropbear
    log "ready hostname=$(hostname)"
    while :; do
        sleep 0.5
        scan_nics
        start_agent_if_needed >/dev/null 2>&1
    done
}

main
