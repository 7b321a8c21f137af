"""
A stand-in for systemd's socket activation, for the tests:

    python activate.py NAME=HOST:PORT [NAME=HOST:PORT ...] -- COMMAND...

binds and listens on each address (a UNIX path when it has no port),
moves the sockets to descriptors 3, 4, ..., sets LISTEN_PID (its own pid,
which COMMAND keeps), LISTEN_FDS and LISTEN_FDNAMES, and execs COMMAND,
as systemd does for a service started by its .socket unit.  With
$ACTIVATE_USER (a user name), it binds as itself (root: a privileged port)
and runs COMMAND as that user, as systemd does with User=.
"""

import os
import socket
import sys

separator = sys.argv.index("--")
addresses, command = sys.argv[1:separator], sys.argv[separator + 1 :]
sockets, names = [], []
for spec in addresses:
    name, address = spec.split("=", 1)
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
    sock.listen(128)
    sockets.append(sock)
    names.append(name)
# Out of the way first (a socket may already sit on 3 or 4), then in place.
high = [os.dup(sock.fileno()) for sock in sockets]
high = [os.dup2(fd, 100 + i) for i, fd in enumerate(high)]
for number, fd in enumerate(high, 3):
    os.dup2(fd, number)
    os.set_inheritable(number, True)
user = os.environ.pop("ACTIVATE_USER", None)
if user:
    import pwd

    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(sockets)), LISTEN_FDNAMES=":".join(names))
print(f"activate: passing {', '.join(addresses)} as descriptors 3..{2 + len(sockets)}", flush=True)
os.execv(command[0], command)
