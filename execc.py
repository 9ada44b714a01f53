#!/usr/bin/env python3
"""execc: run a command through an execd daemon, the way `lxc exec` does.

execc connects to execd (a unix socket by default, or TCP with a token) and
has it run COMMAND.  Then it behaves as if COMMAND ran here: stdin goes in with
its end of file, stdout and stderr come back byte-exact and separate (or, in
pty mode, as one terminal), signals sent to execc reach the command, and
execc exits with the command's status.  It needs only the Python standard
library, 3.6 or newer, and runs when copied alone onto a host.

Usage:
    execc.py [OPTIONS] [DESTINATION] -- COMMAND [ARG...]
    execc.py [OPTIONS] [DESTINATION]          (a login shell in a pty)

DESTINATION is `unix:PATH`, a path containing `/`, `HOST:PORT` or
`[V6ADDR]:PORT`; the default is execd's default socket ($EXECD_SOCKET, else
$XDG_RUNTIME_DIR/execd/execd.sock, else /tmp/execd-UID/execd.sock).

Protocol (version 1): a summary; execd.py's docstring and README.md have the
full table.  Each frame is a 4-byte big-endian payload length, a 1-byte type,
then the payload (JSON object for control frames, raw bytes for data):

    0x01 HELLO  0x02 AUTH  0x03 AUTH_OK  0x04 REQUEST  0x05 STARTED
    0x10 STDIN  0x11 STDIN_EOF  0x12 SIGNAL  0x13 WINSIZE  0x14 OUTPUT_CLOSED
    0x20 STDOUT  0x21 STDERR  0x22 STDIN_WINDOW  0x23 EXIT  0x7f ERROR

The frame code below is a copy of execd.py's, kept in step by hand, because
each script must run alone.

Exit status: the command's own code; 128+n when signal n killed it; 127 when
the command was not found, 126 when it could not be executed, 125 when the
daemon could not set it up (cwd, user); 255 for execc's own failures.

Limitations:
  - SIGKILL and SIGSTOP to execc cannot be forwarded or handled: SIGKILL
    leaves the terminal in raw mode in pty mode (run `stty sane`), and the
    daemon hangs the session up when the connection drops.
"""

import errno
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time

VERSION = "1.0.0"
PROTOCOL_VERSION = 1

HEADER = struct.Struct("!IB")  # payload length, frame type
WINDOW = struct.Struct("!I")   # STDIN_WINDOW payload: bytes granted

HELLO = 0x01
AUTH = 0x02
AUTH_OK = 0x03
REQUEST = 0x04
STARTED = 0x05
STDIN = 0x10
STDIN_EOF = 0x11
SIGNAL = 0x12
WINSIZE = 0x13
OUTPUT_CLOSED = 0x14
STDOUT = 0x20
STDERR = 0x21
STDIN_WINDOW = 0x22
EXIT = 0x23
ERROR = 0x7F

MAX_FRAME = 1 << 20   # the daemon sends data frames of at most 1 MiB
NONCE_BYTES = 32
CLIENT_MAC_LABEL = b"execc client\0"
DAEMON_MAC_LABEL = b"execd daemon\0"

STDIN_FILENO = 0
STDOUT_FILENO = 1
STDERR_FILENO = 2

READ_SIZE = 256 * 1024
# Stdin is read in smaller blocks: a read buffer above glibc's 128 KiB mmap
# threshold that a pipe fills only partly is mmapped, shrunk with mremap and
# unmapped again on every read.
STDIN_READ_SIZE = 64 * 1024
HANDSHAKE_TIMEOUT = 30.0  # seconds for connect, authentication and request

EXIT_CLIENT_FAILURE = 255  # execc's own failures, as ssh uses

# Signals execc forwards to the command.  WINCH becomes a WINSIZE frame.
FORWARDED_SIGNALS = ("TERM", "HUP", "INT", "QUIT", "USR1", "USR2")
# The third SIGINT or SIGTERM within this many seconds disconnects, so a
# command that ignores them cannot hold the user; the daemon then hangs up.
ESCALATION_COUNT = 3
ESCALATION_WINDOW = 5.0

DEFAULT_ROWS, DEFAULT_COLS = 24, 80

# Linux splice(2), in Python 3.10 and newer: a large output frame's payload
# moves from the socket into a stdout or stderr pipe inside the kernel, never
# copied through this process.  Smaller frames, files, terminals, TLS and
# older Pythons use recv() and write().
SPLICE = getattr(os, "splice", None)
SPLICE_MIN = 16 * 1024


class ClientError(Exception):
    """A failure of execc itself: printed as one line, exit status 255."""


class ConnectionLost(ClientError):
    """The connection to the daemon failed or closed before the session ended."""


class ProtocolViolation(ClientError):
    """The daemon broke the protocol: execc replies with a fatal ERROR frame."""


# --- Frames (a copy of execd.py's) -------------------------------------------

