"""Network allowlist rules and the decisions made from them (pure, no I/O).

Rule syntax (allow and deny lists use the same one)::

    example.com          that name only, any port
    example.com:443      that name, port 443 only
    *.example.com        any subdomain of example.com (not example.com itself)
    93.184.216.34:80     that IPv4 address
    10.0.0.0/8           an IPv4 network
    [2001:db8::1]:443    an IPv6 address (always in brackets)
    [fd00::/8]           an IPv6 network

A destination is checked in two steps:

1. :meth:`Ruleset.decide_name` on the requested host, after
   :func:`canonical_host` (lower case, IDNA, no trailing dot, and every numeric
   IPv4 spelling such as ``2130706433`` or ``0x7f.1`` turned into the address).
   Deny rules are checked first. A host name needs a name rule; an IP literal
   needs an IP or CIDR rule.
2. :meth:`Ruleset.decide_address` on every address the name resolved to.
   Deny IP/CIDR rules apply here too. Addresses in special ranges (loopback,
   link-local and cloud metadata, RFC 1918, CGNAT, unique-local, multicast,
   reserved, and IPv4-mapped/NAT64/6to4 forms of those) are refused unless an
   IP or CIDR allow rule covers them explicitly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Decision",
    "Host",
    "IPAddress",
    "Rule",
    "Ruleset",
    "canonical_host",
    "parse_rule",
    "special_range",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Host = str | ipaddress.IPv4Address | ipaddress.IPv6Address
RuleKind = Literal["name", "suffix", "ip", "cidr"]

_RULE_FORMS = (
    "valid forms: NAME[:PORT], *.SUFFIX[:PORT], IPv4[:PORT], IPv4/PREFIX[:PORT], "
    "[IPv6][:PORT], [IPv6/PREFIX][:PORT]"
)
_MAX_HOST_INPUT = 1024
_MAX_NAME = 253
_MAX_LABEL = 63
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_FORBIDDEN = frozenset("%/@\\?#[]<>\"'`|^{}")
_HEX = frozenset("0123456789abcdef")


# --------------------------------------------------------------------------- host names


def canonical_host(text: str) -> Host:
    """Return the canonical form of a host: an IP address object for any IP
    spelling, else the lower-case ASCII (IDNA) name without a trailing dot.

    Raises :class:`ValueError` for empty, over-long or malformed hosts and for
    hosts containing ``%``, ``/``, ``@``, whitespace, control characters or NUL.
    IPv6 may be given with or without brackets; IPv4-mapped IPv6 addresses
    (``::ffff:127.0.0.1``) become the IPv4 address.
    """
    if not isinstance(text, str):
        raise TypeError(f"host must be str, not {type(text).__name__}")
    if not text:
        raise ValueError("empty host")
    if len(text) > _MAX_HOST_INPUT:
        raise ValueError(f"host too long ({len(text)} characters)")
    if text.startswith("[") and text.endswith("]") and len(text) > 2:
        return _parse_ipv6(text[1:-1], text)
    _check_chars(text, text)
    if ":" in text:
        return _parse_ipv6(text, text)
    if text.isascii():
        name = text.lower()
    else:
        try:
            name = text.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise ValueError(f"invalid international host name {text!r}: {exc}") from None
        _check_chars(name, text)
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError(f"invalid host {text!r}: empty name")
    labels = name.split(".")
    if _ends_in_number(labels[-1]):
        return _parse_ipv4_whatwg(labels, text)
    if len(name) > _MAX_NAME:
        raise ValueError(f"host name too long ({len(name)} > {_MAX_NAME}): {text!r}")
    for label in labels:
        if not label:
            raise ValueError(f"invalid host {text!r}: empty label")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"invalid host {text!r}: label longer than {_MAX_LABEL}")
        if not _LABEL_CHARS.issuperset(label):
            raise ValueError(f"invalid host {text!r}: bad character in label {label!r}")
        if label.startswith("xn--"):
            try:
                label[4:].encode("ascii").decode("punycode")
            except UnicodeError:
                raise ValueError(f"invalid host {text!r}: bad punycode label {label!r}") from None
    return name


def _check_chars(text: str, original: str) -> None:
    for ch in text:
        if ch in _FORBIDDEN or ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise ValueError(f"invalid character {ch!r} in host {original!r}")


def _parse_ipv6(text: str, original: str) -> IPAddress:
    if "%" in text:
        raise ValueError(f"IPv6 zone identifiers are not allowed: {original!r}")
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"invalid IPv6 address {original!r}") from None
    return unmap(addr)


def _ends_in_number(label: str) -> bool:
    # The WHATWG URL standard's "ends in a number" test: a host whose last label
    # is numeric must be an IPv4 address (in some spelling) or it is invalid.
    if label and label.isascii() and label.isdigit():
        return True
    return label.startswith("0x") and _HEX.issuperset(label[2:])


def _ipv4_number(part: str) -> int | None:
    if not part:
        return None
    if part.startswith("0x"):
        digits, base = part[2:], 16
        if not digits:
            return 0
        if not _HEX.issuperset(digits):
            return None
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
        if not set(digits) <= set("01234567"):
            return None
    else:
        digits, base = part, 10
        if not (digits.isascii() and digits.isdigit()):
            return None
    if len(digits) > 40:  # far beyond any valid value; avoid huge int parsing
        return None
    return int(digits, base)


def _parse_ipv4_whatwg(labels: list[str], original: str) -> ipaddress.IPv4Address:
    if len(labels) > 4:
        raise ValueError(f"invalid IPv4 address {original!r}: more than four parts")
    numbers: list[int] = []
    for part in labels:
        value = _ipv4_number(part)
        if value is None:
            raise ValueError(f"invalid IPv4 address {original!r}: bad part {part!r}")
        numbers.append(value)
    if any(n > 255 for n in numbers[:-1]):
        raise ValueError(f"invalid IPv4 address {original!r}: part out of range")
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError(f"invalid IPv4 address {original!r}: out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n * 256 ** (3 - i)
    return ipaddress.IPv4Address(value)


def unmap(addr: IPAddress) -> IPAddress:
    """The IPv4 address for an IPv4-mapped IPv6 address, else ``addr``."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            addr = ipaddress.IPv6Address(addr.packed)
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr


