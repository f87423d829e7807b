"""Images reach the nodes: signed image lists, the site's approvals, the service's image store (docs/images.md).

- :mod:`.imagelist`: the list format, endorser keys, signing and verifying;
- :mod:`.transfer`: fetching lists and images from their sources;
- :mod:`.catalog`: the site's catalogue over the store, and the rule every VM start goes through;
- :mod:`.routes`: the operators' HTTP routes and the pilots' image fetch;
- :mod:`.cli`: ``workspace-lease image ...``.
"""
