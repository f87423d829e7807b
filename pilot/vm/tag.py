"""The project's tag on libvirt domains: which slot, lease and pilot a VM belongs to.

Every domain a pilot creates carries, in libvirt ``<metadata>``, one
element in the project's own XML namespace. Teardown and
``workspace-killall`` find VMs by this tag, never by the service's word or
by name, so a neighbour's VMs (untagged, or another slot's) are never
touched. libvirt has no server-side filter on metadata: list the domains,
ask each.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

NAMESPACE = "urn:workspace-pilot:slot:1"
PREFIX = "wp"
ELEMENT = "slot"

# So that domain XML rendered with ElementTree says xmlns:wp=... rather than ns0 (cosmetic: libvirt matches the URI).
ET.register_namespace(PREFIX, NAMESPACE)

# libvirt's VIR_DOMAIN_METADATA_ELEMENT, VIR_ERR_NO_DOMAIN and VIR_ERR_NO_DOMAIN_METADATA,
# without importing libvirt here.
_METADATA_ELEMENT = 2
_ERR_NO_DOMAIN = 42
_ERR_NO_DOMAIN_METADATA = 80


@dataclasses.dataclass(frozen=True)
class VmTag:
    """What the tag says about a domain."""

    slot: str
    lease: str
    pilot_pid: int

    def to_xml(self) -> str:
        """The metadata element (libvirt adds the namespace prefix itself when it is set)."""
        element = ET.Element(ELEMENT, {"id": self.slot, "lease": self.lease, "pilot-pid": str(self.pilot_pid)})
        return ET.tostring(element, encoding="unicode")

    def to_element(self) -> ET.Element:
        """The element in the project namespace, for a domain's ``<metadata>`` at creation.

        A domain created with it carries the tag from its first moment, and
        :func:`read_tag` finds it as it finds one put there by :func:`set_tag`.
        """
        return ET.Element(
            f"{{{NAMESPACE}}}{ELEMENT}", {"id": self.slot, "lease": self.lease, "pilot-pid": str(self.pilot_pid)}
        )


def parse_tag(xml: str) -> VmTag | None:
    """The tag in a metadata element, or None if it is not one of ours or malformed."""
    try:
        element = ET.fromstring(xml)
    except ET.ParseError:
        return None
    if element.tag.rsplit("}", 1)[-1] != ELEMENT:
        return None
    try:
        return VmTag(element.attrib["id"], element.attrib.get("lease", ""), int(element.attrib.get("pilot-pid", "0")))
    except (KeyError, ValueError):
        return None


def set_tag(domain, tag: VmTag, *, flags: int = 0) -> None:
    """Put ``tag`` on a libvirt domain (live or persistent per ``flags``)."""
    domain.setMetadata(_METADATA_ELEMENT, tag.to_xml(), PREFIX, NAMESPACE, flags)


def read_tag(domain) -> VmTag | None:
    """The tag of a libvirt domain, or None when it has none of ours (or vanished while we asked)."""
    import libvirt

    try:
        xml = domain.metadata(_METADATA_ELEMENT, NAMESPACE, 0)
    except libvirt.libvirtError as exc:
        # A transient domain that shuts down between listAllDomains and this call is gone, not an error.
        if exc.get_error_code() in (_ERR_NO_DOMAIN_METADATA, _ERR_NO_DOMAIN):
            return None
        raise
    return parse_tag(xml)


def tagged_domains(conn) -> list[tuple[object, VmTag]]:
    """Every domain on ``conn`` (running or defined) that carries the project's tag."""
    found = []
    for domain in conn.listAllDomains(0):
        tag = read_tag(domain)
        if tag is not None:
            found.append((domain, tag))
    return found