class FrameReader:
    """Split a byte stream into (type, payload) frames, enforcing max_payload."""

    def __init__(self, max_payload):
        self.buffer = bytearray()
        self.position = 0
        self.max_payload = max_payload

    def feed(self, data):
        if self.position > len(self.buffer) // 2:
            del self.buffer[:self.position]
            self.position = 0
        self.buffer += data

    def at_frame_boundary(self):
        return self.position == len(self.buffer)

    def next_frame(self):
        """Return the next complete (type, payload), or None if none is whole."""
        available = len(self.buffer) - self.position
        if available < HEADER.size:
            return None
        length, frame_type = HEADER.unpack_from(self.buffer, self.position)
        if length > self.max_payload:
            raise ProtocolViolation("the daemon sent a frame of %d bytes, above the maximum "
                              "of %d: is this an execd daemon?" % (length, self.max_payload))
        if available < HEADER.size + length:
            return None
        start = self.position + HEADER.size
        with memoryview(self.buffer) as view:
            payload = bytes(view[start:start + length])  # one copy, not two
        self.position = start + length
        return frame_type, payload


def encode_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode_json(payload):
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolViolation("the daemon sent an invalid control frame")
    if not isinstance(obj, dict):
        raise ProtocolViolation("the daemon sent an invalid control frame")
    return obj


def signal_number(name):
    """Return the local number for a signal name such as "TERM", or None."""
    value = getattr(signal, "SIG" + name, None) if str(name).isalnum() else None
    return int(value) if isinstance(value, int) else None


# --- Addresses (a copy of execd.py's) -----------------------------------------

