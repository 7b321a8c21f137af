"""
Tests for L{txcluster._access}: declared listens and the C{--allow-listen}
policy.
"""

from twisted.trial.unittest import SynchronousTestCase

from txcluster._access import (
    BadListenDescription,
    ListenPolicy,
    normalizeAddress,
    parseDeclared,
    parsePattern,
)
from txcluster._sockets import ListenKey


class DeclaredTests(SynchronousTestCase):
    def test_tcp(self):
        """
        C{tcp:PORT} declares every IPv4 interface, keyed as a worker's
        C{listenTCP(PORT)} asks for it.
        """
        d = parseDeclared("tcp:80")
        self.assertEqual(d.key, ListenKey("tcp4", "0.0.0.0", 80, 0))
        self.assertEqual(d.backlog, 50)
        self.assertEqual(d.description, "tcp:80")

    def test_interfaceAndBacklog(self):
        """
        C{interface} and C{backlog} are read; an IPv6 interface makes a
        C{tcp6} key.
        """
        self.assertEqual(parseDeclared("tcp:8080:interface=127.0.0.1").key, ListenKey("tcp4", "127.0.0.1", 8080, 0))
        self.assertEqual(parseDeclared("tcp:8080:backlog=511").backlog, 511)
        self.assertEqual(parseDeclared("tcp:8080:interface=\\:\\:1").key, ListenKey("tcp6", "::1", 8080, 0))
        self.assertEqual(parseDeclared("tcp6:443").key, ListenKey("tcp6", "::", 443, 0))

    def test_sslIsTCPToTheMaster(self):
        """
        An C{ssl:} listen is a TCP socket for the master (the worker does
        the TLS); its key and certificate options are ignored here.
        """
        d = parseDeclared("ssl:443:privateKey=key.pem:certKey=cert.pem")
        self.assertEqual(d.key, ListenKey("tcp4", "0.0.0.0", 443, 0))

    def test_unixAndUDP(self):
        """
        C{unix:PATH} (with an octal C{mode}) and C{udp:PORT} are understood.
        """
        d = parseDeclared("unix:/run/app.sock:mode=660")
        self.assertEqual(d.key, ListenKey("unix", "/run/app.sock", 0, 0))
        self.assertEqual(d.mode, 0o660)
        self.assertEqual(parseDeclared("udp:53").key, ListenKey("udp4", "0.0.0.0", 53, 0))

    def test_badDescriptions(self):
        """
        Nonsense is refused with a message that quotes it and says why.
        """
        for text, why in [
            ("tcp", "a port is required"),
            ("tcp:http", "tcp:http"),
            ("tcp:0", "out of range"),
            ("tcp:70000", "out of range"),
            ("unix", "needs a path"),
            ("quic:443", "unknown kind 'quic'"),
            ("unix:/x:mode=999", "/x"),
        ]:
            with self.assertRaises(BadListenDescription) as e:
                parseDeclared(text)
            self.assertIn(why, str(e.exception))


class PatternTests(SynchronousTestCase):
    def test_ports(self):
        """
        A rule matches one port, a range, or any port of its family.
        """
        key = lambda port, kind="tcp4": ListenKey(kind, "0.0.0.0", port, 0)
        self.assertTrue(parsePattern("tcp:8080").matches(key(8080)))
        self.assertFalse(parsePattern("tcp:8080").matches(key(8081)))
        self.assertTrue(parsePattern("tcp:8000-8099").matches(key(8099)))
        self.assertFalse(parsePattern("tcp:8000-8099").matches(key(8100)))
        self.assertTrue(parsePattern("tcp:*").matches(key(1)))
        self.assertTrue(parsePattern("tcp:*").matches(ListenKey("tcp6", "::", 1, 0)))
        self.assertFalse(parsePattern("tcp:*").matches(key(53, "udp4")))
        self.assertTrue(parsePattern("udp:53").matches(key(53, "udp4")))
        self.assertTrue(parsePattern("tcp:0").matches(key(0)))
        self.assertFalse(parsePattern("tcp:0").matches(key(80)))

    def test_interface(self):
        """
        An C{interface} narrows a rule to one address ("all interfaces"
        spelled either way).
        """
        rule = parsePattern("tcp:*:interface=127.0.0.1")
        self.assertTrue(rule.matches(ListenKey("tcp4", "127.0.0.1", 9, 0)))
        self.assertFalse(rule.matches(ListenKey("tcp4", "0.0.0.0", 9, 0)))
        self.assertTrue(parsePattern("tcp:9:interface=").matches(ListenKey("tcp4", "0.0.0.0", 9, 0)))

    def test_unixGlob(self):
        """
        A C{unix:} rule is a glob over the absolute path.
        """
        rule = parsePattern("unix:/run/app/*")
        self.assertTrue(rule.matches(ListenKey("unix", "/run/app/web.sock", 0, 0)))
        self.assertFalse(rule.matches(ListenKey("unix", "/tmp/web.sock", 0, 0)))
        self.assertFalse(rule.matches(ListenKey("tcp4", "0.0.0.0", 80, 0)))

    def test_star(self):
        """
        C{*} matches anything.
        """
        for key in [ListenKey("tcp4", "0.0.0.0", 1, 0), ListenKey("unix", "/x", 0, 0), ListenKey("udp6", "::", 5, 0)]:
            self.assertTrue(parsePattern("*").matches(key))

    def test_badRules(self):
        """
        Malformed rules are refused, naming the rule.
        """
        for text in ["tcp", "tcp:http", "tcp:9-1", "tcp:1-70000", "sctp:1", "unix", "tcp:1-x"]:
            with self.assertRaises(BadListenDescription) as e:
                parsePattern(text)
            self.assertIn(repr(text), str(e.exception))


class PolicyTests(SynchronousTestCase):
    declared = ListenKey("tcp4", "0.0.0.0", 80, 0)
    other = ListenKey("tcp4", "0.0.0.0", 8080, 0)

    def test_openByDefault(self):
        """
        With no rules and an unprivileged master, anything goes.
        """
        self.assertTrue(ListenPolicy().permits(self.other))

    def test_declaredOnly(self):
        """
        A privileged master with unprivileged workers allows only declared
        listens, and says why it refuses.
        """
        policy = ListenPolicy(declared=[self.declared], declaredOnly=True)
        self.assertTrue(policy.permits(self.declared))
        self.assertFalse(policy.permits(self.other))
        self.assertIn("--listen", policy.explain())

    def test_rulesWin(self):
        """
        Rules decide (declared listens are always allowed); with rules,
        declared-only no longer applies.
        """
        policy = ListenPolicy([parsePattern("tcp:8000-8099")], [self.declared], declaredOnly=True)
        self.assertTrue(policy.permits(self.declared))
        self.assertTrue(policy.permits(self.other))
        self.assertFalse(policy.permits(ListenKey("tcp4", "0.0.0.0", 9000, 0)))
        self.assertIn("--allow-listen", policy.explain())

    def test_normalizeAddress(self):
        """
        "All interfaces" has one spelling per family; other addresses are
        kept.
        """
        self.assertEqual(normalizeAddress("tcp4", ""), "0.0.0.0")
        self.assertEqual(normalizeAddress("udp4", "0.0.0.0"), "0.0.0.0")
        self.assertEqual(normalizeAddress("tcp6", ""), "::")
        self.assertEqual(normalizeAddress("tcp4", "127.0.0.1"), "127.0.0.1")
        self.assertEqual(normalizeAddress("unix", ""), "")
