"""The wire protocol: round trips, and every kind of bad body refused with the right error."""

import json

import pytest

from workspace_common.protocol import (
    MAX_BODY_BYTES,
    STATES,
    Notification,
    ProtocolError,
    digest_ha1,
    format_time,
    sign,
    signature_matches,
    utc_now,
)

GOOD = {
    "version": 2,
    "slot": "2f1c6a1e-8f0e-4d53-9d49-9a5b3c1d2e3f",
    "host": "node7",
    "state": "reserved",
    "code": 0,
    "seq": 1,
    "sent_at": "2026-11-21T10:00:00.123456Z",
    "memory_mb": 1024,
}


def body(**changes) -> bytes:
    data = dict(GOOD)
    for key, value in changes.items():
        if value is KeyError:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


def test_round_trip_with_every_field():
    original = Notification(
        slot=GOOD["slot"], host="node7", state="vm-running", seq=42, sent_at=format_time(utc_now()),
        memory_mb=2048, code=0, expires_at="2026-11-21T11:00:00.000000Z", vms=("vm-1", "vm-2"),
        command=7, message="two guests up",
        timings={"command_seen": "2026-11-21T10:59:59.900000Z", "domain_created": "2026-11-21T11:00:00.000001Z"},
    )
    again = Notification.from_json(original.to_json())
    assert again == original
    assert json.loads(original.to_json())["vms"] == ["vm-1", "vm-2"]
    assert json.loads(original.to_json())["timings"]["domain_created"] == "2026-11-21T11:00:00.000001Z"


def test_round_trip_leaves_unset_optional_fields_out():
    parsed = Notification.from_json(body())
    assert parsed.to_dict() == GOOD
    assert "expires_at" not in json.loads(parsed.to_json())


USAGE = {"web": {"busy": True, "cpu": 87}, "db": {"busy": False, "cpu": None}}


@pytest.mark.parametrize("state", sorted(STATES))
def test_every_state_is_accepted(state):
    extra = {"usage": USAGE} if state == "vm-usage" else {}
    assert Notification.from_json(body(state=state, **extra)).state == state


def test_a_vm_usage_report_round_trips_and_only_it_carries_usage():
    parsed = Notification.from_json(body(state="vm-usage", usage=USAGE))
    assert parsed.usage == USAGE
    assert Notification.from_json(parsed.to_json()) == parsed
    with pytest.raises(ProtocolError, match="usage: a vm-usage notification, and only one"):
        Notification.from_json(body(state="heartbeat", usage=USAGE))
    with pytest.raises(ProtocolError, match="usage: a vm-usage notification, and only one"):
        Notification.from_json(body(state="vm-usage"))


@pytest.mark.parametrize("usage, needle", [
    ({}, "usage: must be an object"),
    ([["web", True]], "usage: must be an object"),
    ({"web": True}, "usage.web: must be an object"),
    ({"web": {"busy": 1, "cpu": 3}}, "usage.web.busy: must be true or false"),
    ({"web": {"busy": True, "cpu": 101}}, "usage.web.cpu: 101 is outside 0..100"),
    ({"web": {"busy": True, "cpu": 2.5}}, "usage.web.cpu: must be an integer"),
    ({"web": {"busy": True, "cpu": 3, "load": 9}}, "usage.web: unknown field"),
    ({"../x": {"busy": True, "cpu": 3}}, "usage name"),
    ({f"vm{i}": {"busy": True, "cpu": 1} for i in range(257)}, "more than 256 VMs"),
])
def test_a_bad_usage_report_is_refused_naming_what_is_wrong(usage, needle):
    with pytest.raises(ProtocolError, match=needle.replace(".", r"\.")):
        Notification.from_json(body(state="vm-usage", usage=usage))


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b"not json", "body is not JSON"),
        (b"\xff\xfe", "body is not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"seq": NaN}', "NaN is not valid JSON"),
        (b"[" * 2000 + b"]" * 2000, "nested deeper than 16"),
        (b'{"a":' * 17 + b"1" + b"}" * 17, "nested deeper than 16"),
        (body(message="\ud800"), "lone surrogate (\\ud800)"),
        (body(**{"timings": {"\udfff": GOOD["sent_at"]}}), "lone surrogate"),
        (body(seq=KeyError), "missing field(s): seq"),
        (body(extra=1), "unknown field(s): extra"),
        (body(version=1), "version"),
        (body(seq=0), "seq"),
        (body(seq="1"), "seq: must be an integer"),
        (body(seq=True), "seq: must be an integer"),
        (body(seq=1.5), "seq: must be an integer"),
        (body(code=None), "code: must be an integer"),
        (body(memory_mb=-1), "memory_mb"),
        (body(state="hacked"), "state"),
        (body(state=None), "state"),
        (body(slot=""), "slot: length"),
        (body(slot="x" * 65), "slot: length"),
        (body(slot="../etc"), "slot"),
        (body(host="bad host"), "host"),
        (body(sent_at="2026-11-21T10:00:00Z"), "sent_at"),
        (body(sent_at="2026-11-21 10:00:00.000000"), "sent_at"),
        (body(sent_at="2026-13-45T25:00:00.000000Z"), "not a valid date"),
        (body(sent_at=12), "sent_at"),
        (body(expires_at="tomorrow"), "expires_at"),
        (body(vms="vm-1"), "vms: must be a list"),
        (body(vms=["ok", "not ok"]), "vms[]"),
        (body(vms=["v"] * 257), "vms: more than"),
        (body(command=0), "command"),
        (body(message="m" * 4097), "message: length"),
        (body(message=5), "message: must be a string"),
        (body(timings=["memory_take"]), "timings: must be an object"),
        (body(timings={"Memory": GOOD["sent_at"]}), "timings name"),
        (body(timings={"x" * 49: GOOD["sent_at"]}), "timings name: length"),
        (body(timings={"memory_take": 1.5}), "timings.memory_take"),
        (body(timings={"memory_take": "2026-11-21T10:00:00Z"}), "timings.memory_take"),
        (body(timings={f"m{i}": GOOD["sent_at"] for i in range(33)}), "timings: more than 32"),
    ],
)
def test_bad_bodies_are_refused_with_400_and_say_why(raw, needle):
    with pytest.raises(ProtocolError) as caught:
        Notification.from_json(raw)
    assert caught.value.status == 400
    assert needle in str(caught.value)


def test_oversized_body_is_refused_with_413():
    raw = body(message="m" * 10) + b" " * MAX_BODY_BYTES
    with pytest.raises(ProtocolError) as caught:
        Notification.from_json(raw)
    assert caught.value.status == 413


def test_constructor_validates_too():
    with pytest.raises(ProtocolError, match="seq"):
        Notification(slot="s", host="h", state="reserved", seq=-3, sent_at=GOOD["sent_at"], memory_mb=1)


def test_signature_binds_body_and_key():
    key = digest_ha1("pilot", "realm", "secret")
    raw = body()
    header = sign(key, raw)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert signature_matches(key, raw, header)
    assert not signature_matches(key, raw + b" ", header)
    assert not signature_matches(digest_ha1("pilot", "realm", "other"), raw, header)
    assert not signature_matches(key, raw, None)
    assert not signature_matches(key, raw, "sha256=" + "0" * 64)