def default_socket_path():
    if os.environ.get("EXECD_SOCKET"):
        return os.environ["EXECD_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "execd", "execd.sock")
    return "/tmp/execd-%d/execd.sock" % os.getuid()


def parse_address(text):
    """Parse an address: ("unix", path) or ("tcp", host, port)."""
    if text.startswith("unix:"):
        if len(text) == 5:
            raise ValueError("invalid destination %r: unix: needs a path" % text)
        return ("unix", text[5:])
    if "/" in text:
        return ("unix", text)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError("invalid destination %r: expected [V6ADDR]:PORT" % text)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(
                "invalid destination %r: expected unix:PATH, a path containing '/', "
                "HOST:PORT or [V6ADDR]:PORT; a command goes after --, as in: "
                "execc.py -- %s" % (text, text))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("invalid port in destination %r: expected 1-65535" % text)
    return ("tcp", host, int(port))


def format_address(address):
    if address[0] == "unix":
        return "unix:" + address[1]
    host = address[1]
    return "[%s]:%d" % (host, address[2]) if ":" in host else "%s:%d" % (host, address[2])


# --- Command line ------------------------------------------------------------

USAGE = "usage: execc.py [OPTIONS] [DESTINATION] [-- COMMAND [ARG...]]\n"

HELP = USAGE + """
Run COMMAND through an execd daemon and exit with its status.  Without a
command, start a login shell in a pty.

DESTINATION: unix:PATH, a path containing '/', HOST:PORT or [V6ADDR]:PORT
  (default: %(default)s)

options:
  -t                     force a pty, even when stdin is not a terminal
  -T                     never a pty: pipes, with stdout and stderr kept apart
  --env KEY=VALUE        set a variable for the command, repeatable; KEY alone
                         passes this side's value
  --cwd DIR              working directory (default: the user's home)
  --user NAME            run as this user (root daemon; root or token clients)
  --group NAME           run with this group
  --token-file FILE      shared secret for a TCP daemon (mode 600)
  --tls                  use TLS to a TCP daemon
  --tls-ca FILE          with --tls: CA certificates that verify the daemon
  --tls-fingerprint SHA256
                         with --tls: accept only a daemon certificate with
                         this SHA-256 fingerprint (hex)
  -e CHAR                escape character in pty mode (default: ~); ^X for a
                         control character; 'none' disables escapes
  -q, --quiet            do not report output discarded at the end
  -v, --verbose          also report background processes holding output open
  -h, --help             show this help and exit
  --version              show the version and exit

Pty mode is used when -t is given, or when no -T is given and both stdin and
stdout are terminals (or there is no command).  In pty mode, ~. at the start
of a line disconnects and ~? lists the escapes.

Exit status: the command's own; 128+n if signal n killed it; 127 not found;
126 not executable; 125 setup failed; 255 execc itself failed.
"""

# Options that take a value, and the attribute each one sets.  The parser is
# written out rather than built with argparse, whose import and set-up cost
# several milliseconds, because start-up is part of every command's latency.
VALUE_OPTIONS = {"--env": "env", "--cwd": "cwd", "--user": "user", "--group": "group",
                 "--token-file": "token_file", "--tls-ca": "tls_ca",
                 "--tls-fingerprint": "tls_fingerprint", "-e": "escape"}
FLAG_OPTIONS = {"-t": "tty", "-T": "tty", "--tls": "tls", "-q": "quiet", "--quiet": "quiet",
                "-v": "verbose", "--verbose": "verbose", "-h": "help", "--help": "help",
                "--version": "version"}


class Options:
    """The parsed command line, with every option at its default."""

    def __init__(self):
        self.destination = None
        self.command = []
        self.tty = None
        self.env = []
        self.cwd = self.user = self.group = self.token_file = None
        self.tls = False
        self.tls_ca = self.tls_fingerprint = None
        self.escape = "~"
        self.quiet = self.verbose = False


def usage_error(message):
    """Print one error line and exit 255, like every other failure of execc itself."""
    sys.stderr.write("execc.py: error: %s (see execc.py --help)\n" % message)
    sys.exit(EXIT_CLIENT_FAILURE)


def parse_args(argv):
    """Parse the options before "--"; everything after it is the command."""
    if "--" in argv:
        split = argv.index("--")
        words, command = argv[:split], argv[split + 1:]
    else:
        words, command = argv, []
    args = Options()
    args.command = command
    words = list(words)
    while words:
        word = words.pop(0)
        if word.startswith("--"):
            name, has_value, value = word.partition("=")
            set_option(args, name, value if has_value else None, words)
        elif word.startswith("-") and len(word) > 1:
            parse_short_options(args, word, words)
        elif args.destination is None:
            args.destination = word
        else:
            usage_error("unexpected argument %r: the command goes after --, as in: "
                        "execc.py %s -- %s" % (word, args.destination, word))
    check_args(args)
    return args


def parse_short_options(args, word, words):
    """Parse a group of short options such as -tv, -e~ or -e ~."""
    for index, letter in enumerate(word[1:], start=2):
        if letter == "e":
            set_option(args, "-e", word[index:] or None, words)
            return
        set_option(args, "-" + letter, None, words)


def set_option(args, name, value, words):
    """Apply one option; take its value from words when it has none attached."""
    if name in VALUE_OPTIONS:
        if value is None:
            if not words:
                usage_error("option %s needs a value" % name)
            value = words.pop(0)
        if name == "--env":
            args.env.append(value)
        else:
            setattr(args, VALUE_OPTIONS[name], value)
    elif name in FLAG_OPTIONS and value is None:
        apply_flag(args, name)
    else:
        usage_error("unrecognized option %r; see execc.py --help" % name)


def apply_flag(args, name):
    if name == "-h" or name == "--help":
        sys.stdout.write(HELP % {"default": default_socket_path()})
        sys.exit(0)
    if name == "--version":
        sys.stdout.write("execc %s (protocol %d)\n" % (VERSION, PROTOCOL_VERSION))
        sys.exit(0)
    if name in ("-t", "-T"):
        wanted = name == "-t"
        if args.tty is not None and args.tty != wanted:
            usage_error("-t and -T exclude each other: give one")
        args.tty = wanted
        return
    setattr(args, FLAG_OPTIONS[name], True)


def check_args(args):
    """Validate option values; usage_error() prints one line and exits 255."""
    try:
        args.address = parse_address(args.destination or default_socket_path())
    except ValueError as e:
        usage_error(str(e))
    if args.command and not args.command[0]:
        usage_error("the command after -- is an empty string")
    args.environment = parse_env(args.env)
    args.escape_byte = parse_escape(args.escape)
    check_tls(args)
    if args.tty is None:
        args.tty = not args.command or (os.isatty(STDIN_FILENO) and os.isatty(STDOUT_FILENO))
    elif not args.tty and not args.command:
        usage_error("a login shell needs a pty: drop -T, or give a command after --")


def parse_env(entries):
    """Turn --env KEY=VALUE and --env KEY entries into a dict."""
    environment = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not key or "\0" in entry:
            usage_error("invalid --env %r: expected KEY=VALUE with a non-empty KEY" % entry)
        if not sep:
            if key not in os.environ:
                usage_error("invalid --env %r: %s is not set here; use --env %s=VALUE"
                            % (entry, key, key))
            value = os.environ[key]
        environment[key] = value
    return environment


def parse_escape(text):
    """Return the escape character's byte value, or None for "none"."""
    if text == "none":
        return None
    if len(text) == 1 and ord(text) < 128:
        return ord(text)
    if len(text) == 2 and text[0] == "^" and "@" <= text[1].upper() <= "_":
        return ord(text[1].upper()) - 64
    usage_error("invalid -e %r: expected one ASCII character, ^X, or 'none'" % text)


def check_tls(args):
    """Check that the TLS options form one way to verify a TCP daemon."""
    if (args.tls_ca or args.tls_fingerprint) and not args.tls:
        usage_error("--tls-ca and --tls-fingerprint need --tls")
    if not args.tls:
        return
    if args.tls_ca and args.tls_fingerprint:
        usage_error("give --tls-ca or --tls-fingerprint, not both")
    if not (args.tls_ca or args.tls_fingerprint):
        usage_error("--tls needs --tls-ca FILE or --tls-fingerprint SHA256 to verify the daemon")
    if args.address[0] != "tcp":
        usage_error("--tls is for TCP destinations; %s is a unix socket"
                    % format_address(args.address))
    if args.tls_fingerprint is not None:
        digits = args.tls_fingerprint.replace(":", "").lower()
        if len(digits) != 64 or any(d not in "0123456789abcdef" for d in digits):
            usage_error("invalid --tls-fingerprint %r: expected 64 hex digits (SHA-256), "
                        "for example from: openssl x509 -in CERT -noout -fingerprint "
                        "-sha256" % args.tls_fingerprint)


# --- Connecting and the handshake ---------------------------------------------

def connect(args):
    """Open a socket to the daemon; raise ClientError with the likely fix."""
    address = args.address
    where = format_address(address)
    if address[0] == "unix":
        check_default_socket(args)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address[1])
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ClientError("cannot connect to %s: no daemon is listening there "
                              "(start one with: python3 execd.py)" % where)
        except PermissionError:
            sock.close()
            raise ClientError("cannot connect to %s: permission denied on the socket; "
                              "run as the daemon's user or ask for its --socket-group" % where)
        except OSError as e:
            sock.close()
            raise ClientError("cannot connect to %s: %s" % (where, e.strerror))
        return sock
    try:
        sock = socket.create_connection(address[1:], timeout=HANDSHAKE_TIMEOUT)
    except socket.timeout:
        raise ClientError("cannot connect to %s: timed out" % where)
    except ConnectionRefusedError:
        raise ClientError("cannot connect to %s: connection refused (is execd "
                          "running with --listen %s?)" % (where, where))
    except socket.gaierror as e:
        raise ClientError("cannot resolve %s: %s" % (where, e.strerror))
    except OSError as e:
        raise ClientError("cannot connect to %s: %s" % (where, e.strerror))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if args.tls:
        sock = wrap_tls(sock, args)
    return sock


