# -*- test-case-name: tests.test_ldap -*-
"""
LDAP search filters and DNs built from configured templates with a user's login in them.

A template such as C{(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))} is parsed
once, at start-up (ldaptor's filter parser is slow), into a tree of L{pureldap} objects with
placeholders where the login goes.  Each login then builds a fresh tree by substituting the
placeholders inside I{assertion values}: the login can only ever be a value, never filter syntax,
so C{*}, C{)(uid=*} or a NUL in a login match literally (RFC 4515's escaping is what the text form
shows; on the wire a value is a BER octet string and needs none).

Placeholders: C{{login}} the name as typed, C{{user}} its part before the last C{@} (all of it
when there is none), C{{domain}} its part after the last C{@} (empty when there is none).
"""

from __future__ import annotations

import re

from ldaptor.ldapfilter import InvalidLDAPFilter, parseFilter
from ldaptor.protocols import pureldap

from casd.auth import ldapwire

PLACEHOLDERS = ("login", "user", "domain")

#: Longest login accepted before anything is sent to a directory (UTF-8 bytes).
MAX_LOGIN = 256

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]*)\}")
# A marker that survives ldaptor's filter parser inside a value and cannot be typed in a template
# by accident: the index selects the placeholder.
_MARK = "CASDxPLACEHOLDERx{}xEND"
_MARK_RE = re.compile(r"CASDxPLACEHOLDERx(\d+)xEND")


class TemplateError(ValueError):
    """
    A template is unusable; C{str()} says why in one line.
    """


def escapeFilterValue(value: str) -> str:
    """
    Escape a value for the text form of a filter (RFC 4515 section 3): C{*}, C{(}, C{)}, C{\\}
    and NUL always; other control characters too, so that a logged filter stays on one line.
    """
    out = []
    for ch in value:
        if ch in "*()\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def escapeDNValue(value: str) -> str:
    """
    Escape an attribute value for a DN string (RFC 4514 section 2.4).
    """
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=':
            out.append("\\" + ch)
        elif ch == "\x00" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\%02x" % ord(ch))
        elif (i == 0 and ch in " #") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def checkLogin(login: str) -> str | None:
    """
    Screen a login before any directory sees it.

    @return: C{None} when it may be looked up, else a short reason for the log (the login is
        refused as an ordinary authentication failure).
    """
    if not login:
        return "empty login"
    if len(login.encode("utf-8", "surrogatepass")) > MAX_LOGIN:
        return "overlong login"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in login):
        return "control character in login"
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in login):
        return "invalid character in login"
    return None


def loginValues(login: str) -> dict[str, str]:
    """
    @return: the value of each placeholder for C{login}.
    """
    user, at, domain = login.rpartition("@")
    if not at:
        user, domain = login, ""
    return {"login": login, "user": user, "domain": domain}


def _split(template: str, what: str) -> tuple[str, list[str]]:
    """
    Replace each C{{name}} by a marker.

    @return: the marked text and the placeholder names in marker order.
    """
    names: list[str] = []

    def mark(m):
        name = m.group(1)
        if name not in PLACEHOLDERS:
            raise TemplateError(
                f"unknown placeholder {{{name}}} in {what} (expected "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + ")"
            )
        names.append(name)
        return _MARK.format(len(names) - 1)

    marked = _PLACEHOLDER.sub(mark, template)
    if "{" in marked or "}" in marked:
        raise TemplateError(f"unbalanced brace in {what}")
    return marked, names


class _Substitution:
    """
    A string with placeholder markers in it, ready to be filled.
    """

    def __init__(self, text: str, names: list[str]) -> None:
        self.parts: list[str | tuple[str]] = []
        pos = 0
        for m in _MARK_RE.finditer(text):
            self.parts.append(text[pos : m.start()])
            self.parts.append((names[int(m.group(1))],))
            pos = m.end()
        self.parts.append(text[pos:])
        self.constant = len(self.parts) == 1

    def fill(self, values: dict[str, str]) -> str:
        return "".join(p if isinstance(p, str) else values[p[0]] for p in self.parts)


