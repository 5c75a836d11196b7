"""
casd's twistd plugin and its built-in protocols.  Nothing else lives here: a third-party protocol
ships a module just like this one in its own C{twisted/plugins/}.
"""

from twisted.application.service import ServiceMaker

from casd.service.discovery import LazyProtocol

cas = ServiceMaker(
    "casd",
    "casd.service.tap",
    "Client Access Server: the front door of a mail system (IMAP, POP3, SMTP, HTTP proxy)",
    "cas",
)

imap = LazyProtocol("imap", "IMAP4rev1 proxy", "protocols.imap.imap")
smtp = LazyProtocol("smtp", "SMTP front end on port 25", "protocols.smtpmx.smtp")
submission = LazyProtocol("submission", "SMTP submission on 587/465", "protocols.submission.submission")
pop3 = LazyProtocol("pop3", "POP3 proxy", "protocols.pop3.pop3")
managesieve = LazyProtocol("managesieve", "ManageSieve proxy", "protocols.managesieve.managesieve")
