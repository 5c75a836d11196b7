# -*- test-case-name: tests.test_smtp -*-
"""
The DATA phase of an SMTP transaction: the client's body streamed, with flow control, to the
one backend session that answered C{354} to its own C{DATA} (never to another, never before),
and the backend's reply to the end of data passed back as the client's.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet.interfaces import IPushProducer

from protocols.smtpbackend import NotInData, SMTPBackend
from protocols.smtpgrammar import DataStream, Reply

#: Replies to a transaction whose backend went away: never a made-up 250.
BACKEND_LOST = b"451 4.4.2 Connection to the mailbox server lost, try again later"
NOT_CONFIRMED = b"451 4.4.2 The mailbox server did not confirm the message, try again later"


@implementer(IPushProducer)
class ClientPump:
    """
    The client's transport as producer of DATA for the backend's transport: a backend that
    reads slowly pauses reading from the client, so casd never holds more than the transports'
    buffers of a message.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The backend is gone: the client's data is still read, up to its end, and refused.
        self.resumeProducing()


class DataPhase:
    """
    The DATA command and the body's stream, for L{protocols.smtp.SMTPServer} (a mixin: it
    uses the server's C{transaction}, C{section}, replies and its C{_sessionBroken} and
    C{_backendLost}).  C{tx} is always the server's L{protocols.smtp.Transaction}.
    """

    def smtp_DATA(self, args: bytes) -> None:
        tx = self.transaction
        if args.strip():
            self.error(b"501 5.5.4 Syntax: DATA")
            return
        if tx is None:
            self.error(b"503 5.5.1 Error: need RCPT command")
            return
        if tx.failed is not None:
            self.transaction = None
            self.reply(tx.failed)
            return
        if not tx.recipients or tx.session is None:
            self.transaction = None
            self.reply(b"554 5.5.1 Error: no valid recipients")
            return
        session = tx.session
        d = session.data()
        d.addCallbacks(
            self._dataReply, self._dataFailed, callbackArgs=(tx, session), errbackArgs=(tx,)
        )
        self.wait(d)

    def _dataReply(self, reply: Reply, tx, session: SMTPBackend) -> None:
        if self._closing:
            return
        if reply.code != 354:
            self.transaction = None
            self.send(reply.sanitised().render())
            return
        if tx.session is not session or not session.inData:
            # Lost between its 354 and now: no other session takes this body.
            self.transaction = None
            self.reply(tx.failed or BACKEND_LOST)
            return
        self.reply(b"354 End data with <CR><LF>.<CR><LF>")
        tx.stream = DataStream(normalise=self.section.bare_line_endings == "normalise")
        tx.pump = ClientPump(self.transport)
        session.transport.registerProducer(tx.pump, True)
        self.setStreamMode(lambda data: self._dataChunk(tx, session, data))

    def _dataFailed(self, failure, tx) -> None:
        self._sessionBroken(tx, failure)
        self.transaction = None
        if not self._closing:
            self.reply(BACKEND_LOST)

    def _dataChunk(self, tx, session: SMTPBackend, data: bytes):
        """
        Stream mode during DATA: the body goes to C{session}, the one that answered C{354},
        and to no other.
        """
        self.resetTimeout(self.section.command_timeout)
        stream = tx.stream
        out, rest = stream.feed(data)
        limit = self.section.message_size_limit
        if limit and stream.size > limit:
            tx.tooBig = True
        if tx.session is session and tx.failed is None and tx.refusal is None:
            if tx.tooBig:
                tx.refusal = b"552 5.3.4 Message size exceeds fixed limit"
            elif stream.bare and not stream.normalise:
                tx.refusal = (
                    b"554 5.6.0 Message refused: bare CR or LF in its data, use CRLF line endings"
                )
            if tx.refusal is None:
                try:
                    session.write(out)
                except NotInData as e:
                    self.log.error("{reason}", reason=str(e))
                    self._backendLost(session)
            else:
                # The backend must not get this message: it never sees an end of data.
                session.drop()
                self._backendLost(session)
        if rest is None:
            return None
        self._endOfData(tx, session)
        return rest

    def _endOfData(self, tx, session: SMTPBackend) -> None:
        if not session.lost:
            session.transport.unregisterProducer()
        tx.pump.resumeProducing()
        tx.stream, tx.pump = None, None
        refusal = tx.refusal or tx.failed
        if refusal is not None or tx.session is not session:
            self.transaction = None
            self.reply(refusal or BACKEND_LOST)
            return
        # The backend's reply to the end of data is the one the client gets.
        self.resetTimeout(self.section.data_timeout + self.section.command_timeout)
        d = session.endOfData(self.section.data_timeout)
        d.addCallbacks(self._finalReply, self._finalFailed, callbackArgs=(tx,), errbackArgs=(tx,))
        self.wait(d)

    def _finalReply(self, reply: Reply, tx) -> None:
        self.transaction = None
        if reply.positive:
            self.messages += 1
            self.junk = 0
            self.messageAccepted(tx)
            self.log.info(
                "message from {sender} for {count} recipient(s) accepted by {backend}: {reply}",
                sender=tx.sender.address or "<>",
                count=len(tx.recipients),
                backend=tx.session.target.describe(),
                reply=reply.text[:200].decode("ascii", "replace"),
            )
        self.resetTimeout(self.section.command_timeout)
        if not self._closing:
            self.send(reply.sanitised().render())

    def _finalFailed(self, failure, tx) -> None:
        self._sessionBroken(tx, failure)
        self.transaction = None
        self.resetTimeout(self.section.command_timeout)
        if not self._closing:
            self.reply(NOT_CONFIRMED)