def check_default_socket(args):
    """Refuse a default socket that another user could have planted."""
    if args.destination is not None:
        return
    path = args.address[1]
    try:
        st = os.lstat(path)
    except OSError:
        return  # connect() reports the missing socket
    if st.st_uid not in (os.getuid(), 0):
        raise ClientError("%s is owned by uid %d, not by you: refusing to send it "
                          "anything (remove it and restart execd)" % (path, st.st_uid))


def wrap_tls(sock, args):
    import ssl  # only with --tls: a host without the ssl module runs everything else
    import hashlib
    if args.tls_ca:
        try:
            context = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise ClientError("cannot load --tls-ca %s: %s" % (args.tls_ca, e.strerror or e))
    else:
        # Pinning: the certificate is checked against --tls-fingerprint below
        # instead of against a CA, as ssh checks known_hosts.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    where = format_address(args.address)
    verify_error = getattr(ssl, "SSLCertVerificationError", ())  # Python 3.7+
    try:
        sock = context.wrap_socket(sock, server_hostname=args.address[1])
    except verify_error as e:
        raise ClientError("TLS with %s failed: the daemon's certificate did not verify "
                          "against --tls-ca %s: %s" % (where, args.tls_ca, e.verify_message))
    except (ssl.SSLError, ssl.CertificateError, OSError) as e:
        raise ClientError("TLS with %s failed: %s (is the daemon started with "
                          "--tls-cert and --tls-key?)" % (where, e))
    if args.tls_fingerprint:
        expected = args.tls_fingerprint.replace(":", "").lower()
        actual = hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()
        if actual != expected:
            raise ClientError("TLS certificate of %s has SHA-256 fingerprint %s, not the "
                              "expected %s: refusing to continue" % (where, actual, expected))
    return sock


class Channel:
    """The connection to the daemon: blocking sends, frame-at-a-time reads.

    Sends may block: the daemon never stops reading a client, so they finish.
    """

    def __init__(self, sock, where):
        self.sock = sock
        self.where = where
        self.reader = FrameReader(MAX_FRAME)
        self.recv_buffer = bytearray(READ_SIZE)  # reused by receive()

    def send(self, frame_type, payload=b"", payload_length=None):
        """Send a frame; with payload_length, only its header (the payload follows)."""
        if payload_length is None:
            payload_length = len(payload)
        try:
            self.sock.sendall(HEADER.pack(payload_length, frame_type) + payload)
        except OSError as e:
            # EPIPE/ECONNRESET: the daemon may have rejected us (SO_PEERCRED,
            # limits) with a fatal ERROR and closed before reading this frame.
            # Its reason is still in our receive buffer, and is more useful.
            message = self.pending_error()
            if message is not None:
                raise ClientError("%s: %s" % (self.where, message))
            raise ConnectionLost("connection to %s lost: %s" % (self.where, e.strerror or e))

    def pending_error(self):
        """Return the message of an ERROR frame already received, or None."""
        try:
            self.sock.settimeout(0)  # only what has arrived: the daemon has gone
            data = self.sock.recv(READ_SIZE)
            while data:
                self.reader.feed(data)
                data = self.sock.recv(READ_SIZE)
        except OSError:
            pass  # EAGAIN or ECONNRESET: nothing more to read
        while True:
            frame = self.reader.next_frame()
            if frame is None:
                return None
            if frame[0] == ERROR:
                return decode_json(frame[1]).get("message")

    def send_json(self, frame_type, obj):
        self.send(frame_type, encode_json(obj))

    def send_error(self, message):
        """Tell the daemon why execc is closing; best effort, it may be gone."""
        try:
            self.send_json(ERROR, {"message": message, "fatal": True})
        except ClientError:
            pass  # the connection is already broken, and the close is the message

    def receive(self):
        """Read what the socket has; return False at end of file."""
        try:
            # Into a reused buffer: recv(READ_SIZE) allocates READ_SIZE bytes,
            # above glibc's 128 KiB mmap threshold, so a short read would
            # mmap, mremap and munmap on every call.
            count = self.sock.recv_into(self.recv_buffer)
            data = memoryview(self.recv_buffer)[:count]
            while count and getattr(self.sock, "pending", lambda: 0)():
                data = bytes(data) + self.sock.recv(READ_SIZE)  # TLS: bytes the selector cannot see
        except socket.timeout:
            raise ClientError("%s did not respond within %g s" % (self.where, HANDSHAKE_TIMEOUT))
        except OSError as e:
            raise ConnectionLost("connection to %s lost: %s" % (self.where, e.strerror or e))
        self.reader.feed(data)
        return bool(data)

    def expect(self, wanted):
        """Block until the next frame; return its JSON, which must be of type wanted."""
        while True:
            frame = self.reader.next_frame()
            if frame is not None:
                break
            if not self.receive():
                raise ConnectionLost("%s closed the connection during the handshake"
                                     % self.where)
        frame_type, payload = frame
        if frame_type == ERROR:
            raise ClientError("%s: %s" % (self.where, decode_json(payload).get("message")))
        if frame_type != wanted:
            raise ProtocolViolation("%s sent frame type 0x%02x during the handshake: is "
                                    "this an execd daemon?" % (self.where, frame_type))
        return decode_json(payload)


