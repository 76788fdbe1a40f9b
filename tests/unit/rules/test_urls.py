"""URL extraction from text and HTML, with the obfuscations spam uses.

What it tests: ``gateway.rules.urls``: scheme and ``www.`` URLs in text, trailing punctuation,
numeric IPv4 forms, percent-encoded hosts, ``user@`` prefixes, entity-encoded HTML attributes, anchor
texts, the registrable-domain approximation and domain-list matching; bounded work on hostile input.

Reads: strings built here.

Security notes: nothing is resolved or fetched.
"""

from __future__ import annotations

import time

from gateway.rules.urls import (
    MAX_URLS,
    host_in,
    html_links,
    parse_url,
    registrable_domain,
    text_host,
    text_urls,
)


def hosts(text: str) -> list[str]:
    return [u.host for u in text_urls(text)]


def test_text_urls() -> None:
    text = "See http://Example.COM/a, (www.foo.example/b). Or HTTPS://bar.example:8443/x?y=1!"
    assert hosts(text) == ["example.com", "www.foo.example", "bar.example"]
    assert text_urls("see foowww.example.com or xhttp://a.example") == []  # not at a word start
    assert hosts("ftp://files.example/pub") == ["files.example"]
    assert hosts("no urls here, just www") == []


def test_obfuscated_hosts() -> None:
    ip = parse_url("http://3232235777/login")
    assert ip.host == "192.168.1.1" and ip.is_ip
    assert parse_url("http://0xc0.0xa8.0x01.0x01/").host == "192.168.1.1"
    assert parse_url("http://0300.0250.1.1/").host == "192.168.1.1"
    assert parse_url("http://%77%77%77.example.com/").host == "www.example.com"
    trick = parse_url("http://www.bank.example@evil.example:81/")
    assert trick.host == "evil.example" and trick.has_userinfo
    assert parse_url("http:\\\\evil.example\\x").host == "evil.example"
    assert parse_url("http://Example.COM./").host == "example.com"
    assert parse_url("http://[2001:db8::1]:8080/").is_ip
    assert parse_url("mailto:a@b.example").host == ""
    assert parse_url("/relative/path").host == ""


def test_html_links_and_anchor_text() -> None:
    html = (
        '<a href="&#104;ttp://evil.example/x">http://www.bank.example/</a>'
        "<A HREF=http://plain.example/>Click <b>here</b></A>"
        "<img src='http://img.example/p.gif'><form action=\"https://post.example/\">"
        '<a name="top">no link</a>'
    )
    urls, links = html_links(html)
    assert [u.host for u in urls] == [
        "evil.example",
        "plain.example",
        "img.example",
        "post.example",
    ]
    assert [(link.url.host, link.text) for link in links] == [
        ("evil.example", "http://www.bank.example/"),
        ("plain.example", "Click here"),
    ]


def test_registrable_domain_and_lists() -> None:
    assert registrable_domain("a.b.example.com") == "example.com"
    assert registrable_domain("www.example.co.uk") == "example.co.uk"
    assert registrable_domain("10.0.0.1") == "10.0.0.1"
    assert text_host("www.bank.example/login") == "www.bank.example"
    assert text_host("click here") is None and text_host("version 1.2") is None
    listed = frozenset({"bit.ly", "evil.example"})
    assert host_in("bit.ly", listed) == "bit.ly"
    assert host_in("x.y.evil.example", listed) == "evil.example"
    assert host_in("notevil.example", listed) is None


def test_extraction_is_bounded() -> None:
    text = "http://a.example/ " * 5000
    start = time.perf_counter()
    assert len(text_urls(text)) == MAX_URLS
    html = '<a href="http://x.example/' + "a" * 100_000
    html_links(html)
    html_links("<a " * 50_000)
    assert time.perf_counter() - start < 2.0
