"""The node's VM hosting: the service's VM commands run against libvirt, for one slot.

``hosting`` joins the parts for the lifecycle; ``worker`` runs the commands
in order; ``host`` owns the slot's domains on one libvirt connection;
``check`` judges a VM spec against the slot and the node; ``domainxml``
renders the domain; ``tag`` is the metadata that says whose a domain is;
``cleanup`` destroys them. Nothing here imports libvirt at import time.
"""
