#!/bin/sh
# The udhcpc event script of the labctl tiny image. udhcpc runs it with the event name as
# $1 and the lease in the environment (interface, ip, mask as a prefix length, router, dns).

flush_address() {
    ip -4 addr flush dev "$interface"
}

apply_lease() {
    flush_address
    ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    for gateway in $router; do
        # A second NIC's gateway would clash with the first's default route, so each
        # interface gets its own metric and the first NIC keeps priority.
        metric=$((100 + $(cat "/sys/class/net/$interface/ifindex")))
        ip route replace default via "$gateway" dev "$interface" metric "$metric"
        break
    done
    if [ -n "$dns" ]; then
        {
            [ -n "$domain" ] && echo "search $domain"
            for server in $dns; do
                echo "nameserver $server"
            done
        } >/etc/resolv.conf
    fi
    echo "labctl-tiny: $interface has address $ip/${mask:-24}" >/dev/console
}

case "$1" in
    deconfig)
        ip link set "$interface" up
        flush_address
        ;;
    bound | renew)
        apply_lease
        ;;
    leasefail | nak)
        ;;
esac
exit 0
