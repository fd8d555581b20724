"""Rule parsing, host canonicalisation and decisions (pure)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanobox.net.rules import (
    Rule,
    Ruleset,
    canonical_host,
    format_host,
    parse_rule,
    special_range,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# --------------------------------------------------------------------------- canonical_host


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", "example.com"),
        ("ExAmPlE.CoM.", "example.com"),
        ("sub.example.com", "sub.example.com"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        (
            "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45\uff0e\uff43\uff4f\uff4d",
            "example.com",
        ),  # full-width
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        ("1.example", "1.example"),
        ("123abc.example", "123abc.example"),
    ],
)
def test_canonical_names(text, expected):
    assert canonical_host(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0x7f.1",
        "127.1",
        "127.0.1",
        "0177.0.0.1",
        "0177.0.0.01",
        "0x7f.0x0.0x0.0x1",
        "00000177.0.0.1",
        "127.0.0.1.",
        "0x7f.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "::ffff:127.0.0.1",
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # full-width digits: IDNA maps them to ASCII
        "127。0。0。1",  # ideographic full stop
    ],
)
def test_spellings_of_loopback(text):
    assert canonical_host(text) == V4("127.0.0.1")


@pytest.mark.parametrize(
    "text",
    [
        "169.254.169.254",
        "2852039166",
        "0xa9fea9fe",
        "0xa9.0xfe.0xa9.0xfe",
        "0251.0376.0251.0376",
        "169.254.43518",
        "169.16689662",
        "0251.0xfe.43518",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
    ],
)
def test_spellings_of_metadata(text):
    assert canonical_host(text) == V4("169.254.169.254")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::1]", V6("::1")),
        ("::1", V6("::1")),
        ("[0:0:0:0:0:0:0:1]", V6("::1")),
        ("[2001:DB8::1]", V6("2001:db8::1")),
        ("0x", V4("0.0.0.0")),
        ("0", V4("0.0.0.0")),
        ("4294967295", V4("255.255.255.255")),
        ("1.2.3.4", V4("1.2.3.4")),
    ],
)
def test_canonical_addresses(text, expected):
    assert canonical_host(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "a..b",
        ".a",
        "a b",
        "a\tb",
        "a\x00b",
        "a\nb",
        "a%b",
        "a/b",
        "a@b",
        "user@example.com",
        "example.com/path",
        "a\\b",
        "a?b",
        "a#b",
        "[::1",
        "[]",
        "[fe80::1%eth0]",
        "fe80::1%25eth0",
        "[127.0.0.1]",
        "[::1]:80",
        "example.com:80",
        "foo.123",  # ends in a number but is not an address
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.3.256",
        "1.2.65536",
        "4294967296",
        "08.0.0.1",
        "0x1g.0.0.1",
        "99999999999999999999999999999999999999999999999999",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4) + ".com",  # over 253 characters
        "x" * 2000,
        "xn--zz.example",  # bad punycode
        "a\u200bb.\u3000com",  # ideographic space
        "exa mple.com",
        "example.com\r\n",
        "ex\x7fample.com",
        "a*b.com",
        "a_b!.com",
    ],
)
def test_invalid_hosts(text):
    with pytest.raises(ValueError):
        canonical_host(text)


def test_canonical_host_rejects_non_text():
    with pytest.raises(TypeError):
        canonical_host(b"example.com")  # type: ignore[arg-type]


_spelling = st.sampled_from(["dec", "hex", "oct"])


def _spell(value: int, how: str) -> str:
    if how == "hex":
        return hex(value)
    if how == "oct":
        return "0" + oct(value)[2:] if value else "0"
    return str(value)


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.lists(_spelling, min_size=4, max_size=4))
def test_every_numeric_spelling_is_the_address(value, parts, styles):
    octets = list(value.to_bytes(4, "big"))
    head = octets[: parts - 1]
    tail = int.from_bytes(bytes(octets[parts - 1 :]), "big")
    text = ".".join(_spell(v, s) for v, s in zip([*head, tail], styles[:parts], strict=True))
    assert canonical_host(text) == V4(value)


@given(st.text(max_size=80))
def test_canonical_host_random_text_only_raises_valueerror(text):
    try:
        host = canonical_host(text)
    except ValueError:
        return
    # canonical output is stable under a second pass
    assert canonical_host(format_host(host)) == host
    if isinstance(host, str):
        assert host == host.lower() and host.isascii() and not host.endswith(".")


@given(
    st.from_regex(
        r"[a-zA-Z0-9_-]{1,20}(\.[a-zA-Z0-9-]{1,20}){0,3}\.[a-zA-Z]{2,6}\.?", fullmatch=True
    )
)
def test_ascii_names_lowercase(text):
    assert canonical_host(text) == text.lower().rstrip(".")


# --------------------------------------------------------------------------- parse_rule


@pytest.mark.parametrize(
    ("text", "kind", "value", "port", "rendered"),
    [
        ("example.com", "name", "example.com", None, "example.com"),
        ("Example.COM:443", "name", "example.com", 443, "example.com:443"),
        ("  example.com  ", "name", "example.com", None, "example.com"),
        ("*.example.com", "suffix", "example.com", None, "*.example.com"),
        ("*.Bücher.de:8080", "suffix", "xn--bcher-kva.de", 8080, "*.xn--bcher-kva.de:8080"),
        ("93.184.216.34", "ip", "93.184.216.34", None, "93.184.216.34"),
        ("93.184.216.34:80", "ip", "93.184.216.34", 80, "93.184.216.34:80"),
        ("2130706433", "ip", "127.0.0.1", None, "127.0.0.1"),
        ("10.0.0.0/8", "cidr", "10.0.0.0/8", None, "10.0.0.0/8"),
        ("10.0.0.0/8:22", "cidr", "10.0.0.0/8", 22, "10.0.0.0/8:22"),
        ("127.0.0.1/32", "ip", "127.0.0.1", None, "127.0.0.1"),
        ("[::1]", "ip", "::1", None, "[::1]"),
        ("[::1]:80", "ip", "::1", 80, "[::1]:80"),
        ("[fd00::/8]", "cidr", "fd00::/8", None, "[fd00::/8]"),
        ("[fd00::/8]:443", "cidr", "fd00::/8", 443, "[fd00::/8]:443"),
        ("[::ffff:127.0.0.1]", "ip", "127.0.0.1", None, "127.0.0.1"),
        ("[::ffff:10.0.0.0/104]", "cidr", "10.0.0.0/8", None, "10.0.0.0/8"),
        ("0.0.0.0/0", "cidr", "0.0.0.0/0", None, "0.0.0.0/0"),
    ],
)
def test_parse_rule(text, kind, value, port, rendered):
    rule = parse_rule(text)
    assert (rule.kind, rule.value, rule.port) == (kind, value, port)
    assert str(rule) == rendered
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "*",
        "*.",
        "*.*.example.com",
        "a.*.example.com",
        "*example.com",
        "*.1.2.3.4",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:http",
        "example.com:+80",
        "example.com:\uff18\uff10",
        "example.com:80:80",
        "::1",
        "fd00::/8",
        "[::1",
        "[::1]80",
        "[::1]:",
        "[example.com]",
        "[1.2.3.4]",
        "10.0.0.1/8",
        "10.0.0.0/33",
        "10.0.0.0/",
        "10.0.0.0/x",
        "[fd00::1/8]",
        "[fd00::/129]",
        "exa mple.com",
        "user@example.com",
        "example.com/path",
        "http://example.com",
    ],
)
def test_parse_rule_errors_name_the_rule_and_forms(text):
    with pytest.raises(ValueError) as info:
        parse_rule(text)
    message = str(info.value)
    assert repr(text) in message and "valid forms" in message


@given(st.text(max_size=60))
def test_parse_rule_random_text_only_raises_valueerror(text):
    try:
        rule = parse_rule(text)
    except ValueError:
        return
    assert parse_rule(str(rule)) == rule


def test_rule_constructor_validates():
    with pytest.raises(ValueError):
        Rule("cidr", "10.0.0.1/8")
    with pytest.raises(ValueError):
        Rule("name", "example.com", 0)
    with pytest.raises(ValueError):
        Rule("bogus", "x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decisions


def test_decide_name_exact_suffix_port_and_deny_first():
    rules = Ruleset(
        allow=["example.com", "*.example.org", "api.example.net:443", "10.1.0.0/16", "[::1]:80"],
        deny=["bad.example.org", "*.evil.example.org", "10.1.2.0/24"],
    )
    ok = rules.decide_name
    assert ok("example.com", 80).allowed
    assert ok("EXAMPLE.com.", 443).allowed
    assert not ok("www.example.com", 80).allowed  # exact name only
    assert ok("www.example.org", 80).allowed
    assert ok("a.b.example.org", 80).allowed
    assert not ok("example.org", 80).allowed  # the bare suffix is not included
    assert not ok("notexample.org", 80).allowed
    assert ok("api.example.net", 443).allowed
    assert not ok("api.example.net", 80).allowed
    denied = ok("bad.example.org", 80)
    assert not denied.allowed and denied.rule == "bad.example.org"
    assert "denied by rule" in denied.reason
    assert not ok("x.evil.example.org", 80).allowed
    assert ok("10.1.3.4", 22).allowed
    assert not ok("10.1.2.3", 22).allowed  # deny CIDR first
    assert ok("[::1]", 80).allowed and not ok("::1", 81).allowed
    allowed = ok("www.example.org", 80)
    assert allowed.rule == "*.example.org"


def test_name_rules_and_ip_rules_do_not_cross():
    rules = Ruleset(allow=["93.184.216.34", "example.com"])
    literal = rules.decide_name("93.184.216.34", 80)
    assert literal.allowed and literal.rule == "93.184.216.34"
    # an IP literal needs an IP/CIDR rule even if some name would resolve to it
    assert not Ruleset(allow=["example.com"]).decide_name("93.184.216.34", 80).allowed
    # a name needs a name rule even if it would resolve to an allowed IP
    assert not Ruleset(allow=["93.184.216.34"]).decide_name("example.com", 80).allowed


def test_decide_name_invalid_input():
    rules = Ruleset(allow=["example.com"])
    assert "invalid host" in rules.decide_name("exa mple.com", 80).reason
    assert not rules.decide_name("example.com", 0).allowed
    assert not rules.decide_name("example.com", 70000).allowed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "100.64.0.1",
        "100.127.255.254",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.1.1",
        "198.18.0.1",
        "198.51.100.1",
        "203.0.113.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
        "64:ff9b::7f00:1",
        "64:ff9b:1::1",
        "100::1",
        "2001::1",  # Teredo
        "2001:db8::1",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",
        "3fff::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fe80::1%eth0",
        "fec0::1",
        "ff02::1",
        "4000::1",
    ],
)
def test_special_ranges_are_refused_unless_allowed_explicitly(address):
    addr = ipaddress.ip_address(address)
    assert special_range(addr) is not None
    by_name = Ruleset(allow=["example.com"])
    verdict = by_name.decide_address(addr, 443, host_matched_by_name=True)
    assert not verdict.allowed and "allow it explicitly" in verdict.reason
    unmapped = canonical_host(address.split("%")[0])
    explicit = Ruleset(allow=["example.com", f"{format_host(unmapped)}"])
    assert explicit.decide_address(addr, 443, host_matched_by_name=True).allowed


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "1.1.1.1",
        "8.8.8.8",
        "2606:4700::1111",
        "64:ff9b::5db8:d822",
        "2002:5db8:d822::1",
    ],
)
def test_public_addresses(address):
    addr = ipaddress.ip_address(address)
    assert special_range(addr) is None
    rules = Ruleset(allow=["example.com"])
    assert rules.decide_address(addr, 443, host_matched_by_name=True).allowed
    # ...but never for an IP destination without an IP rule
    assert not rules.decide_address(addr, 443, host_matched_by_name=False).allowed


def test_cidr_allow_covers_resolved_addresses_and_deny_applies():
    rules = Ruleset(allow=["*.corp.test", "10.0.0.0/8:443"], deny=["10.9.0.0/16"])
    assert rules.decide_address("10.1.2.3", 443, True).allowed
    assert rules.decide_address("10.1.2.3", 443, True).rule == "10.0.0.0/8:443"
    assert not rules.decide_address("10.1.2.3", 80, True).allowed  # port-limited
    denied = rules.decide_address("10.9.1.1", 443, True)
    assert not denied.allowed and denied.rule == "10.9.0.0/16"
    # a deny CIDR also refuses a public address a name resolved to
    public = Ruleset(allow=["example.com"], deny=["93.184.0.0/16"])
    assert not public.decide_address("93.184.216.34", 443, True).allowed
    # IPv4-mapped resolver answers are judged as IPv4
    assert rules.decide_address("::ffff:10.1.2.3", 443, True).allowed


def test_ruleset_accepts_rule_objects_and_repr():
    rules = Ruleset([parse_rule("example.com")], ["*.bad.test"])
    assert "example.com" in repr(rules) and "*.bad.test" in repr(rules)
    with pytest.raises(ValueError):
        Ruleset(["not a rule"])


def test_import_is_cheap():
    code = (
        "import sys, nanobox.net.rules, nanobox.net;"
        "print('asyncio' in sys.modules, 'h11' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