def _value(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else v


_ASSERTIONS = (
    pureldap.LDAPFilter_equalityMatch,
    pureldap.LDAPFilter_greaterOrEqual,
    pureldap.LDAPFilter_lessOrEqual,
    pureldap.LDAPFilter_approxMatch,
)


def _compile(node, names: list[str]):
    """
    Turn a parsed filter into a builder: C{callable(values) -> pureldap filter}.
    """
    if isinstance(node, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        cls = type(node)
        children = [_compile(child, names) for child in node]
        return lambda values: cls([child(values) for child in children])
    if isinstance(node, pureldap.LDAPFilter_not):
        child = _compile(node.value, names)
        return lambda values: pureldap.LDAPFilter_not(child(values))
    if isinstance(node, _ASSERTIONS):
        cls = type(node)
        attribute = _value(node.attributeDesc.value)
        _checkAttribute(attribute)
        value = _Substitution(_value(node.assertionValue.value), names)
        return lambda values: cls(
            attributeDesc=pureldap.LDAPAttributeDescription(attribute),
            assertionValue=pureldap.LDAPAssertionValue(value.fill(values)),
            escaper=escapeFilterValue,
        )
    if isinstance(node, pureldap.LDAPFilter_substrings):
        attribute = _value(node.type)
        _checkAttribute(attribute)
        parts = [(type(s), _Substitution(_value(s.value), names)) for s in node.substrings]
        return lambda values: pureldap.LDAPFilter_substrings(
            type=attribute,
            substrings=[cls(sub.fill(values), escaper=escapeFilterValue) for cls, sub in parts],
        )
    if isinstance(node, pureldap.LDAPFilter_present):
        attribute = _value(node.value)
        _checkAttribute(attribute)
        return lambda values: pureldap.LDAPFilter_present(attribute)
    if _MARK_RE.search(node.asText()):
        raise TemplateError(f"placeholders are not supported in {type(node).__name__}")
    return lambda values: node


#: The BER tags of the filter choices (RFC 4511, 4.5.1).
_TAGS = {
    pureldap.LDAPFilter_and: 0xA0,
    pureldap.LDAPFilter_or: 0xA1,
    pureldap.LDAPFilter_not: 0xA2,
    pureldap.LDAPFilter_equalityMatch: 0xA3,
    pureldap.LDAPFilter_substrings: 0xA4,
    pureldap.LDAPFilter_greaterOrEqual: 0xA5,
    pureldap.LDAPFilter_lessOrEqual: 0xA6,
    pureldap.LDAPFilter_approxMatch: 0xA8,
    pureldap.LDAPFilter_substrings_initial: 0x80,
    pureldap.LDAPFilter_substrings_any: 0x81,
    pureldap.LDAPFilter_substrings_final: 0x82,
}


def _compileWire(node, names: list[str]):
    """
    Turn a parsed filter into an encoder: C{callable(values) -> bytes}, the BER encoding of what
    L{_compile}'s builder gives (without building it).  Checked like L{_compile} (which runs first).
    """
    tlv, octets = ldapwire.tlv, ldapwire.octetString
    if isinstance(node, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        tag = _TAGS[type(node)]
        children = [_compileWire(child, names) for child in node]
        return lambda values: tlv(tag, b"".join([child(values) for child in children]))
    if isinstance(node, pureldap.LDAPFilter_not):
        child = _compileWire(node.value, names)
        return lambda values: tlv(0xA2, child(values))
    if isinstance(node, _ASSERTIONS):
        tag = _TAGS[type(node)]
        attribute = octets(_value(node.attributeDesc.value))
        value = _Substitution(_value(node.assertionValue.value), names)
        return lambda values: tlv(tag, attribute + octets(value.fill(values)))
    if isinstance(node, pureldap.LDAPFilter_substrings):
        attribute = octets(_value(node.type))
        parts = [(_TAGS[type(s)], _Substitution(_value(s.value), names)) for s in node.substrings]
        return lambda values: tlv(
            0xA4,
            attribute
            + tlv(0x30, b"".join([tlv(tag, sub.fill(values).encode("utf-8")) for tag, sub in parts])),
        )
    constant = node.toWire()
    return lambda values: constant


def _checkAttribute(attribute: str) -> None:
    if _MARK_RE.search(attribute):
        raise TemplateError("a placeholder may only stand in a value, not in an attribute name")


class FilterTemplate:
    """
    A search filter template, parsed once.

    @ivar text: the template as configured.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        marked, names = _split(text, "the filter")
        if not names:
            raise TemplateError("the filter has no {login}, {user} or {domain} placeholder")
        try:
            parsed = parseFilter(marked)
        except InvalidLDAPFilter:
            raise TemplateError(f"expected an LDAP filter (RFC 4515), got {text!r}") from None
        self._build = _compile(parsed, names)
        self._wire = _compileWire(parsed, names)

    def build(self, login: str):
        """
        @return: the L{pureldap} filter object for C{login}.
        """
        return self._build(loginValues(login))

    def wire(self, login: str) -> bytes:
        """
        @return: the BER encoding of L{build}'s filter for C{login}, encoded without building it.
        """
        return self._wire(loginValues(login))


def filterText(filter) -> str:
    """
    The RFC 4515 text of a filter object (for logs and tests).
    """
    return filter.asText()


class DNTemplate:
    """
    A DN template for direct binds, e.g. C{uid={user},ou=people,dc=example,dc=com}; values are
    escaped per RFC 4514.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        marked, names = _split(text, "the DN template")
        if not names:
            raise TemplateError("the DN template has no {login}, {user} or {domain} placeholder")
        self._sub = _Substitution(marked, names)

    def build(self, login: str) -> str:
        values = {k: escapeDNValue(v) for k, v in loginValues(login).items()}
        return self._sub.fill(values)
