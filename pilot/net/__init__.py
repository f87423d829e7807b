"""The leased VMs' networks on a node: a lease network's bridge, overlay, filters, DHCP and DNS, and forwards.

The service allocates every address (:mod:`workspace_common.protocol.network`); the
pilot builds on its node what the network state it was sent describes
(:mod:`.leasenet`), gives each VM exactly the address it was sent, lets
it send from nothing else (:mod:`.filters`), answers DHCP for its own VMs
and DNS for the lease's names (:mod:`.dhcp`), and forwards a port of the
node's address to each VM's SSH (:mod:`.forward`). Every device is named
from the network (:mod:`.names`) and journalled before it is made, so
whoever undoes a dead pilot's entry removes them all (:mod:`.cleanup`).
Nothing here is imported at the pilot's start.
"""
