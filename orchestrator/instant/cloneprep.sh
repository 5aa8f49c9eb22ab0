# labctl ClonePrep, run once in an instant clone right after the fork, through the guest
# agent as `sh -c THIS-TEXT labctl-cloneprep ARGS...`. The text is fixed; every value
# comes as an argument that labctl checked against [A-Za-z0-9.-] before sending it.
# Arguments: PROFILE (systemd|tiny) EPOCH HOSTNAME FQDN MACHINE_ID INSTANCE_ID
# PARENT_INSTANCE_ID RANDOM_HEX HOST_KEY_BASE64 (the public ed25519 key; only base64
# characters). Standard input: the SSH host private key (OpenSSH).
# Each step prints "step NAME UPTIME" first, so a failure names its step and labctl
# can tell how long each one took. Shell builtins are used where they do the job: each
# program started in a freshly forked guest costs tens of milliseconds under TCG.
set -eu
profile=$1 epoch=$2 name=$3 fqdn=$4 machine_id=$5 instance=$6 parent_instance=$7 seed=$8
public_key=$9
umask 022

step() {
    read -r uptime _ </proc/uptime
    echo "step $1 $uptime"
}

step hostname
# First, because the NIC that labctl plugs in meanwhile sends a DHCP request with the
# guest's hostname. Its writes are shell builtins, so the step is quick.
echo "$name" >/etc/hostname
echo "$name" >/proc/sys/kernel/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s %s\n' "$fqdn" "$name" >/etc/hosts
if [ "$profile" = systemd ]; then
    printf '::1\tlocalhost ip6-localhost ip6-loopback\n' >>/etc/hosts
fi

step clock
date -u -s "@$epoch" >/dev/null

step rng
# Children share the parent's RNG state. Mix in host randomness; where perl exists,
# RNDRESEEDCRNG (_IO('R', 7)) makes the kernel reseed its CRNG from it at once.
printf '%s' "$seed" >/dev/urandom
if [ "$profile" = systemd ] && command -v perl >/dev/null; then
    perl -e 'open(my $f, ">", "/dev/urandom") or die "$!\n";
             ioctl($f, 0x5207, 0) or die "RNDRESEEDCRNG: $!\n"'
fi

step machine-id
printf '%s\n' "$machine_id" >/etc/machine-id

step ssh-host-keys
if [ "$profile" = tiny ]; then
    (umask 077 && cat >/run/labctl-host-key)
    /sbin/labctl-install-host-key /run/labctl-host-key
    rm -f /run/labctl-host-key
else
    # The parent removed its host keys before it was saved (labctl's prepare step).
    (umask 077 && cat >/etc/ssh/ssh_host_ed25519_key)
    printf 'ssh-ed25519 %s root@%s\n' "$public_key" "$name" >/etc/ssh/ssh_host_ed25519_key.pub
    # sshd re-executes itself on SIGHUP and loads the new key.
    if [ -s /run/sshd.pid ] && read -r sshd </run/sshd.pid; then
        kill -HUP "$sshd"
    fi
fi

step instance-id
if [ "$profile" = tiny ]; then
    echo "$instance" >/run/labctl-instance-id
else
    cloud=/var/lib/cloud
    if [ -d "$cloud/instances/$parent_instance" ]; then
        mv -T "$cloud/instances/$parent_instance" "$cloud/instances/$instance"
    fi
    ln -sfn "$cloud/instances/$instance" "$cloud/instance"
    echo "$instance" >"$cloud/data/instance-id"
fi
step done
