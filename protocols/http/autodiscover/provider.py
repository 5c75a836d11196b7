# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
Autodiscover mounted on the HTTP front end as local services (L{protocols.http.local}): answered
by casd itself, before any vdir, never proxied.

The site authenticates the POX, SOAP and profile requests (Basic through the shared portal,
penalty and credential cache) and sets C{request.user}; Thunderbird's autoconfig is anonymous and
served on plain-HTTP listeners too.  Bodies over L{LOCAL_BODY_LIMIT} are refused by the site
(413); between L{protocols.http.autodiscover.common.MAX_BODY} and that, each endpoint answers
with its own protocol error.
"""

from __future__ import annotations

from twisted.internet import defer

from casd.config.clientsettings import ClientSettings
from protocols.http.autodiscover.resources import (
    AutodiscoverService,
    AutoconfigResource,
    MobileconfigResource,
    PoxResource,
    SoapResource,
    Unauthenticated,
)

LOCAL_BODY_LIMIT = 1024 * 1024

_services: dict = {}


def siteUser(request):
    """
    The user the HTTP site authenticated for a local service with C{needsAuth}.
    """
    user = getattr(request, "user", None)
    if user is None:
        return defer.fail(Unauthenticated())
    return defer.succeed(user)


def serviceFor(context) -> AutodiscoverService:
    """
    One L{AutodiscoverService} per context, shared by every HTTPS listener.
    """
    entry = _services.get(id(context))
    if entry is not None and entry[0] is context:
        return entry[1]
    config = context.config
    signer = None
    if config.tls.enabled and config.autodiscover.sign_mobileconfig:
        from protocols.http.autodiscover.mobileconfig import ProfileSigner

        signer = ProfileSigner(config.tls.certificate, config.tls.key)
    service = AutodiscoverService(ClientSettings(config), siteUser, signer, config.hostname)
    _services.clear()
    _services[id(context)] = (context, service)
    return service


def autodiscoverServices(context, section, site):
    """
    The local-service provider (named in L{protocols.http.local.PROVIDERS}).
    """
    from protocols.http.local import LocalService

    if not context.config.autodiscover.enabled:
        return
    service = serviceFor(context)
    yield LocalService(
        ("/autodiscover/autodiscover.xml",),
        PoxResource(service),
        needsAuth=True,
        maxBodySize=LOCAL_BODY_LIMIT,
        name="autodiscover",
    )
    yield LocalService(
        ("/autodiscover/autodiscover.svc",),
        SoapResource(service),
        needsAuth=True,
        maxBodySize=LOCAL_BODY_LIMIT,
        name="autodiscover-soap",
    )
    yield LocalService(
        ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"),
        AutoconfigResource(service),
        anonymousOnPlain=True,
        maxBodySize=LOCAL_BODY_LIMIT,
        name="autoconfig",
    )
    yield LocalService(
        ("/mobileconfig",),
        MobileconfigResource(service),
        needsAuth=True,
        maxBodySize=LOCAL_BODY_LIMIT,
        name="mobileconfig",
    )
