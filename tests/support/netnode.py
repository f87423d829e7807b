"""A node's side of the lease network tests: the pilot's NodeNetworks, driven line by line, in a node's namespace.

Run as ``ip netns exec NODE python -m tests.support.netnode RUN_ROOT JOURNAL_FILE ADDRESS`` by
``tests/test_lease_network.py``: it reads one JSON request per line on stdin
(``{"op": "attach", "nic": {...}}``, ``detach``, ``apply`` with ``net``,
``teardown``) and answers one JSON line each (``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``). The networks it would journal are
written to JOURNAL_FILE (JSON: names and root) before each is made, as the
pilot's journal would hold them, so a test can SIGKILL it and clean up
the way the next pilot or workspace-killall would.
"""

from __future__ import annotations

import json
import os
import sys

from pilot.net.commands import NetError
from pilot.net.nodenets import NodeNetworks
from workspace_common.protocol.network import NetState, Nic


def main() -> int:
    run_root, journal_file, address = sys.argv[1:4]

    def journal(names):
        temporary = journal_file + ".new"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"nets": list(names), "net_root": run_root}, handle)
        os.replace(temporary, journal_file)

    networks = NodeNetworks(own_address=address, forward_address=address, run_root=run_root, before_first=journal)
    print(json.dumps({"ok": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "attach":
                answer = {"interface": networks.attach(Nic.from_dict("nic", request["nic"]))}
            elif request["op"] == "detach":
                networks.detach(Nic.from_dict("nic", request["nic"]))
                answer = {}
            elif request["op"] == "apply":
                answer = {"said": networks.apply(NetState.from_dict("net", request["net"]))}
            elif request["op"] == "teardown":
                answer = {"removed": networks.teardown()}
            else:
                answer = {"error": f"unknown op {request['op']}"}
                print(json.dumps({"ok": False, **answer}), flush=True)
                continue
        except NetError as exc:
            print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
            continue
        print(json.dumps({"ok": True, **answer}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
