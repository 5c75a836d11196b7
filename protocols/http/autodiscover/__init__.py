# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
Autodiscover for every client, answered locally on the HTTPS front end: Outlook POX
(L{pox}), ActiveSync devices (L{mobilesync}), SOAP (L{soap}), Thunderbird (L{autoconfig}),
Apple profiles (L{mobileconfig}); the resources in L{resources}, mounted by L{provider}.  What
clients are told comes from L{casd.config.clientsettings}.
"""
