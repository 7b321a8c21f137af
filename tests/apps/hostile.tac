"""
A web application (GET / answers "worker <id> <pid>", as web.tac) whose
workers turn against the master when it tells them to: the message
{"cmd": "attack", "kind": KIND} makes the worker misuse its channel.

Kinds:
  - garbage: write an HTTP request on the channel;
  - huge-key: a box whose first key is 256 bytes long;
  - empty-box: a box with no key at all;
  - unknown: a command the master does not know;
  - bad-arguments: a QueryServer whose port is not a number;
  - stray-answer: an answer to a request the master never sent;
  - descriptor: send the master a file descriptor;
  - listens: 25 absurd listens in a row (QueryServer for kind "pigeon");
  - flood: ToMaster messages as fast as the channel takes them, for up to
    20 s.

It listens on $WEB_LISTEN (default tcp:0:interface=127.0.0.1).
"""

import os

from twisted.application import service, strports
from twisted.internet import reactor
from twisted.protocols import amp
from twisted.web import resource, server

from txcluster import currentWorker
from txcluster._commands import QueryServer

worker = currentWorker()
LINE = f"worker {worker.id if worker is not None else 0} {os.getpid()}\n".encode()


class Who(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return LINE


class Bogus(amp.Command):
    arguments = [(b"payload", amp.Unicode())]
    response = []


def box(**fields) -> bytes:
    return amp.AmpBox({k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}).serialize()


def garbage(channel):
    channel.transport.write(b"GET / HTTP/1.1\r\nHost: master\r\n\r\n")


def hugeKey(channel):
    channel.transport.write(b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00")


def emptyBox(channel):
    channel.transport.write(b"\x00\x00")


def unknown(channel):
    channel.callRemote(Bogus, payload="let me in").addErrback(lambda f: None)


def badArguments(channel):
    channel.transport.write(
        box(_command="QueryServer", _ask="bad1", kind="tcp4", address="127.0.0.1",
            port="eighty", index=0, backlog=50, mode=0o666)
    )


def strayAnswer(channel):
    channel.transport.write(box(_answer="feedface", accepted=1))


def descriptor(channel):
    fd = os.open(os.devnull, os.O_RDONLY)
    channel.transport.sendFileDescriptor(fd)
    # A descriptor travels with bytes: a harmless box (no answer asked).
    channel.transport.write(box(_command="ToMaster", message='"here, take this"'))


def listens(channel):
    for _ in range(25):
        channel.callRemote(
            QueryServer, kind="pigeon", address="coop", port=1, index=0, backlog=1, mode=0
        ).addErrback(lambda f: None)


def flood(channel):
    # Boxes that ask for no answer, written whenever the channel's buffer
    # runs low: as fast as the master reads them.
    chunk = box(_command="ToMaster", message='"flood"') * 1000
    deadline = reactor.seconds() + 20

    def more():
        transport = channel.transport
        if transport is None or reactor.seconds() > deadline:
            return
        if len(transport.dataBuffer) - transport.offset + transport._tempDataLen < 1 << 20:
            transport.write(chunk)
        reactor.callLater(0, more)

    more()


ATTACKS = {
    "garbage": garbage,
    "huge-key": hugeKey,
    "empty-box": emptyBox,
    "unknown": unknown,
    "bad-arguments": badArguments,
    "stray-answer": strayAnswer,
    "descriptor": descriptor,
    "listens": listens,
    "flood": flood,
}


def command(message):
    if isinstance(message, dict) and message.get("cmd") == "attack":
        # After the answer to the message that asked for it has gone.
        reactor.callLater(0, ATTACKS[message["kind"]], worker.channel)


site = server.Site(Who())
site.displayTracebacks = False
site.log = lambda request: None
application = service.Application("hostile")
strports.service(os.environ.get("WEB_LISTEN", "tcp:0:interface=127.0.0.1"), site).setServiceParent(application)
if worker is not None:
    worker.addMessageObserver(command)
