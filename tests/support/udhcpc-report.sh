#!/bin/sh
# udhcpc's script for tests/test_lease_network.py: on a lease, print what the DHCP server said, one line.
[ "$1" = bound ] && echo "lease ip=$ip mask=$mask dns=$dns domain=$domain hostname=$hostname mtu=$mtu router=$router"
exit 0