def format_host(host: Host) -> str:
    """``host`` as text, IPv6 in brackets."""
    if isinstance(host, ipaddress.IPv6Address):
        return f"[{host}]"
    return str(host)


# --------------------------------------------------------------------------- special ranges

_SPECIAL_V4_TEXT = (
    ("0.0.0.0/8", "unspecified ('this network')"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (includes cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_SPECIAL_V6_TEXT = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments (includes Teredo)"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing (SRv6)"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_special_tables: (
    tuple[
        tuple[tuple[ipaddress.IPv4Network, str], ...],
        tuple[tuple[ipaddress.IPv6Network, str], ...],
    ]
    | None
) = None
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def _tables() -> tuple[
    tuple[tuple[ipaddress.IPv4Network, str], ...],
    tuple[tuple[ipaddress.IPv6Network, str], ...],
]:
    global _special_tables
    if _special_tables is None:
        _special_tables = (
            tuple((ipaddress.IPv4Network(n), why) for n, why in _SPECIAL_V4_TEXT),
            tuple((ipaddress.IPv6Network(n), why) for n, why in _SPECIAL_V6_TEXT),
        )
    return _special_tables


def special_range(addr: IPAddress) -> str | None:
    """Why ``addr`` is not a public unicast address (e.g. ``"loopback"``), or
    ``None`` if it is one. IPv6 forms embedding an IPv4 address (IPv4-mapped,
    NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that address."""
    v4, v6 = _tables()
    if isinstance(addr, ipaddress.IPv4Address):
        for net4, why in v4:
            if addr in net4:
                return why
        return None
    addr = ipaddress.IPv6Address(addr.packed)  # drop any scope id
    mapped = addr.ipv4_mapped
    if mapped is not None:
        inner = special_range(mapped)
        return None if inner is None else f"IPv4-mapped {inner}"
    if addr in _NAT64:
        inner = special_range(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        return None if inner is None else f"NAT64 of {inner}"
    sixtofour = addr.sixtofour
    if sixtofour is not None:
        inner = special_range(sixtofour)
        return None if inner is None else f"6to4 of {inner}"
    for net6, why in v6:
        if addr in net6:
            return why
    if addr not in _GLOBAL_UNICAST:
        return "reserved (outside 2000::/3)"
    return None


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule. ``value`` is canonical: the ASCII name (for
    ``suffix`` without the ``*.``), or the address/network as text."""

    kind: RuleKind
    value: str
    port: int | None = None
    network: IPNetwork | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"rule port out of range: {self.port}")
        if self.kind in ("ip", "cidr"):
            object.__setattr__(self, "network", ipaddress.ip_network(self.value, strict=True))
        elif self.kind not in ("name", "suffix"):
            raise ValueError(f"unknown rule kind {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "suffix":
            text = f"*.{self.value}"
        elif self.kind in ("ip", "cidr") and ":" in self.value:
            text = f"[{self.value}]"
        else:
            text = self.value
        return text if self.port is None else f"{text}:{self.port}"

    @property
    def is_address_rule(self) -> bool:
        return self.kind in ("ip", "cidr")

    def matches(self, host: Host, port: int) -> bool:
        """Whether this rule covers ``host`` (canonical) on ``port``."""
        if self.port is not None and self.port != port:
            return False
        if isinstance(host, str):
            if self.kind == "name":
                return host == self.value
            if self.kind == "suffix":
                return host.endswith("." + self.value)
            return False
        return self.network is not None and host in self.network


def parse_rule(text: str) -> Rule:
    """Parse one rule (see the module docstring). Raises :class:`ValueError`
    naming the rule and the valid forms."""
    try:
        return _parse_rule(text)
    except ValueError as exc:
        raise ValueError(f"invalid network rule {text!r}: {exc}; {_RULE_FORMS}") from None


def _parse_port(text: str) -> int:
    if not text or not text.isascii() or not text.isdigit() or len(text) > 5:
        raise ValueError(f"bad port {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return port


def _parse_rule(text: str) -> Rule:
    if not isinstance(text, str):
        raise ValueError("a rule must be a string")
    spec = text.strip()
    if not spec:
        raise ValueError("empty rule")
    port: int | None = None
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ValueError("missing ']'")
        inner, rest = spec[1:close], spec[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"unexpected text after ']': {rest!r}")
            port = _parse_port(rest[1:])
        if "/" in inner:
            return _cidr_rule(inner, port, v6=True)
        addr = _parse_ipv6(inner, inner)
        return Rule("ip", str(addr), port)
    if spec.count(":") > 1:
        raise ValueError("IPv6 addresses must be written in brackets, e.g. [::1]:443")
    host, sep, port_text = spec.partition(":")
    if sep:
        port = _parse_port(port_text)
    if "/" in host:
        return _cidr_rule(host, port, v6=False)
    if host.startswith("*."):
        suffix = canonical_host(host[2:])
        if not isinstance(suffix, str):
            raise ValueError("a wildcard needs a name suffix, not an address")
        return Rule("suffix", suffix, port)
    if "*" in host:
        raise ValueError("'*' is only allowed as a leading '*.' label")
    canon = canonical_host(host)
    if isinstance(canon, str):
        return Rule("name", canon, port)
    return Rule("ip", str(canon), port)


def _cidr_rule(text: str, port: int | None, *, v6: bool) -> Rule:
    addr_text, _, prefix_text = text.partition("/")
    if not prefix_text.isascii() or not prefix_text.isdigit() or len(prefix_text) > 3:
        raise ValueError(f"bad prefix length {prefix_text!r}")
    net: IPNetwork
    try:
        if v6:
            net = ipaddress.IPv6Network(f"{addr_text}/{int(prefix_text)}", strict=True)
        else:
            net = ipaddress.IPv4Network(f"{addr_text}/{int(prefix_text)}", strict=True)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    if net.num_addresses == 1:
        return Rule("ip", str(net.network_address), port)
    return Rule("cidr", str(net), port)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """The outcome of a check: ``rule`` is the text of the deciding rule."""

    allowed: bool
    rule: str | None
    reason: str


def _as_rule(item: Rule | str) -> Rule:
    return item if isinstance(item, Rule) else parse_rule(item)


class Ruleset:
    """Allow and deny rules (:class:`Rule` objects or rule strings)."""

    __slots__ = ("allow", "deny")

    def __init__(self, allow: Iterable[Rule | str] = (), deny: Iterable[Rule | str] = ()) -> None:
        self.allow: tuple[Rule, ...] = tuple(_as_rule(r) for r in allow)
        self.deny: tuple[Rule, ...] = tuple(_as_rule(r) for r in deny)

    def __repr__(self) -> str:
        allow = [str(r) for r in self.allow]
        deny = [str(r) for r in self.deny]
        return f"Ruleset(allow={allow!r}, deny={deny!r})"

    def decide_name(self, host: Host, port: int) -> Decision:
        """First check, on the requested host (canonicalised here if text)."""
        if isinstance(host, str):
            try:
                canon = canonical_host(host)
            except ValueError as exc:
                return Decision(False, None, f"invalid host: {exc}")
        else:
            canon = unmap(host)
        if not 1 <= port <= 65535:
            return Decision(False, None, f"invalid port {port}")
        where = f"{format_host(canon)}:{port}"
        for rule in self.deny:
            if rule.matches(canon, port):
                return Decision(False, str(rule), f"{where} is denied by rule {rule}")
        for rule in self.allow:
            if rule.is_address_rule != isinstance(canon, str) and rule.matches(canon, port):
                return Decision(True, str(rule), f"{where} is allowed by rule {rule}")
        if isinstance(canon, str):
            return Decision(False, None, f"no allow rule matches {where}")
        return Decision(
            False, None, f"no IP or CIDR allow rule matches {where} (IP destinations need one)"
        )

    def decide_address(
        self, ip: IPAddress | str, port: int, host_matched_by_name: bool
    ) -> Decision:
        """Second check, on one resolved (or literal) address ``ip``.

        ``host_matched_by_name`` says the destination was a name allowed by a
        name rule; then public addresses are fine. Special-range addresses
        need an IP/CIDR allow rule covering them either way.
        """
        addr = unmap(ipaddress.ip_address(ip) if isinstance(ip, str) else ip)
        where = f"{format_host(addr)}:{port}"
        for rule in self.deny:
            if rule.is_address_rule and rule.matches(addr, port):
                return Decision(False, str(rule), f"address {where} is denied by rule {rule}")
        for rule in self.allow:
            if rule.is_address_rule and rule.matches(addr, port):
                return Decision(True, str(rule), f"address {where} is allowed by rule {rule}")
        if not host_matched_by_name:
            return Decision(False, None, f"no IP or CIDR allow rule matches address {where}")
        why = special_range(addr)
        if why is not None:
            return Decision(
                False,
                None,
                f"resolved address {addr} is {why}; allow it explicitly with an IP/CIDR rule",
            )
        return Decision(True, None, f"address {addr} is public")
