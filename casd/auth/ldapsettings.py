# -*- test-case-name: tests.test_ldap,tests.test_config -*-
"""
The C{[ldap]} section's checks beyond its types: what the configuration validates without
building (or importing) the LDAP checker of L{casd.auth.ldap}.
"""

from __future__ import annotations

from ldaptor.protocols.ldap.distinguishedname import DistinguishedName

from casd.auth.ldapclient import LDAPURL
from casd.auth.ldapfilter import DNTemplate, FilterTemplate, TemplateError


class SettingProblem(ValueError):
    """
    An C{[ldap]} setting is unusable.

    @ivar key: the key within C{[ldap]}.
    @ivar message: what was expected.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message



def parsePolicy(items) -> tuple[tuple[str, str], ...]:
    """
    @return: the C{policy_attributes} as C{(key, attribute)} pairs.
    @raise SettingProblem: for an item that is neither C{NAME=ATTRIBUTE} nor C{ATTRIBUTE}.
    """
    pairs = []
    for item in items:
        key, sep, attribute = item.partition("=")
        if not sep:
            key, attribute = item.lower(), item
        key, attribute = key.strip(), attribute.strip()
        if not key or not attribute or " " in attribute:
            raise SettingProblem(
                "policy_attributes", f"expected NAME=ATTRIBUTE or ATTRIBUTE, got {item!r}"
            )
        pairs.append((key, attribute))
    return tuple(pairs)


def checkSettings(values) -> None:
    """
    Validate the C{[ldap]} section beyond its types (called by L{casd.config.parseConfig}).

    @param values: the section's L{casd.config.Values}.
    @raise SettingProblem: naming the key at fault.
    """
    if not values.urls:
        return
    for url in values.urls:
        try:
            LDAPURL.parse(url)
        except ValueError as e:
            raise SettingProblem("urls", str(e)) from None
    if not values.base_dn:
        raise SettingProblem("base_dn", "expected the DN under which users are searched")
    try:
        DistinguishedName(values.base_dn)
    except Exception:
        raise SettingProblem(
            "base_dn", f'expected a DN such as "ou=people,dc=example,dc=com", got {values.base_dn!r}'
        ) from None
    if values.bind_dn and not values.bind_password_file:
        raise SettingProblem("bind_password_file", "expected a file, required with bind_dn")
    for key in ("filter", "lookup_filter"):
        if getattr(values, key) or key == "filter":
            try:
                FilterTemplate(getattr(values, key))
            except TemplateError as e:
                raise SettingProblem(key, str(e)) from None
    if values.dn_template:
        try:
            DNTemplate(values.dn_template)
        except TemplateError as e:
            raise SettingProblem("dn_template", str(e)) from None
    parsePolicy(values.policy_attributes)
