"""The access policy: ordered allow/deny rules over who asks and which repository.

A rule covers a requester by name (``users``, ``*`` for any signed-in user), by group
(``auth.groups_file``), as ``anonymous``, and only inside its ``cidrs`` when it names any; it
covers a repository when one of its globs matches ``<upstream host>/<repository>`` as routed
(``docker.io/library/alpine``, whichever prefix or ``ns`` the client used). The first rule
covering both decides; when none does, the pull is allowed (end with a catch-all ``deny`` rule
for an allow-list). A denial is 403 DENIED naming the rule.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass

from moorage.config import PolicyRule

from .errors import OCIError

__all__ = ["AccessDenied", "Requester", "allows", "authorize", "matching_rule"]


class AccessDenied(OCIError):
    code, status = "DENIED", 403
    #: The policy rule (1-based) that denied the pull; None for a token's narrower grant.
    rule: int | None = None


@dataclass(frozen=True, slots=True)
class Requester:
    #: None for a request without credentials.
    user: str | None
    groups: frozenset[str]
    #: The client's address as the socket saw it (proxies in front are not trusted).
    address: str | None


def _covers_requester(rule: PolicyRule, requester: Requester) -> bool:
    if rule.cidrs:
        try:
            address = ipaddress.ip_address(requester.address or "")
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 client on a dual-stack listener
        if not any(address in network for network in rule.cidrs):
            return False
    if rule.who_is_anyone:
        return True
    if requester.user is None:
        return rule.anonymous
    return requester.user in rule.users or "*" in rule.users or bool(requester.groups & set(rule.groups))


def matching_rule(rules: tuple[PolicyRule, ...], requester: Requester, target: str) -> tuple[int, PolicyRule] | None:
    """The first rule (1-based position, rule) covering ``requester`` and ``target``."""
    for position, rule in enumerate(rules, 1):
        if _covers_requester(rule, requester) and any(fnmatch.fnmatchcase(target, g) for g in rule.repositories):
            return position, rule
    return None


def allows(rules: tuple[PolicyRule, ...], requester: Requester, upstream: str, repository: str) -> bool:
    """Whether the policy lets ``requester`` pull ``<upstream>/<repository>``."""
    found = matching_rule(rules, requester, f"{upstream}/{repository}")
    return found is None or found[1].effect == "allow"


def authorize(rules: tuple[PolicyRule, ...], requester: Requester, upstream: str, repository: str) -> None:
    """Raise AccessDenied when the policy denies this pull."""
    target = f"{upstream}/{repository}"
    found = matching_rule(rules, requester, target)
    if found is None or found[1].effect == "allow":
        return
    position, rule = found
    described = f" ({rule.description})" if rule.description else ""
    who = f"user {requester.user!r}" if requester.user is not None else "anonymous requests"
    denied = AccessDenied(f"pull of {target} by {who} is denied by access policy rule {position}{described}")
    denied.rule = position
    raise denied
