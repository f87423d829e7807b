"""The node's memory and what keeps it safe: the backends that shrink and restore it, the write-ahead
journal of every change, the node lock, and the owners (pid + start time) the journal names.

``memory`` is the one way the lifecycle changes the node; ``backends`` are the
knobs (hugepages, cgroup, xen, xl, none); ``journal``, ``lock`` and ``owner``
let the next pilot and ``workspace-killall`` undo what a dead pilot left.
"""
