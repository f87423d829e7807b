"""Grid Engine's ``qstat -j $JOB_ID``: the job's ``h_rt``/``s_rt``, counted from this task's session start."""

from __future__ import annotations

from pilot.walltime.base import SourceFailed, from_session_start, parse_walltime, quote


def probe(env, query, now):
    """The session leader's start plus the job's run-time limit; None outside a Grid Engine job."""
    job = env.get("JOB_ID")
    if not job or not query.client.sge_root:
        return None
    output = query("qstat", "-j", job)
    limit = sge_runtime_limit(output)
    if limit is None:
        raise SourceFailed(f"qstat -j {job} shows no h_rt or s_rt in the job's hard resource list")
    # The pilot's session leader is the task qrsh -inherit started, moments after the job did: the end
    # counted from it is late by that moment, which the walltime margin covers.
    return from_session_start(limit, "qstat -j", now)


def sge_runtime_limit(output: str) -> int | None:
    """The least of ``h_rt`` and ``s_rt`` (seconds) in ``qstat -j``'s ``hard resource_list`` line, or None."""
    limits = []
    for line in output.splitlines():
        name, _, value = line.partition(":")
        if name.strip() != "hard resource_list":
            continue
        for item in value.split(","):
            key, _, text = item.strip().partition("=")
            if key in ("h_rt", "s_rt"):
                try:
                    limits.append(parse_walltime(text))
                except ValueError:
                    raise SourceFailed(f"not a run-time limit: {quote(item.strip())}") from None
    return min(limits) if limits else None