def handshake(channel, args):
    """HELLO, authentication if asked, then REQUEST; return the daemon's HELLO."""
    channel.sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        channel.send_json(HELLO, {"protocol": PROTOCOL_VERSION, "program": "execc " + VERSION})
        hello = channel.expect(HELLO)
    except ConnectionLost as e:
        if args.address[0] == "tcp" and not args.tls:
            raise ConnectionLost("%s (if the daemon serves TLS, add --tls)" % e)
        raise
    if hello.get("protocol") != PROTOCOL_VERSION:
        raise ClientError("protocol version mismatch: %s (%s) speaks version %r and this "
                          "execc %s speaks version %d; use execc.py and execd.py from the "
                          "same release" % (channel.where, hello.get("program"),
                                            hello.get("protocol"), VERSION, PROTOCOL_VERSION))
    if hello.get("auth") == "token":
        authenticate(channel, args, hello)
    elif hello.get("auth") != "none":
        raise ClientError("%s asks for authentication %r, which this execc does not "
                          "support" % (channel.where, hello.get("auth")))
    channel.send_json(REQUEST, build_request(args))
    channel.sock.settimeout(None)
    return hello


def authenticate(channel, args, hello):
    """Prove the token with HMAC-SHA256 and check the daemon's proof."""
    import hashlib
    import hmac
    if not args.token_file:
        raise ClientError("%s requires a token: pass --token-file FILE" % channel.where)
    token = read_token_file(args.token_file)
    try:
        daemon_nonce = bytes.fromhex(hello.get("nonce", ""))
    except (TypeError, ValueError):
        raise ClientError("%s sent an invalid nonce" % channel.where)
    client_nonce = os.urandom(NONCE_BYTES)
    mac = hmac.new(token, CLIENT_MAC_LABEL + daemon_nonce + client_nonce, hashlib.sha256)
    channel.send_json(AUTH, {"nonce": client_nonce.hex(), "mac": mac.hexdigest()})
    reply = channel.expect(AUTH_OK)
    proof = hmac.new(token, DAEMON_MAC_LABEL + daemon_nonce + client_nonce,
                     hashlib.sha256).hexdigest()
    if not hmac.compare_digest(proof, str(reply.get("mac", ""))):
        raise ClientError("%s did not prove it knows the token: it may be an impostor"
                          % channel.where)


def read_token_file(path):
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise ClientError("cannot read token file %s: %s" % (path, e.strerror))
    if st.st_mode & 0o077:
        raise ClientError("token file %s is accessible by group or others (mode %o); "
                          "run: chmod 600 %s" % (path, st.st_mode & 0o777, path))
    return token


def build_request(args):
    rows, cols = window_size()
    return {"argv": args.command, "env": args.environment, "cwd": args.cwd,
            "tty": args.tty, "rows": rows, "cols": cols,
            "term": os.environ.get("TERM") if args.tty else None,
            "user": args.user, "group": args.group}


def window_size():
    """Return (rows, cols) of the local terminal, or the defaults."""
    import fcntl
    import termios
    for fd in (STDOUT_FILENO, STDIN_FILENO, STDERR_FILENO):
        try:
            packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
        except OSError:
            continue  # ENOTTY: not a terminal
        rows, cols = struct.unpack("HHHH", packed)[:2]
        if rows and cols:
            return rows, cols
    return DEFAULT_ROWS, DEFAULT_COLS


# --- The session loop -----------------------------------------------------------

def write_all(fd, data):
    """Write all of data to a blocking (or, if another process set it, non-blocking) fd."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            # Someone else put O_NONBLOCK on this shared file description;
            # wait for room instead of spinning.  Rare, so a plain select.
            import select
            select.select([], [fd], [])


def exit_status_from(info):
    """Turn an EXIT frame into this process's exit status (the sh convention).

    A command killed by signal n gives 128+n, as sh and bash report it.
    The name is mapped to this system's number, because numbers differ
    between systems, and the daemon's number is the fallback for unknown names.
    """
    if info.get("signal"):
        number = signal_number(info["signal"]) or info.get("signal_number")
        return 128 + number if isinstance(number, int) else EXIT_CLIENT_FAILURE
    code = info.get("code")
    if isinstance(code, int) and 0 <= code <= 255:
        return code
    return EXIT_CLIENT_FAILURE


def is_pipe(fd):
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False  # EBADF: a closed fd is no pipe


def enlarge_pipe(fd):
    """Raise a pipe's capacity to 1 MiB where Linux allows it: fewer, larger moves."""
    import fcntl
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass  # EPERM above /proc/sys/fs/pipe-max-size, or EBUSY: keep its size


class EscapeFilter:
    """ssh-style escapes typed at the start of a line: ~. ~? ~~."""

    HELP = ("Supported escape sequences:\r\n"
            "  %(e)s.  disconnect (the daemon then hangs up the session)\r\n"
            "  %(e)s?  this message\r\n"
            "  %(e)s%(e)s  send the escape character itself\r\n"
            "(Escapes are recognized only after a newline.)\r\n")

    def __init__(self, escape_byte):
        self.escape_byte = escape_byte
        self.at_line_start = True
        self.pending = False

    def feed(self, data):
        """Return (bytes to send, action), action being None, "help" or "disconnect"."""
        out = bytearray()
        action = None
        for byte in bytearray(data):
            if self.pending:
                self.pending = False
                if byte == ord("."):
                    return bytes(out), "disconnect"
                if byte == ord("?"):
                    action = "help"
                    continue
                if byte != self.escape_byte:
                    out.append(self.escape_byte)  # not an escape: send both
            elif self.at_line_start and byte == self.escape_byte:
                self.pending = True
                continue
            out.append(byte)
            self.at_line_start = byte in (ord("\r"), ord("\n"))
        return bytes(out), action

    def help_text(self):
        name = chr(self.escape_byte) if self.escape_byte >= 32 else "^" + chr(self.escape_byte + 64)
        return self.HELP % {"e": name}


class ClientSession:
    """The running session: one selector over the socket, stdin and signals."""

    def __init__(self, channel, args, hello, notices):
        self.channel = channel
        self.args = args
        self.notices = notices
        # poll(), not epoll: epoll_ctl() rejects regular files with EPERM, and
        # stdin is often one (`execc -- cat < file`); poll reports them readable.
        self.selector = getattr(selectors, "PollSelector", selectors.SelectSelector)()
        self.credit = self.window = int(hello.get("stdin_window", 0))
        self.max_frame = int(hello.get("max_frame", MAX_FRAME))
        self.stdin_open = True
        self.stdin_watched = False
        self.closed_outputs = set()
        self.exit_status = None
        self.recent_interrupts = []
        self.escape = None
        if args.tty and args.escape_byte is not None and os.isatty(STDIN_FILENO):
            self.escape = EscapeFilter(args.escape_byte)
        self.wakeup_read = None
        self.splice_stdin = False
        self.splice_targets = {}  # output fd -> stream name, for pipes only
        if SPLICE is not None and not args.tls:
            self.find_pipes()

    def find_pipes(self):
        """Note which of stdin, stdout and stderr are pipes that splice can use."""
        self.splice_stdin = is_pipe(STDIN_FILENO)
        if self.splice_stdin:
            enlarge_pipe(STDIN_FILENO)
        for fd, name in ((STDOUT_FILENO, "stdout"), (STDERR_FILENO, "stderr")):
            if is_pipe(fd):
                self.splice_targets[fd] = name
                enlarge_pipe(fd)

    def run(self):
        """Forward until EXIT; return the exit status.  The only select()."""
        self.install_signal_handlers()
        try:
            self.selector.register(self.channel.sock, selectors.EVENT_READ, self.on_socket)
            self.update_stdin_watch()
            while self.exit_status is None:
                for key, mask in self.selector.select():
                    key.data()
                    if self.exit_status is not None:
                        break
        finally:
            self.restore_signal_handlers()
        return self.exit_status

    # -- signals -------------------------------------------------------------

    def install_signal_handlers(self):
        """Route forwarded signals into the loop through a wakeup fd.

        A Python handler runs only between bytecodes and select() restarts
        after it (PEP 475), so the handler does nothing and the C-level
        handler's wakeup byte, the signal number, wakes the loop instead.
        """
        self.wakeup_read, self.wakeup_write = socket.socketpair()
        for sock in (self.wakeup_read, self.wakeup_write):
            sock.setblocking(False)
        self.previous_wakeup = signal.set_wakeup_fd(self.wakeup_write.fileno())
        names = FORWARDED_SIGNALS + (("WINCH",) if self.args.tty else ())
        self.previous_handlers = {}
        for name in names:
            number = getattr(signal, "SIG" + name)
            self.previous_handlers[number] = signal.signal(number, lambda signum, frame: None)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, self.on_signals)

    def restore_signal_handlers(self):
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler)
        signal.set_wakeup_fd(self.previous_wakeup)

    def on_signals(self):
        try:
            numbers = self.wakeup_read.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        for number in bytearray(numbers):
            name = signal.Signals(number).name[3:]
            if name == "WINCH":
                rows, cols = window_size()
                self.channel.send_json(WINSIZE, {"rows": rows, "cols": cols})
                continue
            self.channel.send_json(SIGNAL, {"signal": name})
            if name in ("INT", "TERM") and self.escalate(number):
                return

    def escalate(self, number):
        """Disconnect on the third SIGINT/SIGTERM within ESCALATION_WINDOW seconds."""
        now = time.monotonic()
        self.recent_interrupts = [t for t in self.recent_interrupts
                                  if now - t < ESCALATION_WINDOW] + [now]
        if len(self.recent_interrupts) < ESCALATION_COUNT:
            return False
        self.notices.append("execc: the command did not exit after %d signals; "
                            "disconnecting, so the daemon hangs up the session"
                            % ESCALATION_COUNT)
        self.exit_status = 128 + number
        return True

    # -- stdin -----------------------------------------------------------------

    def update_stdin_watch(self):
        wanted = self.stdin_open and self.credit > 1
        if wanted == self.stdin_watched:
            return
        self.stdin_watched = wanted
        if wanted:
            try:
                self.selector.register(STDIN_FILENO, selectors.EVENT_READ, self.on_stdin)
            except (ValueError, OSError):
                self.stdin_watched = False  # EBADF: stdin is closed, which is end of file
                self.send_stdin_eof()
        else:
            self.selector.unregister(STDIN_FILENO)

    def on_stdin(self):
        if self.splice_stdin and self.escape is None and self.splice_stdin_frame():
            while self.splice_stdin_frame():
                pass  # more frames while stdin has bytes and credit lasts
            return
        # With escapes on, one byte of credit stays free: a lone escape
        # character may have to be sent along with the next byte.
        size = min(STDIN_READ_SIZE, self.credit - (1 if self.escape else 0))
        try:
            data = os.read(STDIN_FILENO, size)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:
                raise ClientError("cannot read stdin: %s" % e.strerror)
            data = b""  # EIO: our terminal was hung up, which ends its input
        if not data:
            self.send_stdin_eof()
            return
        if self.escape is not None:
            data, action = self.escape.feed(data)
            if action == "help":
                write_all(STDERR_FILENO, self.escape.help_text().encode())
            elif action == "disconnect":
                self.notices.append("execc: disconnected; the daemon hangs up the session")
                self.exit_status = EXIT_CLIENT_FAILURE
                return
        if data:
            self.credit -= len(data)
            self.channel.send(STDIN, data)
        self.update_stdin_watch()

    def splice_stdin_frame(self):
        """Send what waits in the stdin pipe as one STDIN frame, by splice.

        Returns False, having sent nothing, when too little waits.  The
        read() that follows then also detects end of file.
        """
        import fcntl
        import termios
        waiting = struct.unpack("i", fcntl.ioctl(STDIN_FILENO, termios.FIONREAD, b"\0" * 4))[0]
        # A quarter of the window at most, so several frames are in flight
        # while the daemon grants credit back for earlier ones.
        count = min(waiting, self.credit, self.window // 4, self.max_frame)
        if count < SPLICE_MIN:
            return False
        self.channel.send(STDIN, b"", payload_length=count)
        sock_fd = self.channel.sock.fileno()
        left = count
        while left:
            try:
                moved = SPLICE(STDIN_FILENO, sock_fd, left)
            except OSError as e:
                raise ConnectionLost("connection to %s lost: %s" % (self.channel.where, e.strerror))
            if moved == 0:  # another reader of our stdin took the bytes we counted
                raise ClientError("stdin shrank while it was being sent; cannot continue")
            left -= moved
        self.credit -= count
        self.update_stdin_watch()
        return True

    def send_stdin_eof(self):
        self.stdin_open = False
        self.update_stdin_watch()
        self.channel.send(STDIN_EOF)

    # -- frames from the daemon ---------------------------------------------

    def on_socket(self):
        if self.splice_targets and self.channel.reader.at_frame_boundary():
            if self.splice_frame():
                return
        if not self.channel.receive():
            raise ClientError("connection to %s lost before the command finished"
                              % self.channel.where)
        while self.exit_status is None:
            frame = self.channel.reader.next_frame()
            if frame is None:
                return
            self.on_frame(*frame)

    def on_frame(self, frame_type, payload):
        if frame_type == STDOUT:
            self.write_output(STDOUT_FILENO, "stdout", payload)
        elif frame_type == STDERR:
            self.write_output(STDERR_FILENO, "stderr", payload)
        elif frame_type == STDIN_WINDOW:
            if len(payload) != WINDOW.size:
                raise ProtocolViolation("the daemon sent an invalid STDIN_WINDOW frame")
            self.credit += WINDOW.unpack(payload)[0]
            self.update_stdin_watch()
        elif frame_type == EXIT:
            self.on_exit(decode_json(payload))
        elif frame_type == ERROR:
            error = decode_json(payload)
            if error.get("fatal", True):
                raise ClientError("%s: %s" % (self.channel.where, error.get("message")))
            self.notices.append("execc: daemon: %s" % error.get("message"))
        elif frame_type != STARTED:
            raise ProtocolViolation("the daemon sent an unexpected frame type 0x%02x"
                                    % frame_type)

    def write_output(self, fd, name, data):
        if name in self.closed_outputs:
            return
        try:
            write_all(fd, data)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                raise ClientError("cannot write %s: %s" % (name, e.strerror))
            self.close_output(name)

    def close_output(self, name):
        """Stop writing a broken output and tell the daemon.

        EPIPE means our reader has gone (`execc -- yes | head`).  The daemon
        then closes the command's end, so the command gets SIGPIPE just as
        it would have locally.
        """
        self.closed_outputs.add(name)
        self.channel.send_json(OUTPUT_CLOSED, {"stream": name})

    def splice_frame(self):
        """Splice one large output frame from the socket into its pipe.

        Returns False, having consumed nothing, when the next frame is not
        a large STDOUT or STDERR frame for an open pipe.
        """
        sock = self.channel.sock
        try:
            header = sock.recv(HEADER.size, socket.MSG_PEEK)
        except OSError:
            return False  # receive() reports the error
        if len(header) < HEADER.size:
            return False
        length, frame_type = HEADER.unpack(header)
        fd = {STDOUT: STDOUT_FILENO, STDERR: STDERR_FILENO}.get(frame_type)
        name = self.splice_targets.get(fd)
        if name is None or name in self.closed_outputs or not SPLICE_MIN <= length <= MAX_FRAME:
            return False
        sock.recv(HEADER.size)  # the peeked header, now consumed
        while length:
            try:
                moved = SPLICE(sock.fileno(), fd, length)
            except BrokenPipeError:
                self.close_output(name)
                self.discard_payload(length)
                return True
            except OSError as e:
                raise ConnectionLost("connection to %s lost: %s" % (self.channel.where, e.strerror))
            if moved == 0:
                raise ConnectionLost("connection to %s lost before the command finished"
                                     % self.channel.where)
            length -= moved
        return True

    def discard_payload(self, length):
        """Read and drop the rest of a payload whose output has gone."""
        while length:
            data = self.channel.sock.recv(min(length, READ_SIZE))
            if not data:
                raise ConnectionLost("connection to %s lost before the command finished"
                                     % self.channel.where)
            length -= len(data)

    def on_exit(self, info):
        if info.get("exec_error"):
            self.notices.append("execc: %s" % info["exec_error"])
        if info.get("discarded") and not self.args.quiet:
            self.notices.append("execc: %d bytes of output were discarded: background "
                                "processes wrote them after the command exited"
                                % info["discarded"])
        elif info.get("output_held") and self.args.verbose:
            self.notices.append("execc: background processes still held the command's "
                                "output open when it exited")
        self.exit_status = exit_status_from(info)


# --- The local terminal ---------------------------------------------------------

class RawTerminal:
    """Raw mode on stdin's terminal for a pty session, restored exactly on exit."""

    def __init__(self, enabled):
        self.saved = None
        self.enabled = enabled and os.isatty(STDIN_FILENO)

    def __enter__(self):
        if not self.enabled:
            return self
        import termios
        self.saved = termios.tcgetattr(STDIN_FILENO)
        raw = termios.tcgetattr(STDIN_FILENO)
        # What cfmakeraw(3) does: no input translation, no output
        # post-processing, no echo, no line editing, no signal keys (Ctrl-C
        # and Ctrl-Z become bytes for the remote terminal), 8-bit bytes.
        raw[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP |
                    termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
        raw[1] &= ~termios.OPOST
        raw[2] &= ~(termios.CSIZE | termios.PARENB)
        raw[2] |= termios.CS8
        raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG |
                    termios.IEXTEN)
        raw[6][termios.VMIN] = 1
        raw[6][termios.VTIME] = 0
        termios.tcsetattr(STDIN_FILENO, termios.TCSADRAIN, raw)
        return self

    def __exit__(self, *exc_info):
        if self.saved is None:
            return
        import termios
        try:
            termios.tcsetattr(STDIN_FILENO, termios.TCSADRAIN, self.saved)
        except termios.error:
            pass  # EIO: the terminal itself has gone, nothing to restore


def run(args, notices):
    """Connect, run the session, and return the exit status."""
    where = format_address(args.address)
    channel = Channel(connect(args), where)
    try:
        hello = handshake(channel, args)
        session = ClientSession(channel, args, hello, notices)
        with RawTerminal(args.tty):
            return session.run()
    except ProtocolViolation as e:
        channel.send_error(str(e))
        raise
    finally:
        channel.sock.close()


def ensure_standard_fds():
    """Open /dev/null on any of fds 0-2 that is closed (`execc ... <&-`).

    Otherwise the socket could become fd 0 and be taken for stdin.
    """
    for fd in (STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free fd: this one


def main(argv=None):
    ensure_standard_fds()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    notices = []
    status = EXIT_CLIENT_FAILURE
    try:
        status = run(args, notices)
    except ClientError as e:
        notices.append("execc: %s" % e)
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT  # before the session forwards SIGINT
    except Exception as e:  # a bug: one line, the terminal already restored
        notices.append("execc: internal error: %s: %s" % (type(e).__name__, e))
        if args.verbose:
            import traceback
            traceback.print_exc()
    for notice in notices:
        try:
            write_all(STDERR_FILENO, (notice + "\n").encode("utf-8", "replace"))
        except OSError:
            break  # stderr has gone too: nowhere left to report
    return status


if __name__ == "__main__":
    exit_status = main()
    # Skip the interpreter's teardown, which is a measurable part of every
    # command's latency.  Output went out with os.write; flush the rest.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_status)
