#!/usr/bin/env python3
"""execd: the daemon that runs commands for execc clients, as `lxc exec` does.

execd listens on a unix socket (by default) or on TCP, and runs one command
for each client connection.  The argv is exec'd directly, with no shell, in a
new session and process group, with either pipes (stdout and stderr kept
apart) or a pty as its terminal.  It streams stdin in and output out, forwards signals and window
sizes, and reports the exit status, or the signal that killed the command.
One process with one `selectors` loop serves every session.  It needs only the
Python standard library, 3.6 or newer, and runs when copied alone onto a host.

Usage:
    execd.py [--listen ADDR]... [--token-file FILE] [OPTIONS]
    execd.py --help

ADDR is `unix:PATH`, a path containing `/`, `HOST:PORT` or `[V6ADDR]:PORT`.
The default is a unix socket at $EXECD_SOCKET, else
$XDG_RUNTIME_DIR/execd/execd.sock, else /tmp/execd-UID/execd.sock.

Protocol (version 1)
--------------------
Every message in both directions is a frame: a 5-byte header, then the payload.

    offset  size  field
    0       4     payload length in bytes, unsigned, big-endian (network order)
    4       1     frame type (table below)
    5       N     payload

Control payloads are UTF-8 JSON objects; data payloads are raw bytes.  Before
authentication a frame may carry at most MAX_PREAUTH_FRAME (4096) bytes, and
after it at most --max-frame (default 1 MiB); a larger length, an unknown type
or a frame out of order gets a fatal ERROR frame in reply, then a close.
Unknown JSON keys are ignored, so later minor additions stay compatible.

Frame types, in the order a session uses them (C = client, D = daemon):

    type  name           dir  payload
    0x01  HELLO          C>D  {"protocol": 1, "program": "execc 1.0.0"}
    0x01  HELLO          D>C  {"protocol": 1, "program": "execd 1.0.0",
                               "auth": "none" | "token", "nonce": HEX,
                               "stdin_window": BYTES, "max_frame": BYTES}
    0x02  AUTH           C>D  {"nonce": HEX, "mac": HEX}           (token only)
    0x03  AUTH_OK        D>C  {"mac": HEX}                         (token only)
    0x04  REQUEST        C>D  {"argv": [STR...], "env": {STR: STR}, "cwd": STR,
                               "tty": BOOL, "rows": INT, "cols": INT,
                               "term": STR, "user": STR, "group": STR}
    0x05  STARTED        D>C  {"session": INT, "pid": INT, "tty": BOOL}
    0x10  STDIN          C>D  raw bytes for the command's stdin
    0x11  STDIN_EOF      C>D  empty: the client's stdin reached end of file
    0x12  SIGNAL         C>D  {"signal": "TERM"}  (name without "SIG")
    0x13  WINSIZE        C>D  {"rows": INT, "cols": INT}
    0x14  OUTPUT_CLOSED  C>D  {"stream": "stdout" | "stderr"}: the client's own
                              output failed with EPIPE, so the daemon closes the
                              command's end and the command gets SIGPIPE
    0x20  STDOUT         D>C  raw bytes (in pty mode: all terminal output)
    0x21  STDERR         D>C  raw bytes (pipe mode only)
    0x22  STDIN_WINDOW   D>C  4 bytes, unsigned big-endian: more stdin credit
    0x23  EXIT           D>C  {"code": INT | null, "signal": NAME | null,
                               "signal_number": INT | null, "core": BOOL,
                               "exec_error": STR | null,
                               "output_held": BOOL, "discarded": BYTES}
    0x7f  ERROR          both {"message": STR, "fatal": BOOL}

A session: the client sends HELLO; the daemon answers HELLO, or a fatal ERROR
naming both versions when they differ.  With "auth": "token" the client sends
AUTH with its own 32-byte nonce and HMAC-SHA256(token, b"execc client\\0" +
daemon_nonce + client_nonce); the daemon checks it in constant time and proves
itself with AUTH_OK carrying HMAC-SHA256(token, b"execd daemon\\0" +
daemon_nonce + client_nonce).  Nonces travel as hex; the MAC input uses the raw
bytes.  The token itself never crosses the wire.  Then the client sends one
REQUEST.  Strings in argv, env and cwd that are not valid UTF-8 are carried as
lone surrogates U+DC80..U+DCFF (Python's "surrogateescape").  An empty argv
with "tty": true runs the user's login shell.

Stdin flows under a credit window: the client may send at most "stdin_window"
bytes of STDIN payload beyond what STDIN_WINDOW frames have granted back, so
the daemon can always read control frames without buffering unbounded input.
Output flows under TCP's own backpressure: the daemon stops reading the
command's output while more than OUTPUT_HIGH_WATER bytes wait for the client.

EXIT is sent after the last STDOUT/STDERR frame, and the daemon then closes the
connection.  "code" is set when the command exited, "signal" (with the daemon's
"signal_number" as a hint for names the client does not know) when a signal
killed it.  "exec_error" is set when the command could not be started (code
127: not found, 126: not executable, 125: the setup before exec failed).
"output_held" says that background processes still held the command's output
open when the session ended, and "discarded" counts output bytes left unread.

Exit status (what execc turns EXIT into): the code itself; 128+n for signal n;
126 not executable, 127 not found, 125 setup failed; 255 for the client's own
failures (connection, version, authentication).

The drain: see `OutputStream` and `Session.on_child_exit`.  Pipe mode: when
the command has been reaped, every byte already in its output pipes is sent,
and nothing written after that.  Pty mode: output is read until EIO (every
slave fd closed), or until the pty is quiet for PTY_DRAIN_QUIET seconds, for at
most PTY_DRAIN_MAX seconds.

Limitations:
  - Sessions are hung up by process session id, read from /proc; a process
    that called setsid() itself escapes the hangup.  Without /proc (not Linux)
    only the command's process group is signalled.
  - In pty mode a background job that keeps writing to the terminal after the
    command exits may have its last bytes cut at the PTY_DRAIN_MAX deadline.
"""

import argparse
import errno
import fcntl
import grp
import hashlib
import heapq
import hmac
import json
import logging
import os
import pwd
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import termios
import time

VERSION = "1.0.0"
PROTOCOL_VERSION = 1

# --- Frame format ---------------------------------------------------------

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

FRAME_NAMES = {
    HELLO: "HELLO", AUTH: "AUTH", AUTH_OK: "AUTH_OK", REQUEST: "REQUEST",
    STARTED: "STARTED", STDIN: "STDIN", STDIN_EOF: "STDIN_EOF",
    SIGNAL: "SIGNAL", WINSIZE: "WINSIZE", OUTPUT_CLOSED: "OUTPUT_CLOSED",
    STDOUT: "STDOUT", STDERR: "STDERR", STDIN_WINDOW: "STDIN_WINDOW",
    EXIT: "EXIT", ERROR: "ERROR",
}

# Small enough that an unauthenticated peer cannot make the daemon buffer much.
MAX_PREAUTH_FRAME = 4096
DEFAULT_MAX_FRAME = 1 << 20
# Credit the client starts with: room for several frames in flight, which
# keeps a fast stdin streaming, and the bound on the daemon's stdin buffer
# for a session whose command does not read.
STDIN_WINDOW_BYTES = 1024 * 1024
NONCE_BYTES = 32
CLIENT_MAC_LABEL = b"execc client\0"
DAEMON_MAC_LABEL = b"execd daemon\0"

# --- Process and I/O constants --------------------------------------------

STDIN_FILENO = 0
STDOUT_FILENO = 1
STDERR_FILENO = 2
CHILD = 0  # os.fork() returns 0 in the child

READ_SIZE = 64 * 1024  # one read from a pipe, pty or socket
# The daemon stops reading a command's output while this much waits to be
# sent to the client, and resumes below the low-water mark.
OUTPUT_HIGH_WATER = 256 * 1024
OUTPUT_LOW_WATER = 64 * 1024

# Exit codes for a command that never ran, as sh and env(1) report them.
EXIT_SETUP_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

# Pty drain: after the command exits, wait this long for more output when a
# background process keeps the terminal open, but never longer than the max.
PTY_DRAIN_QUIET = 0.1
PTY_DRAIN_MAX = 1.0

# Slow down failed token authentication from one address: the error reply is
# delayed by base * 2**(failures - 1) seconds, at most the cap.
AUTH_DELAY_BASE = 0.25
AUTH_DELAY_CAP = 8.0
AUTH_FAILURE_MEMORY = 600.0  # seconds after which failures are forgotten

ACCEPT_BACKOFF = 1.0  # seconds the listener pauses after EMFILE/ENFILE

# Signals a client may forward.  KILL and STOP cannot be caught by the client,
# so they never arrive; the daemon hangs up the session instead.
FORWARDABLE_SIGNALS = ("HUP", "INT", "QUIT", "TERM", "USR1", "USR2",
                       "WINCH", "CONT", "TSTP", "ALRM", "PIPE")

TIOCINQ = getattr(termios, "FIONREAD", 0x541B)  # bytes waiting in a pipe/pty
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux only
PIPE_SIZE = 1 << 20  # larger pipes mean fewer, larger reads

# Linux splice(2), in Python 3.10 and newer: output moves from the command's
# pipe to the client's socket inside the kernel, never copied through this
# process.  Older Pythons, TLS and ptys use read() and send() instead.
SPLICE = getattr(os, "splice", None)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# STDIN frames at least this large go from the socket into the command's
# stdin pipe with splice; smaller ones are read with their neighbours.
SPLICE_MIN = 16 * 1024
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)  # Linux only

log = logging.getLogger("execd")


# --- Small helpers ----------------------------------------------------------

def signal_name(number):
    """Return the portable name of a signal number ("KILL"), or None."""
    try:
        return signal.Signals(number).name[3:]
    except ValueError:
        return None


def signal_number(name):
    """Return the local number for a signal name such as "TERM", or None."""
    value = getattr(signal, "SIG" + name, None) if name.isalnum() else None
    return int(value) if isinstance(value, int) else None


def encode_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode_json(payload):
    """Parse a control payload; raise ProtocolError unless it is an object."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("invalid JSON payload: %s" % e)
    if not isinstance(obj, dict):
        raise ProtocolError("control payload must be a JSON object")
    return obj


def pending_bytes(fd):
    """Return how many bytes wait unread in a pipe or pty master (FIONREAD)."""
    buf = fcntl.ioctl(fd, TIOCINQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def io_error_kind(error):
    """Classify an OSError from a read or write on a pipe, pty or socket.

    Returns "again" (nothing to do now), "eof" (the other side has gone) or
    raises the error again when it is a real failure.
    """
    if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
        return "again"
    # EIO from a pty master on Linux: every slave fd is closed, so this is the
    # end of the terminal's output, not a failure.  BSDs return 0 instead.
    if error.errno in (errno.EIO, errno.EPIPE, errno.ECONNRESET,
                       errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH):
        return "eof"
    raise error


def close_fd(fd):
    """Close fd unless it is None; return None, to clear the owner's slot."""
    if fd is not None and fd >= 0:
        os.close(fd)
    return None


class ProtocolError(Exception):
    """A peer broke the protocol; the message goes into a fatal ERROR frame."""


class ConfigError(Exception):
    """Invalid daemon configuration; main() logs it as one line and exits 1."""


# --- Addresses ------------------------------------------------------------

def default_socket_path():
    """Return the documented default socket path for this user."""
    if os.environ.get("EXECD_SOCKET"):
        return os.environ["EXECD_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "execd", "execd.sock")
    return "/tmp/execd-%d/execd.sock" % os.getuid()


def parse_address(text):
    """Parse an address: ("unix", path) or ("tcp", host, port).

    Forms: unix:PATH, a path containing "/", HOST:PORT, [V6ADDR]:PORT.
    """
    if text.startswith("unix:"):
        if len(text) == 5:
            raise ValueError("invalid address %r: unix: needs a path" % text)
        return ("unix", text[5:])
    if "/" in text:
        return ("unix", text)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError("invalid address %r: expected [V6ADDR]:PORT" % text)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(
                "invalid address %r: expected unix:PATH, a path containing "
                "'/', HOST:PORT or [V6ADDR]:PORT" % text)
    # Port 0 lets the kernel pick a free port, which the "listening on" line shows.
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("invalid port in address %r: expected 0-65535" % text)
    return ("tcp", host, int(port))


def format_address(address):
    if address[0] == "unix":
        return "unix:" + address[1]
    host = address[1]
    return "[%s]:%d" % (host, address[2]) if ":" in host else "%s:%d" % (host, address[2])


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


# --- Frames -----------------------------------------------------------------

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
            raise ProtocolError("frame of %d bytes exceeds the maximum of %d"
                                % (length, self.max_payload))
        if available < HEADER.size + length:
            return None
        start = self.position + HEADER.size
        with memoryview(self.buffer) as view:
            payload = bytes(view[start:start + length])  # one copy, not two
        self.position = start + length
        return frame_type, payload


def frame_bytes(frame_type, payload=b""):
    return HEADER.pack(len(payload), frame_type) + payload


# --- Timers -----------------------------------------------------------------

class Timer:
    """A callback due at a monotonic time; cancel() makes it a no-op."""

    def __init__(self, when, callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __lt__(self, other):
        return self.when < other.when


# --- The child: from fork to exec ---------------------------------------------

class LaunchPlan:
    """Everything the forked child needs, computed in the parent before fork."""

    def __init__(self, executable, argv, env, cwd, user=None):
        self.executable = executable  # bytes: searched in env's PATH
        self.argv = argv              # list of bytes
        self.env = env                # dict of bytes to bytes
        self.cwd = cwd                # bytes or None
        self.user = user              # (name, uid, gid) to switch to, or None


def reset_signal_state():
    """Give the command a login shell's signal state: defaults, none blocked.

    CPython ignores SIGPIPE and the daemon has its own handlers; ignored
    dispositions and the blocked mask survive exec, so both are undone here.
    """
    signal.set_wakeup_fd(-1)
    for number in range(1, signal.NSIG):
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass  # numbers the C library reserves (glibc keeps 32 and 33)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def close_inherited_fds(keep):
    """Close every fd above stderr except keep, so the command inherits none."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(STDERR_FILENO + 1, os.sysconf("SC_OPEN_MAX"))
    for fd in fds:
        if fd > STDERR_FILENO and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass  # EBADF: the fd listdir itself used, already closed


def run_child(plan, stdio, tty_slave, errpipe_write):
    """Set up the forked child and exec the command.  Never returns.

    A failure is written to errpipe_write as b"STEP:ERRNO" (for example
    b"exec:2") before _exit; a successful exec closes the pipe (close-on-exec)
    with nothing written.
    """
    step = "setup"
    try:
        reset_signal_state()
        os.setsid()  # new session and process group, no controlling tty yet
        if tty_slave is not None:
            # After setsid() the session has no terminal; TIOCSCTTY makes the
            # slave its controlling terminal, which job control needs.
            step = "tty"
            fcntl.ioctl(tty_slave, termios.TIOCSCTTY, 0)
        for target, fd in zip((STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO), stdio):
            os.dup2(fd, target)  # the copy is inheritable; the source is not
        close_inherited_fds(keep=errpipe_write)
        if plan.user is not None:
            step = "user"
            name, uid, gid = plan.user
            os.initgroups(name, gid)  # groups, gid, uid: in this order only
            os.setgid(gid)
            os.setuid(uid)
        if plan.cwd is not None:
            step = "cwd"
            os.chdir(plan.cwd)
        step = "exec"
        os.execvpe(plan.executable, plan.argv, plan.env)
    except OSError as e:
        report = "%s:%d" % (step, e.errno or 0)
    except BaseException:
        report = "%s:0" % step
    try:
        os.write(errpipe_write, report.encode("ascii"))
    finally:
        os._exit(EXIT_SETUP_FAILED)  # the parent reads the real status from errpipe


def exec_failure(report, plan):
    """Turn an errpipe report into (exit code, message) for the client."""
    step, _, number = report.decode("ascii", "replace").partition(":")
    code = int(number) if number.isdigit() else 0
    reason = os.strerror(code) if code else "unexpected error"
    if step == "exec":
        name = os.fsdecode(plan.executable)
        # The sh convention (as tini and POSIX shells report it): 127 when the
        # command does not exist, 126 when it exists but cannot be executed.
        if code in (errno.ENOENT, errno.ENOTDIR):
            return EXIT_NOT_FOUND, "cannot execute %r: %s" % (name, reason)
        return EXIT_NOT_EXECUTABLE, "cannot execute %r: %s" % (name, reason)
    if step == "cwd":
        return EXIT_SETUP_FAILED, "cannot change directory to %r: %s" % (
            os.fsdecode(plan.cwd), reason)
    if step == "user":
        return EXIT_SETUP_FAILED, "cannot switch to user %r: %s" % (
            plan.user[0], reason)
    return EXIT_SETUP_FAILED, "cannot set up the command (%s): %s" % (step, reason)


def wait_status_to_wire(status):
    """Turn a waitpid status into the EXIT frame's code/signal/core fields."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return {"code": None, "signal": signal_name(number) or str(number),
                "signal_number": number, "core": bool(os.WCOREDUMP(status))}
    return {"code": os.WEXITSTATUS(status), "signal": None,
            "signal_number": None, "core": False}


def scan_sessions():
    """Return {session id: [pids]} for every live process (Linux /proc), or None."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    sessions = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat_line = f.read()
        except OSError:
            continue  # the process exited while we listed /proc
        # Field 2 (comm) may contain spaces and parentheses: split after the last ")".
        fields = stat_line[stat_line.rfind(b")") + 2:].split()
        if len(fields) > 3 and fields[0] != b"Z":
            sessions.setdefault(int(fields[3]), []).append(int(name))
    return sessions


# --- Session: one command and its fds ---------------------------------------

STARTING = "starting"    # forked; errpipe not yet closed
RUNNING = "running"      # exec succeeded
DRAINING = "draining"    # command reaped; delivering output already written
EXITED = "exited"        # EXIT frame queued; no more output
HUNG_UP = "hung up"      # client gone or daemon stopping; killing what is left
CLOSED = "closed"        # reaped and every fd closed

TRANSITIONS = {
    STARTING: (RUNNING, DRAINING, HUNG_UP),
    RUNNING: (DRAINING, HUNG_UP),
    DRAINING: (EXITED, HUNG_UP),
    EXITED: (CLOSED,),
    HUNG_UP: (CLOSED,),
    CLOSED: (),
}


def poll_hangup(fd):
    """Return True when every writer of a pipe or pty slave has closed it."""
    # poll() rather than a selector: it reports POLLHUP directly.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(event & select.POLLHUP for _, event in poller.poll(0))


class PipePayload:
    """A frame payload that stays in the command's pipe until spliced out.

    The connection's queue contains it after its frame header; the connection
    splices `remaining` bytes from fd into the socket, then calls on_sent.
    """

    def __init__(self, fd, count, on_sent):
        self.fd = fd
        self.remaining = count
        self.on_sent = on_sent

    def __len__(self):
        return self.remaining

    def read_remaining(self):
        """Read the bytes still in the pipe, for a stream about to close its fd."""
        chunks = []
        while self.remaining:
            chunk = os.read(self.fd, self.remaining)  # they are there: we are the only reader
            chunks.append(chunk)
            self.remaining -= len(chunk)
        return b"".join(chunks)


class OutputStream:
    """One output of the command (stdout, stderr or the pty master).

    The drain rule lives here.  Take `sh -c 'echo done; yes > log &'` or
    `sh -c 'sleep 100 &'`: the foreground command has exited, but a
    background job keeps the write end open, so EOF may never come.  When
    the command is reaped (start_drain):
      * no writer is left (POLLHUP): read to EOF, which is exact and bounded;
      * pipe still held: read exactly the bytes already in the pipe
        (FIONREAD).  A pipe write is complete when write() returns, so every
        byte the command wrote is in there, and nothing written later is sent;
      * pty still held: the tty layer pushes slave writes to the master
        asynchronously, so read until nothing arrives for PTY_DRAIN_QUIET
        seconds, for at most PTY_DRAIN_MAX seconds.
    """

    def __init__(self, session, fd, frame_type, name, is_pty):
        self.session = session
        self.fd = fd
        self.frame_type = frame_type
        self.name = name
        self.is_pty = is_pty
        self.budget = None       # pipe drain: bytes left to read, None = to EOF
        self.quiet_timer = None  # pty drain: fires after PTY_DRAIN_QUIET idle
        self.drain_deadline = None
        self.paused = False      # the client is behind (OUTPUT_HIGH_WATER)
        self.watching = False
        self.in_flight = None    # a PipePayload the connection has not sent yet
        self.splice = (SPLICE is not None and not is_pty
                       and session.connection.listener.tls_context is None)
        self.held_open = False   # a background process still held it at the end
        self.discarded = 0       # bytes left unread when the stream was closed

    def __repr__(self):
        return "<OutputStream %s fd=%s budget=%s>" % (self.name, self.fd, self.budget)

    def update_watch(self):
        """Read while the client keeps up and no spliced payload is pending."""
        wanted = self.fd is not None and not self.paused and self.in_flight is None
        if wanted != self.watching:
            self.watching = wanted
            if wanted:
                self.session.daemon.watch(self.fd, selectors.EVENT_READ, self.on_readable)
            else:
                self.session.daemon.unwatch(self.fd)

    def pause(self):
        self.paused = True
        self.update_watch()

    def resume(self):
        if self.fd is not None and self.paused:
            self.paused = False
            self.update_watch()
            if self.quiet_timer is not None:
                self.arm_quiet_timer()

    def on_readable(self, mask):
        if self.splice and self.queue_splice():
            return
        size = READ_SIZE if self.budget is None else min(READ_SIZE, self.budget)
        try:
            data = os.read(self.fd, size)
        except OSError as e:
            if io_error_kind(e) == "again":
                return
            data = b""  # EIO on the pty master: see io_error_kind
        if not data:
            self.close(end_of_file=True)
            return
        self.session.send_output(self.frame_type, data)
        if self.budget is not None:
            self.budget -= len(data)
            if self.budget == 0:
                self.close(end_of_file=False)
        elif self.quiet_timer is not None:
            self.arm_quiet_timer()

    def queue_splice(self):
        """Queue the bytes waiting in the pipe as one spliced frame.

        Returns False when the pipe is empty.  The read() that follows then
        distinguishes end of file from a spurious wakeup.
        """
        count = min(pending_bytes(self.fd), PIPE_SIZE)
        if self.budget is not None:
            count = min(count, self.budget)
        if count == 0:
            return False
        self.in_flight = PipePayload(self.fd, count, self.on_spliced)
        self.update_watch()
        if self.budget is not None:
            self.budget -= count
        self.session.send_output(self.frame_type, self.in_flight)
        return True

    def on_spliced(self):
        self.in_flight = None
        if self.budget == 0:
            self.close(end_of_file=False)
        else:
            self.update_watch()

    def start_drain(self):
        """Apply the drain rule (class docstring) once the command is reaped."""
        if self.fd is None or poll_hangup(self.fd):
            return  # no writer left: read on to EOF or EIO
        if self.is_pty:
            # NOTE: a background job that keeps writing to the terminal is
            # cut off at PTY_DRAIN_MAX, and its last bytes are lost.
            self.drain_deadline = time.monotonic() + PTY_DRAIN_MAX
            self.arm_quiet_timer()
            return
        # Bytes already queued as a PipePayload are still in the pipe, and
        # already counted.
        self.budget = pending_bytes(self.fd) - len(self.in_flight or ())
        if self.budget == 0 and self.in_flight is None:
            self.close(end_of_file=False)

    def arm_quiet_timer(self):
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
        delay = min(PTY_DRAIN_QUIET, max(0.0, self.drain_deadline - time.monotonic()))
        self.quiet_timer = self.session.daemon.call_later(delay, self.on_quiet)

    def on_quiet(self):
        if self.fd is None:
            return
        if self.paused and time.monotonic() < self.drain_deadline:
            return  # the client is slow, not the pty quiet: resume() re-arms
        self.close(end_of_file=False)

    def close(self, end_of_file):
        """Stop reading; record whether output was held open or discarded."""
        if self.fd is None:
            return
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
        if self.in_flight is not None:
            # The queued payload must not outlive its fd: take its bytes now.
            self.session.connection.replace_payload(self.in_flight,
                                                    self.in_flight.read_remaining())
            self.in_flight = None
        if not end_of_file:
            self.held_open = not poll_hangup(self.fd)
            self.discarded = pending_bytes(self.fd)
        if self.watching:
            self.session.daemon.unwatch(self.fd)
            self.watching = False
        self.fd = close_fd(self.fd)
        self.session.on_stream_closed(self)


class StdinSink:
    """The command's stdin: a pipe's write end, or a dup of the pty master.

    Bytes wait in `pending` until the fd is writable.  Every byte written, or
    dropped because the command closed its stdin, is granted back to the
    client as STDIN_WINDOW credit, so pending never exceeds the window.
    """

    def __init__(self, session, fd, is_pty):
        self.session = session
        self.fd = fd
        self.is_pty = is_pty
        self.pending = bytearray()
        self.eof_requested = False
        self.watching = False
        self.last_byte = None      # pty: the last byte written, for finish()
        self.capacity = None if is_pty else fcntl.fcntl(fd, F_GETPIPE_SZ)

    def __repr__(self):
        return "<StdinSink fd=%s pending=%d>" % (self.fd, len(self.pending))

    def write(self, data):
        if self.fd is None or self.eof_requested:
            self.session.grant_stdin(len(data))  # no reader is left: drop it
            return
        self.pending += data
        self.flush()

    def splice_room(self):
        """Return how many bytes may be spliced into the stdin pipe now.

        0 means the bytes go through `pending` instead: for a pty, after the
        command closed its stdin, while older bytes wait, or with the pipe full.
        """
        if self.is_pty or self.fd is None or self.pending:
            return 0
        return max(0, self.capacity - pending_bytes(self.fd))

    def request_eof(self):
        self.eof_requested = True
        if not self.pending:
            self.finish()

    def flush(self):
        written = 0
        while self.pending and self.fd is not None:
            try:
                with memoryview(self.pending) as view:  # no copy of the block
                    n = os.write(self.fd, view[:READ_SIZE])
            except OSError as e:
                if io_error_kind(e) == "again":
                    break
                # EPIPE: the command closed its stdin or exited; drop the rest.
                written += len(self.pending)
                del self.pending[:]
                self.close()
                break
            if n:
                self.last_byte = self.pending[n - 1]
            del self.pending[:n]
            written += n
        if written:
            self.session.grant_stdin(written)
        self.update_watch()
        if not self.pending and self.eof_requested:
            self.finish()

    def update_watch(self):
        wanted = bool(self.pending) and self.fd is not None
        if wanted != self.watching:
            self.watching = wanted
            if wanted:
                self.session.daemon.watch(self.fd, selectors.EVENT_WRITE,
                                          lambda mask: self.flush())
            else:
                self.session.daemon.unwatch(self.fd)

    def finish(self):
        """Deliver end of file: close the pipe, or type VEOF on the terminal."""
        if self.fd is None:
            return
        if self.is_pty:
            # A pty has no end of file to close: the line discipline turns
            # the VEOF character (normally Ctrl-D) at a line start into one.
            attrs = termios.tcgetattr(self.fd)
            veof = attrs[6][termios.VEOF]
            veof = veof if isinstance(veof, bytes) else bytes([veof])
            line_open = self.last_byte not in (None, ord("\n"), ord("\r"), veof[0])
            if line_open and attrs[3] & termios.ICANON:
                # After a partial line (`printf abc`) the first VEOF only
                # hands that line over; the second, at a line start, is EOF.
                veof *= 2
            try:
                os.write(self.fd, veof)
            except OSError as e:
                io_error_kind(e)  # EIO/EAGAIN: the terminal has gone or is full
            return
        self.close()

    def close(self):
        if self.watching:
            self.session.daemon.unwatch(self.fd)
            self.watching = False
        if self.is_pty:
            self.fd = None  # the session owns the pty master and closes it
        else:
            self.fd = close_fd(self.fd)


class Session:
    """One command: its process, its fds, and the connection it reports to."""

    def __init__(self, daemon, connection, number, request):
        self.daemon = daemon
        self.connection = connection
        self.number = number
        self.request = request
        self.state = STARTING
        self.pid = None
        self.plan = None
        self.tty = request["tty"]
        self.pty_master = None        # kept for WINSIZE and signal targeting
        self.errpipe_read = None
        self.start_fds = []           # see start() and abandon_start()
        self.early_signals = []       # SIGNAL names received before exec succeeded
        self.stdin = None
        self.streams = []
        self.status = None            # waitpid status once reaped
        self.exec_error = None        # (code, message) when exec failed
        self.kill_timer = None
        self.started_at = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self):
        return "<Session %d pid=%s %s>" % (self.number, self.pid, self.state)

    def set_state(self, new_state):
        """Change state; every transition is checked and logged here."""
        if new_state not in TRANSITIONS[self.state]:
            raise AssertionError("session %d: invalid transition %s -> %s"
                                 % (self.number, self.state, new_state))
        log.debug("session %d: %s -> %s", self.number, self.state, new_state)
        self.state = new_state

    # -- start ------------------------------------------------------------

    def start(self, plan):
        """Fork and exec the command; register its fds with the daemon."""
        self.plan = plan
        # errpipe: the child writes b"STEP:ERRNO" on failure (see run_child);
        # exec closes it unwritten, because os.pipe() fds are close-on-exec.
        self.errpipe_read, errpipe_write = os.pipe()
        # Every fd made before the fork, so abandon_start() can close them
        # when a later pipe, pty or fork fails (EMFILE, EAGAIN).
        self.start_fds = [self.errpipe_read, errpipe_write]

        if self.tty:
            child_fds, parent_fds, stdin_fd = self.open_pty()
        else:
            child_fds, parent_fds, stdin_fd = self.open_pipes()
        tty_slave = child_fds[0] if self.tty else None

        self.pid = os.fork()
        if self.pid == CHILD:
            # child: run_child closes the parent's ends (close_inherited_fds).
            run_child(plan, child_fds, tty_slave, errpipe_write)
        # parent: close the child's ends, or EOF/EIO would never come.
        os.close(errpipe_write)
        for fd in set(child_fds):
            os.close(fd)
        self.start_fds = []

        # SIGCHLD is only handled in the event loop, after this returns, so
        # the pid is registered before it can possibly be reaped.
        self.daemon.children[self.pid] = self
        self.register_fds(parent_fds, stdin_fd)
        log.info("session %d: start: peer %s, pid %d, %s, argv %r", self.number,
                 self.connection.peer_name, self.pid,
                 "pty" if self.tty else "pipes",
                 [os.fsdecode(arg) for arg in plan.argv])

    def open_pty(self):
        """Return (child fds, parent output fds, stdin fd) for pty mode."""
        self.pty_master, tty_slave = os.openpty()
        self.start_fds += [self.pty_master, tty_slave]
        self.set_window_size(self.request["rows"], self.request["cols"])
        # Reads go through a second fd, so reads and writes can each have
        # their own selector registration.  pty_master itself serves
        # writes, ioctls and tcgetpgrp, and is closed last.
        pty_reader = os.dup(self.pty_master)
        self.start_fds.append(pty_reader)
        return (tty_slave,) * 3, [(pty_reader, "pty", STDOUT)], self.pty_master

    def open_pipes(self):
        """Return (child fds, parent output fds, stdin fd) for pipe mode."""
        p2c_read, p2c_write = os.pipe()
        self.start_fds += [p2c_read, p2c_write]
        stdout_read, stdout_write = os.pipe()
        self.start_fds += [stdout_read, stdout_write]
        stderr_read, stderr_write = os.pipe()
        self.start_fds += [stderr_read, stderr_write]
        for fd in (p2c_write, stdout_read, stderr_read):
            enlarge_pipe(fd)
        parent_fds = [(stdout_read, "stdout", STDOUT), (stderr_read, "stderr", STDERR)]
        return (p2c_read, stdout_write, stderr_write), parent_fds, p2c_write

    def register_fds(self, parent_fds, stdin_fd):
        """Make the parent's ends non-blocking and watch them in the loop."""
        for fd in [self.errpipe_read, stdin_fd] + [fd for fd, _, _ in parent_fds]:
            os.set_blocking(fd, False)
        self.stdin = StdinSink(self, stdin_fd, self.tty)
        for fd, name, frame_type in parent_fds:
            stream = OutputStream(self, fd, frame_type, name, self.tty)
            self.streams.append(stream)
            stream.update_watch()
        self.daemon.watch(self.errpipe_read, selectors.EVENT_READ, self.on_errpipe)

    def abandon_start(self):
        """Close the fds of a start() that failed before its fork completed."""
        for fd in self.start_fds:
            close_fd(fd)
        self.start_fds = []
        self.errpipe_read = self.pty_master = None

    def on_errpipe(self, mask):
        try:
            report = os.read(self.errpipe_read, 256)
        except OSError as e:
            if io_error_kind(e) == "again":
                return
            report = b""
        self.daemon.unwatch(self.errpipe_read)
        self.errpipe_read = close_fd(self.errpipe_read)
        if report:
            self.exec_error = exec_failure(report, self.plan)
            log.info("session %d: %s", self.number, self.exec_error[1])
        elif self.state == STARTING:
            self.set_state(RUNNING)
            self.connection.send_json(STARTED, {"session": self.number,
                                                "pid": self.pid, "tty": self.tty})
            for name in self.early_signals:
                self.forward_signal(name)
            self.early_signals = []
        self.check_finished()

    # -- client input ----------------------------------------------------

    def on_stdin(self, data):
        self.bytes_in += len(data)
        self.stdin.write(data)

    def grant_stdin(self, count):
        self.connection.grant_stdin(count)

    def on_stdin_eof(self):
        self.stdin.request_eof()

    def forward_signal(self, name):
        """Send a client's signal to the command's process group."""
        number = signal_number(name) if name in FORWARDABLE_SIGNALS else None
        if number is None:
            message = "signal %r is not forwardable; expected one of %s" % (
                name, ", ".join(FORWARDABLE_SIGNALS))
            log.warning("session %d: %s", self.number, message)
            self.connection.send_error(message, fatal=False)
            return
        if self.status is not None or self.state == HUNG_UP:
            log.info("session %d: SIG%s not sent: the command has exited",
                     self.number, name)
            return
        if self.state == STARTING:
            # Until exec succeeds the child may not have called setsid(), so
            # its process group may not exist yet: deliver after the exec.
            self.early_signals.append(name)
            return
        target = self.signal_target()
        log.info("session %d: forwarding SIG%s to process group %d",
                 self.number, name, target)
        try:
            os.killpg(target, number)
        except ProcessLookupError:
            log.info("session %d: process group %d has gone", self.number, target)

    def signal_target(self):
        """Return the process group a forwarded signal goes to.

        Pipe mode: the command's own group, so a pipeline or a script's
        children get it as from a local terminal.  Pty mode: the terminal's
        foreground group, the one Ctrl-C would reach, which under an
        interactive shell is the running job rather than the shell.
        """
        if self.pty_master is not None:
            try:
                return os.tcgetpgrp(self.pty_master)
            except OSError:
                pass  # ENOTTY/EIO: the terminal has been hung up
        return self.pid

    def set_window_size(self, rows, cols):
        """Set the pty size; the kernel sends SIGWINCH to the foreground group."""
        if self.pty_master is None:
            self.connection.send_error("window size ignored: the session has no pty",
                                       fatal=False)
            return
        size = struct.pack("HHHH", rows, cols, 0, 0)
        try:
            fcntl.ioctl(self.pty_master, termios.TIOCSWINSZ, size)
        except OSError as e:
            log.warning("session %d: TIOCSWINSZ failed: %s", self.number, e.strerror)

    def on_output_closed(self, stream_name):
        """Pass on a broken pipe on the client's own stdout or stderr.

        Closing our read end makes the command's next write fail with
        SIGPIPE, as it would have locally (`execc -- yes | head -n 3`).
        """
        for stream in self.streams:
            if stream.name in (stream_name, "pty") and stream.fd is not None:
                log.info("session %d: client closed its %s; closing %s",
                         self.number, stream_name, stream.name)
                if stream.is_pty:
                    # Close the master as a closed terminal window does: the kernel
                    # hangs up the slave, and EXIT still goes to the client (hang_up()
                    # sends none, so a still-connected client would wait forever).
                    self.close_fds()
                    return
                stream.close(end_of_file=True)

    # -- output to the client -------------------------------------------

    def send_output(self, frame_type, data):
        self.bytes_out += len(data)
        self.connection.send_frame(frame_type, data)
        if self.connection.out_bytes > OUTPUT_HIGH_WATER:
            for stream in self.streams:
                stream.pause()

    def on_client_drained(self):
        for stream in self.streams:
            stream.resume()

    def on_stream_closed(self, stream):
        self.check_finished()

    # -- end -------------------------------------------------------------

    def on_child_exit(self, status):
        """Record the reaped command's status and start the drain (see OutputStream)."""
        self.status = status
        self.daemon.children.pop(self.pid, None)
        if self.state in (STARTING, RUNNING):
            self.set_state(DRAINING)
            for stream in self.streams:
                if stream.fd is not None:
                    stream.start_drain()
        self.check_finished()

    def send_exit(self):
        # EXIT goes after the last output frame: both share the connection's
        # single ordered queue, and every stream is closed by now.
        exit_info = wait_status_to_wire(self.status)
        if self.exec_error is not None:
            exit_info.update(code=self.exec_error[0], signal=None,
                             signal_number=None, core=False)
        exit_info["exec_error"] = self.exec_error[1] if self.exec_error else None
        exit_info["output_held"] = any(s.held_open for s in self.streams)
        exit_info["discarded"] = sum(s.discarded for s in self.streams)
        self.set_state(EXITED)
        self.connection.send_json(EXIT, exit_info)
        self.connection.finish()
        self.log_end(exit_info)

    def log_end(self, exit_info):
        if exit_info["signal"]:
            outcome = "signal %s%s" % (exit_info["signal"],
                                       " (core dumped)" if exit_info["core"] else "")
        else:
            outcome = "exit %d" % exit_info["code"]
        extra = ""
        if exit_info["output_held"]:
            extra = ", output held open by background processes, %d bytes discarded" % (
                exit_info["discarded"])
        log.info("session %d: end: %s, %.3f s, %d bytes in, %d bytes out%s",
                 self.number, outcome, time.monotonic() - self.started_at,
                 self.bytes_in, self.bytes_out, extra)

    def hang_up(self, reason):
        """End the session early: SIGHUP now, SIGKILL after the grace period.

        Used when the client has gone or the daemon is stopping.  Every
        process still in the command's session gets the signals, background
        jobs included, so nothing of the session outlives it.  A command that
        had already exited is not signalled: its background jobs stay, as
        they do when the session ends normally.
        """
        if self.state in (EXITED, HUNG_UP, CLOSED):
            return
        self.set_state(HUNG_UP)
        self.close_fds()
        if self.status is not None:
            self.check_finished()
            return
        log.info("session %d: hanging up (%s): SIGHUP now, SIGKILL in %g s",
                 self.number, reason, self.daemon.config.hangup_grace)
        self.signal_session(signal.SIGHUP)
        self.signal_session(signal.SIGCONT)  # a stopped job must wake to see it
        self.kill_timer = self.daemon.call_later(self.daemon.config.hangup_grace,
                                                 self.kill_remaining)

    def signal_session(self, number):
        """Signal every process in the command's session (its sid is its pid).

        NOTE: a process that called setsid() itself has left the session and
        is not signalled, so it can outlive a hang-up.

        Returns the pids signalled, or None where /proc is missing and only
        the process group could be signalled.
        """
        members = self.daemon.session_members(self.pid)
        if members is None:
            try:
                os.killpg(self.pid, number)
            except ProcessLookupError:
                pass
            return None
        for pid in members:
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass  # exited between the /proc scan and now
        return members

    def kill_remaining(self):
        self.kill_timer = None
        members = self.signal_session(signal.SIGKILL)
        if members:
            log.info("session %d: grace period over: SIGKILL to pids %s",
                     self.number, members)
        self.check_finished()

    def close_fds(self):
        """Close every fd the session still owns."""
        for stream in self.streams:
            stream.close(end_of_file=True)
        if self.stdin is not None:
            self.stdin.close()
        self.pty_master = close_fd(self.pty_master)

    def check_finished(self):
        """Move the session on once the command is reaped.

        Normal end: send EXIT when every stream is closed.  After a hangup:
        close once the command is reaped and no process of its session is
        left, or once the SIGKILL at the end of the grace period is sent.
        """
        if self.status is None or self.errpipe_read is not None:
            return
        if self.state == HUNG_UP:
            if self.kill_timer is not None and self.daemon.session_members(self.pid):
                return  # background members still get their SIGKILL
            if self.kill_timer is not None:
                self.kill_timer.cancel()
            log.info("session %d: end after hangup: %s, %.3f s", self.number,
                     describe_status(self.status), time.monotonic() - self.started_at)
            self.set_state(CLOSED)
            self.daemon.forget_session(self)
            return
        if any(stream.fd is not None for stream in self.streams):
            return
        if self.state in (STARTING, RUNNING, DRAINING):
            self.send_exit()
            self.close_fds()
            self.set_state(CLOSED)
            self.daemon.forget_session(self)


def describe_status(status):
    info = wait_status_to_wire(status)
    return "signal %s" % info["signal"] if info["signal"] else "exit %d" % info["code"]


def enlarge_pipe(fd):
    """Raise a pipe's capacity to PIPE_SIZE where Linux allows it (fewer reads)."""
    if sys.platform.startswith("linux"):
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # EPERM above /proc/sys/fs/pipe-max-size: keep the default


# --- Connection: one client, from handshake to EXIT --------------------------

TLS_HANDSHAKE = "tls handshake"
WAIT_HELLO = "wait hello"
WAIT_AUTH = "wait auth"
WAIT_REQUEST = "wait request"
IN_SESSION = "in session"
FINISHING = "finishing"  # last frames queued; flush, then linger for the close
DISCONNECTED = "disconnected"

LINGER_SECONDS = 5.0  # after EXIT, wait this long for the client to close first

# ssl is imported only when a listener uses TLS; until then nothing matches.
TLS_WANT_IO = ()


class Connection:
    """One client socket: frame reading and writing, handshake, and dispatch."""

    def __init__(self, daemon, sock, listener, peer_name, peer_uid=None):
        self.daemon = daemon
        self.sock = sock
        self.fd = sock.fileno()
        self.listener = listener
        self.peer_name = peer_name
        self.peer_uid = peer_uid   # unix sockets: from SO_PEERCRED
        self.token_verified = False
        self.phase = TLS_HANDSHAKE if listener.tls_context else WAIT_HELLO
        self.reader = FrameReader(MAX_PREAUTH_FRAME)
        self.out = []              # queued buffers, sent in order
        self.out_bytes = 0
        self.tls_retry = None      # TLS: a write must be retried with the same bytes
        self.session = None
        self.nonce = None
        self.stdin_outstanding = 0  # STDIN bytes received and not yet granted back
        self.stdin_payload_left = 0  # bytes of a spliced STDIN payload still in the socket
        self.spliced_ungranted = 0   # spliced STDIN bytes whose credit is not yet sent
        self.splice_stdin = SPLICE is not None and listener.tls_context is None
        self.reading = True
        self.events = 0
        self.deadline = daemon.call_later(daemon.config.handshake_timeout,
                                          self.on_handshake_timeout)
        self.linger_timer = None
        self.update_events()

    def __repr__(self):
        return "<Connection fd=%s %s %s>" % (self.fd, self.peer_name, self.phase)

    @property
    def label(self):
        if self.session is not None:
            return "session %d" % self.session.number
        return "connection from %s" % self.peer_name

    # -- selector plumbing ------------------------------------------------

    def update_events(self):
        if self.phase == DISCONNECTED:
            return
        wanted = 0
        if self.reading:
            wanted |= selectors.EVENT_READ
        if self.out or self.tls_retry is not None:
            wanted |= selectors.EVENT_WRITE
        if wanted != self.events:
            self.events = wanted
            self.daemon.watch(self.fd, wanted, self.on_event)

    def on_event(self, mask):
        if self.phase == TLS_HANDSHAKE:
            self.continue_tls_handshake()
            return
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and self.phase != DISCONNECTED:
            self.on_readable()

    def continue_tls_handshake(self):
        try:
            self.sock.do_handshake()
        except TLS_WANT_IO as e:
            self.events = 0  # force re-registration with the direction TLS wants
            wanted = selectors.EVENT_WRITE if "WRITE" in type(e).__name__.upper() else selectors.EVENT_READ
            self.daemon.watch(self.fd, wanted, self.on_event)
            self.events = wanted
            return
        except OSError as e:
            log.warning("%s: TLS handshake failed: %s", self.label, e)
            self.disconnect()
            return
        self.phase = WAIT_HELLO
        self.events = 0
        self.update_events()

    # -- reading ------------------------------------------------------------

    def on_readable(self):
        if (self.splice_stdin and self.phase == IN_SESSION
                and self.reader.at_frame_boundary()):
            try:
                if self.splice_stdin_frames():
                    return
            except ProtocolError as e:
                self.fail(str(e))
                return
        chunks = []
        try:
            chunks.append(self.sock.recv(READ_SIZE))
            # TLS may hold decrypted bytes the selector cannot see.
            while chunks[-1] and getattr(self.sock, "pending", lambda: 0)():
                chunks.append(self.sock.recv(READ_SIZE))
        except TLS_WANT_IO:
            pass
        except OSError as e:
            if io_error_kind(e) == "again":
                return
            self.on_peer_gone("connection error: %s" % e.strerror)
            return
        data = b"".join(chunks)
        if not data and chunks and chunks[-1] == b"":
            self.on_peer_gone("client closed the connection")
            return
        if self.phase == FINISHING:
            return  # after EXIT or a fatal error, input is discarded
        self.reader.feed(data)
        try:
            while self.phase not in (FINISHING, DISCONNECTED) and self.reading:
                frame = self.reader.next_frame()
                if frame is None:
                    break
                self.dispatch(*frame)
        except ProtocolError as e:
            self.fail(str(e))

    def splice_stdin_frames(self):
        """Splice consecutive large STDIN frames; return False if none was next.

        Several frames per wakeup, because each trip through the event loop
        costs more than moving the bytes of one frame.
        """
        handled = False
        self.spliced_ungranted = 0
        try:
            while self.phase == IN_SESSION:
                if not self.stdin_payload_left and not self.start_stdin_payload():
                    break
                handled = True
                if not self.continue_stdin_payload():
                    break
        finally:
            # One STDIN_WINDOW for the whole batch: a frame each costs as
            # much as the splices themselves.
            if self.spliced_ungranted:
                self.grant_stdin(self.spliced_ungranted)
        return handled

    def start_stdin_payload(self):
        """Consume the header of a large STDIN frame, leaving its payload queued.

        Returns False, having consumed nothing, for any other next frame.
        """
        try:
            header = self.sock.recv(HEADER.size, socket.MSG_PEEK)
        except OSError:
            return False  # the normal read reports it
        if len(header) < HEADER.size:
            return False
        length, frame_type = HEADER.unpack(header)
        if frame_type != STDIN or not SPLICE_MIN <= length <= self.reader.max_payload:
            return False
        self.sock.recv(HEADER.size)
        self.check_stdin_allowed(length)
        self.stdin_payload_left = length
        return True

    def continue_stdin_payload(self):
        """Move the rest of a STDIN payload to the command; True when it is done.

        Spliced straight into the stdin pipe while it has room.  When it has
        none (the command is not reading), the bytes are read into the
        StdinSink's buffer instead, within the stdin window, so the socket
        keeps moving and control frames behind the payload still arrive.
        """
        sink = self.session.stdin
        while self.stdin_payload_left:
            room = sink.splice_room()
            try:
                if room:
                    moved = SPLICE(self.fd, sink.fd, min(room, self.stdin_payload_left),
                                   flags=SPLICE_FLAGS)
                else:
                    data = self.sock.recv(min(self.stdin_payload_left, READ_SIZE))
                    moved = len(data)
            except (BlockingIOError, InterruptedError):
                return False  # EAGAIN: the rest has not arrived (the pipe has room)
            except BrokenPipeError:
                sink.close()  # EPIPE: the command closed its stdin; drop the rest
                continue
            except OSError as e:
                self.on_peer_gone("connection error: %s" % e.strerror)
                return False
            if moved == 0:
                self.on_peer_gone("client closed the connection")
                return False
            self.stdin_payload_left -= moved
            if room:
                self.session.bytes_in += moved
                self.spliced_ungranted += moved  # granted by splice_stdin_frames
            else:
                self.session.on_stdin(data)
        return True

    def on_peer_gone(self, reason):
        if self.phase == FINISHING:
            log.debug("%s: closed by the client after the last frame", self.label)
        elif self.session is not None:
            log.info("%s: %s", self.label, reason)
            self.session.hang_up(reason)
        else:
            log.info("%s: %s during the handshake", self.label, reason)
        self.disconnect()

    # -- dispatch by phase --------------------------------------------------

    def dispatch(self, frame_type, payload):
        name = FRAME_NAMES.get(frame_type)
        if name is None:
            raise ProtocolError("unknown frame type 0x%02x" % frame_type)
        if frame_type == ERROR:
            message = decode_json(payload).get("message")
            log.warning("%s: client reported an error: %s", self.label, message)
            self.on_peer_gone("client reported an error")
            return
        handler = {
            WAIT_HELLO: {HELLO: self.on_hello},
            WAIT_AUTH: {AUTH: self.on_auth},
            WAIT_REQUEST: {REQUEST: self.on_request},
            IN_SESSION: {STDIN: self.on_stdin, STDIN_EOF: self.on_stdin_eof,
                         SIGNAL: self.on_signal, WINSIZE: self.on_winsize,
                         OUTPUT_CLOSED: self.on_output_closed},
        }[self.phase].get(frame_type)
        if handler is None:
            raise ProtocolError("unexpected %s frame (%s)" % (name, self.phase))
        handler(payload)

    def on_hello(self, payload):
        hello = decode_json(payload)
        version = hello.get("protocol")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                "protocol version mismatch: the client (%s) speaks version %r and "
                "this daemon (execd %s) speaks version %d; use execc.py and "
                "execd.py from the same release"
                % (hello.get("program", "unknown"), version, VERSION, PROTOCOL_VERSION))
        reply = {"protocol": PROTOCOL_VERSION, "program": "execd " + VERSION,
                 "auth": "none", "stdin_window": STDIN_WINDOW_BYTES,
                 "max_frame": self.daemon.config.max_frame}
        if self.listener.token is not None:
            self.nonce = os.urandom(NONCE_BYTES)
            reply.update(auth="token", nonce=self.nonce.hex())
            self.phase = WAIT_AUTH
        else:
            self.authenticated()
        self.send_json(HELLO, reply)

    def on_auth(self, payload):
        auth = decode_json(payload)
        try:
            client_nonce = bytes.fromhex(auth.get("nonce", ""))
            client_mac = bytes.fromhex(auth.get("mac", ""))
        except (TypeError, ValueError):
            raise ProtocolError("invalid AUTH frame: nonce and mac must be hex strings")
        if len(client_nonce) != NONCE_BYTES:
            raise ProtocolError("invalid AUTH frame: the nonce must be %d bytes" % NONCE_BYTES)
        token = self.listener.token
        expected = hmac.new(token, CLIENT_MAC_LABEL + self.nonce + client_nonce,
                            hashlib.sha256).digest()
        if not hmac.compare_digest(expected, client_mac):
            self.reject_token()
            return
        self.daemon.auth_succeeded(self.peer_host())
        self.token_verified = True
        proof = hmac.new(token, DAEMON_MAC_LABEL + self.nonce + client_nonce,
                         hashlib.sha256).hexdigest()
        self.authenticated()
        self.send_json(AUTH_OK, {"mac": proof})

    def reject_token(self):
        """Reply to a wrong token after a delay that grows per source address."""
        host = self.peer_host()
        delay = self.daemon.auth_failed(host)
        log.warning("%s: authentication failed (wrong token); replying in %.2f s",
                    self.label, delay)
        self.reading = False
        self.update_events()
        self.daemon.call_later(delay, lambda: self.fail(
            "authentication failed: the token does not match the daemon's; "
            "check --token-file", log_it=False))

    def peer_host(self):
        return self.peer_name.rsplit(":", 1)[0]

    def authenticated(self):
        self.phase = WAIT_REQUEST
        self.reader.max_payload = self.daemon.config.max_frame
        self.daemon.unauthenticated.discard(self)

    def on_request(self, payload):
        request = validate_request(decode_json(payload))
        self.deadline.cancel()
        config = self.daemon.config
        if len(self.daemon.sessions) >= config.max_sessions:
            raise ProtocolError("too many sessions: the daemon runs %d, its "
                                "--max-sessions" % config.max_sessions)
        plan = self.daemon.launch_plan(request, self)
        self.session = Session(self.daemon, self, self.daemon.next_session_number(),
                               request)
        self.phase = IN_SESSION
        self.daemon.sessions.add(self.session)
        try:
            self.session.start(plan)
        except OSError as e:
            self.daemon.sessions.discard(self.session)
            self.session.abandon_start()
            log.error("%s: cannot start the command: %s", self.label, e)
            self.session = None  # it never ran: there is nothing to hang up
            self.fail("cannot start the command: %s" % e.strerror, log_it=False)

    def on_stdin(self, payload):
        self.check_stdin_allowed(len(payload))
        self.session.on_stdin(payload)

    def check_stdin_allowed(self, length):
        """Count a STDIN payload against the window; reject one out of order."""
        self.stdin_outstanding += length
        if self.stdin_outstanding > STDIN_WINDOW_BYTES:
            raise ProtocolError("STDIN exceeds the window of %d bytes" % STDIN_WINDOW_BYTES)
        if self.session.stdin.eof_requested:
            raise ProtocolError("STDIN after STDIN_EOF")

    def on_stdin_eof(self, payload):
        if self.session.stdin.eof_requested:
            raise ProtocolError("a second STDIN_EOF")
        self.session.on_stdin_eof()

    def on_signal(self, payload):
        name = decode_json(payload).get("signal")
        if not isinstance(name, str):
            raise ProtocolError("invalid SIGNAL frame: \"signal\" must be a name such as \"TERM\"")
        self.session.forward_signal(name)

    def on_winsize(self, payload):
        size = decode_json(payload)
        rows, cols = size.get("rows"), size.get("cols")
        if not (valid_dimension(rows) and valid_dimension(cols)):
            raise ProtocolError("invalid WINSIZE frame: rows and cols must be 0-65535")
        self.session.set_window_size(rows, cols)

    def on_output_closed(self, payload):
        stream = decode_json(payload).get("stream")
        if stream not in ("stdout", "stderr"):
            raise ProtocolError("invalid OUTPUT_CLOSED frame: stream must be stdout or stderr")
        self.session.on_output_closed(stream)

    def on_handshake_timeout(self):
        if self.phase in (TLS_HANDSHAKE, WAIT_HELLO, WAIT_AUTH, WAIT_REQUEST):
            self.fail("handshake timed out after %g s" % self.daemon.config.handshake_timeout)

    # -- writing ------------------------------------------------------------

    def send_frame(self, frame_type, payload=b""):
        if self.phase in (FINISHING, DISCONNECTED):
            return
        self.out.append(HEADER.pack(len(payload), frame_type))
        if payload:
            self.out.append(payload)
        self.out_bytes += HEADER.size + len(payload)
        self.flush()

    def send_json(self, frame_type, obj):
        self.send_frame(frame_type, encode_json(obj))

    def send_error(self, message, fatal):
        self.send_json(ERROR, {"message": message, "fatal": fatal})

    def grant_stdin(self, count):
        self.stdin_outstanding -= count
        self.send_frame(STDIN_WINDOW, WINDOW.pack(count))

    def flush(self):
        """Send as much queued output as the socket takes without blocking."""
        try:
            while self.out or self.tls_retry is not None:
                sent = self.send_some()
                if sent is None:
                    break
        except OSError as e:
            if io_error_kind(e) != "again":
                self.on_peer_gone("send failed: %s" % e.strerror)
                return
        if self.session is not None and self.out_bytes < OUTPUT_LOW_WATER:
            self.session.on_client_drained()
        if not self.out and self.tls_retry is None and self.phase == FINISHING:
            self.start_linger()
        self.update_events()

    def send_some(self):
        """Send one batch; return the byte count, or None when it would block."""
        if isinstance(self.out[0], PipePayload):
            return self.splice_some()
        if self.listener.tls_context is None:
            batch = []
            for item in self.out[:64]:
                if isinstance(item, PipePayload):
                    break  # spliced next time round, after these bytes
                batch.append(item)
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return None
        else:
            # TLS: a write that would block must be retried with the same
            # bytes, so the batch is joined once and kept in tls_retry.
            if self.tls_retry is None:
                self.tls_retry = b"".join(self.out[:64])
            try:
                sent = self.sock.send(self.tls_retry)
            except TLS_WANT_IO:
                return None
            self.tls_retry = None
        self.consume(sent)
        return sent

    def splice_some(self):
        """Move the head PipePayload's bytes from the pipe into the socket."""
        payload = self.out[0]
        try:
            sent = SPLICE(payload.fd, self.fd, payload.remaining, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return None  # EAGAIN: the socket is full (the pipe holds the bytes)
        if sent == 0:
            raise OSError(errno.EIO, "splice moved nothing from a pipe holding data")
        payload.remaining -= sent
        self.out_bytes -= sent
        if payload.remaining == 0:
            del self.out[0]
            payload.on_sent()
        return sent

    def replace_payload(self, payload, data):
        """Put data in place of a PipePayload whose fd is about to close."""
        for index, item in enumerate(self.out):
            if item is payload:
                self.out[index] = data
                return

    def consume(self, sent):
        self.out_bytes -= sent
        while sent:
            first = self.out[0]
            if len(first) <= sent:
                sent -= len(first)
                del self.out[0]
            else:
                self.out[0] = memoryview(first)[sent:]
                sent = 0

    # -- ending -------------------------------------------------------------

    def fail(self, message, log_it=True):
        """Send a fatal ERROR frame and close after it."""
        if self.phase in (FINISHING, DISCONNECTED):
            return
        if log_it:
            log.warning("%s: %s", self.label, message)
        self.send_error(message, fatal=True)
        if self.session is not None:
            self.session.hang_up(message)
        self.finish()

    def finish(self):
        """Close once the queued frames are sent (after EXIT or a fatal ERROR)."""
        if self.phase in (FINISHING, DISCONNECTED):
            return
        self.deadline.cancel()
        self.daemon.unauthenticated.discard(self)
        self.phase = FINISHING
        self.reading = True
        self.flush()

    def start_linger(self):
        """Half-close and wait for the client's close before ours.

        Closing a TCP socket with unread input makes the kernel send RST,
        which can destroy the EXIT frame still waiting in the client's
        receive buffer.  Reading until the client closes avoids that.
        """
        if self.linger_timer is not None:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            io_error_kind(e)  # ENOTCONN/EPIPE: the client already closed
        self.linger_timer = self.daemon.call_later(LINGER_SECONDS, self.disconnect)

    def disconnect(self):
        if self.phase == DISCONNECTED:
            return
        self.phase = DISCONNECTED
        self.deadline.cancel()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        self.daemon.unauthenticated.discard(self)
        self.daemon.connections.discard(self)
        if self.events:
            self.daemon.unwatch(self.fd)
        self.sock.close()
        self.out = []


def valid_dimension(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535


def valid_text(value):
    return isinstance(value, str) and "\0" not in value


def validate_request(request):
    """Check a REQUEST frame's fields; raise ProtocolError naming the bad one."""
    argv = request.get("argv")
    if not isinstance(argv, list) or not all(valid_text(arg) for arg in argv):
        raise ProtocolError("invalid request: argv must be a list of strings without NUL")
    env = request.get("env") or {}
    if not isinstance(env, dict):
        raise ProtocolError("invalid request: env must be an object")
    for key, value in env.items():
        if not key or "=" in key or not valid_text(key) or not valid_text(value):
            raise ProtocolError("invalid request: environment entry %r: expected "
                                "a non-empty name without '=' and a string value" % key)
    tty = request.get("tty", False)
    if not isinstance(tty, bool):
        raise ProtocolError("invalid request: tty must be true or false")
    if not argv and not tty:
        raise ProtocolError("invalid request: argv is empty (a login shell needs tty)")
    if argv and not argv[0]:
        raise ProtocolError("invalid request: argv[0], the command, is an empty string")
    for field in ("cwd", "term", "user", "group"):
        value = request.get(field)
        if value is not None and not (valid_text(value) and value):
            raise ProtocolError("invalid request: %s must be a non-empty string" % field)
    rows, cols = request.get("rows", 24), request.get("cols", 80)
    if not (valid_dimension(rows) and valid_dimension(cols)):
        raise ProtocolError("invalid request: rows and cols must be integers 0-65535")
    return {"argv": argv, "env": env, "cwd": request.get("cwd"), "tty": tty,
            "rows": rows, "cols": cols, "term": request.get("term"),
            "user": request.get("user"), "group": request.get("group")}


# --- Listening sockets --------------------------------------------------------

class Listener:
    """A listening socket; pauses after EMFILE instead of spinning."""

    def __init__(self, daemon, address, sock, token=None, tls_context=None):
        self.daemon = daemon
        self.address = address
        self.sock = sock
        self.token = token              # bytes for TCP listeners, else None
        self.tls_context = tls_context
        self.unlink_path = address[1] if address[0] == "unix" else None

    def __repr__(self):
        return "<Listener %s fd=%d>" % (format_address(self.address), self.sock.fileno())

    def watch(self):
        self.daemon.watch(self.sock.fileno(), selectors.EVENT_READ, self.on_readable)

    def on_readable(self, mask):
        for _ in range(64):  # a batch, so one busy listener cannot starve the rest
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the pending connection
                    # stays queued, so the listener would be ready again at
                    # once.  Pause it instead of spinning, and retry later.
                    log.error("accept on %s failed: %s; pausing %g s",
                              format_address(self.address), e.strerror, ACCEPT_BACKOFF)
                    self.daemon.unwatch(self.sock.fileno())
                    self.daemon.call_later(ACCEPT_BACKOFF, self.resume)
                    return
                # ECONNABORTED and the like: that one client has gone.
                log.warning("accept on %s failed: %s", format_address(self.address), e.strerror)
                continue
            self.daemon.accept(self, sock, peer)

    def resume(self):
        if not self.daemon.stopping:
            self.watch()

    def close(self):
        self.daemon.unwatch(self.sock.fileno())
        self.sock.close()
        if self.unlink_path is not None:
            try:
                os.unlink(self.unlink_path)
            except OSError as e:
                log.warning("cannot remove %s: %s", self.unlink_path, e.strerror)


def check_socket_directory(directory, must_be_private):
    """Reject a socket directory that someone else could plant a socket in."""
    st = os.stat(directory)
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError("%s is owned by uid %d, not by you (uid %d); choose a "
                          "directory you own" % (directory, st.st_uid, os.getuid()))
    if must_be_private and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise ConfigError("%s must be owned by you and writable only by you "
                          "(mode %o); remove it or run: chmod 700 %s"
                          % (directory, stat.S_IMODE(st.st_mode), directory))
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError("%s is writable by others without the sticky bit, so "
                          "anyone could replace the socket; choose a private "
                          "directory" % directory)


def remove_stale_socket(path):
    """Remove a socket left by a daemon that is gone; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("%s exists and is not a socket; remove it or choose another path" % path)
    if st.st_uid != os.getuid():
        raise ConfigError("%s is a socket owned by uid %d, not by you; refusing "
                          "to replace it" % (path, st.st_uid))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # ECONNREFUSED: no daemon listens, so it is stale
        return
    finally:
        probe.close()
    raise ConfigError("another daemon is already listening on %s" % path)


def bind_unix(path, is_default, group_id):
    directory = os.path.dirname(os.path.abspath(path))
    if is_default and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
    check_socket_directory(directory, must_be_private=is_default and group_id is None)
    if is_default and group_id is not None:
        os.chmod(directory, 0o710)  # the group may reach the socket, not list or write
        os.chown(directory, -1, group_id)
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is never, even briefly, open to others
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    if group_id is not None:
        os.chown(path, -1, group_id)
        os.chmod(path, 0o660)
    sock.listen(128)
    sock.setblocking(False)
    return [sock]


def bind_tcp(host, port):
    sockets = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError("cannot resolve %r: %s" % (host, e.strerror))
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            sock.close()
            for other in sockets:
                other.close()
            raise ConfigError("cannot listen on %s port %d: %s" % (sockaddr[0], port, e.strerror))
        sock.listen(128)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def read_token_file(path):
    """Read a token file that only its owner may read; return its bytes."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError("cannot read token file %s: %s" % (path, e.strerror))
    if st.st_mode & 0o077:
        raise ConfigError("token file %s is accessible by group or others (mode %o); "
                          "run: chmod 600 %s" % (path, stat.S_IMODE(st.st_mode), path))
    if len(token) < 16:
        raise ConfigError("token file %s is too short (%d bytes); use at least 16, for example: "
                          "head -c 32 /dev/urandom | base64 > %s" % (path, len(token), path))
    return token


def make_tls_context(cert, key):
    global TLS_WANT_IO
    import ssl  # only here: a host without the ssl module runs everything else
    TLS_WANT_IO = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("cannot load --tls-cert %s / --tls-key %s: %s" % (cert, key, e))
    return context


def peer_credentials(sock):
    """Return (pid, uid, gid) of a unix socket peer (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def peer_in_group(pid, uid, gid, group_id):
    """Return True if the peer process has group_id as its gid or a supplementary group."""
    if gid == group_id:
        return True
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(group_id) in line.split()[1:]
    except OSError:
        pass  # no /proc: fall back to the group database
    try:
        name = pwd.getpwuid(uid).pw_name
        return name in grp.getgrgid(group_id).gr_mem
    except KeyError:
        return False


# --- The daemon: one selector loop for everything --------------------------

class Daemon:
    """The event loop, the timers, and the tables of connections and sessions."""

    def __init__(self, config):
        self.config = config
        self.selector = selectors.DefaultSelector()
        self.timers = []
        self.listeners = []
        self.connections = set()
        self.unauthenticated = set()
        self.sessions = set()          # sessions not yet CLOSED
        self.children = {}             # pid -> Session, until reaped
        self.auth_failures = {}        # host -> (count, monotonic time of last)
        self.session_counter = 0
        self.stopping = False
        self.stop_deadline = None
        self.wakeup_read = None
        self.loop_pass = 0             # counts event loop passes
        self.process_scan = (None, None)  # (loop pass, scan_sessions() result)

    # -- selector and timers ---------------------------------------------

    def watch(self, fd, events, callback):
        """Register fd for events with callback(mask), or change its events."""
        if not events:
            self.unwatch(fd)
            return
        try:
            self.selector.modify(fd, events, callback)
        except KeyError:
            self.selector.register(fd, events, callback)

    def unwatch(self, fd):
        try:
            self.selector.unregister(fd)
        except KeyError:
            pass  # not registered: nothing to do

    def call_later(self, delay, callback):
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self.timers, timer)
        return timer

    def run_due_timers(self):
        """Run the timers that are due; return the select timeout until the next."""
        while self.timers:
            timer = self.timers[0]
            if timer.cancelled:
                heapq.heappop(self.timers)
                continue
            delay = timer.when - time.monotonic()
            if delay > 0:
                return delay
            heapq.heappop(self.timers)
            try:
                timer.callback()
            except Exception:
                log.exception("internal error in timer %r; continuing", timer.callback)
        return None

    # -- the loop ------------------------------------------------------------

    def serve_forever(self):
        """Run until stopped and every session is over.  The only select()."""
        while not self.finished():
            self.loop_pass += 1
            timeout = self.run_due_timers()
            if self.finished():
                break  # a timer ended the last session, and select() might never return
            for key, mask in self.selector.select(timeout):
                # An earlier callback in this batch may have unregistered or
                # replaced this fd, and then the event is stale.
                if self.selector.get_map().get(key.fd) is key:
                    self.dispatch(key, mask)
        log.info("stopped")
        return 0

    def dispatch(self, key, mask):
        """Run one callback; a bug in it is logged, never fatal to the daemon."""
        try:
            key.data(mask)
        except Exception:
            log.exception("internal error in %r; continuing", key.data)
            self.unwatch(key.fd)  # else a level-triggered fd fails again on every pass

    def finished(self):
        if not self.stopping:
            return False
        if time.monotonic() > self.stop_deadline:
            return True
        return not self.sessions and not any(c.out for c in self.connections)

    # -- signals -------------------------------------------------------------

    def install_signal_handlers(self):
        """Route SIGCHLD, SIGTERM, SIGINT and SIGHUP into the loop.

        Python runs a handler only between bytecodes and restarts select()
        after it (PEP 475), so a handler alone would not wake the loop.  The
        wakeup fd makes the C-level handler write the signal number to a
        socket the loop watches.  The Python handlers do nothing, but one must
        be installed: with SIG_DFL there is no C handler and no wakeup byte.
        """
        self.wakeup_read, wakeup_write = socket.socketpair()
        for sock in (self.wakeup_read, wakeup_write):
            sock.setblocking(False)
        self.wakeup_write = wakeup_write  # kept open for the daemon's life
        try:
            # A burst of SIGCHLDs can fill the socket; the loop reaps them all
            # in one waitpid loop anyway, so a lost byte is harmless.
            signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        except TypeError:  # Python 3.6 has no warn_on_full_buffer
            signal.set_wakeup_fd(wakeup_write.fileno())
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, lambda signum, frame: None)
        self.watch(self.wakeup_read.fileno(), selectors.EVENT_READ, self.on_signals)

    def on_signals(self, mask):
        try:
            numbers = self.wakeup_read.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        for number in sorted(set(numbers)):
            if number == signal.SIGCHLD:
                self.reap_children()
            elif number in (signal.SIGTERM, signal.SIGINT):
                self.stop(number)
            elif number == signal.SIGHUP:
                reopen_log(self.config)

    def reap_children(self):
        """Reap every exited child; SIGCHLDs coalesce, so loop until none."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # ECHILD: no children at all
            if pid == 0:
                return  # children remain, none has exited
            session = self.children.get(pid)
            if session is None:
                log.warning("reaped pid %d, which belongs to no session: %s",
                            pid, describe_status(status))
                continue
            session.on_child_exit(status)

    def stop(self, number):
        if self.stopping:
            log.info("second SIG%s: killing every session now", signal_name(number))
            for session in list(self.sessions):
                session.signal_session(signal.SIGKILL)
            self.stop_deadline = time.monotonic()
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.config.hangup_grace + 1.0
        # A timer wakes select() at the deadline, because nothing else may
        # when a process cannot be killed (uninterruptible sleep).
        self.call_later(self.config.hangup_grace + 1.0, lambda: None)
        log.info("SIG%s: stopping: %d sessions to hang up", signal_name(number),
                 len(self.sessions))
        for listener in self.listeners:
            listener.close()
        for connection in list(self.connections):
            connection.fail("the daemon is stopping", log_it=False)

    # -- connections -----------------------------------------------------------

    def accept(self, listener, sock, peer):
        sock.setblocking(False)
        peer_uid = None
        if listener.address[0] == "unix":
            pid, peer_uid, peer_gid = peer_credentials(sock)
            refusal = self.check_unix_peer(pid, peer_uid, peer_gid)
            peer_name = "pid %d uid %d" % (pid, peer_uid)
            if refusal:
                log.warning("rejected %s: %s", peer_name, refusal)
                self.reject(sock, refusal)
                return
        else:
            peer_name = format_address(("tcp", peer[0], peer[1]))
            configure_tcp(sock, self.config.keepalive)
        if self.stopping:
            self.reject(sock, "the daemon is stopping")
            return
        if len(self.unauthenticated) >= self.config.max_unauthenticated:
            log.warning("rejected %s: %d connections are already in their handshake "
                        "(--max-unauthenticated)", peer_name, len(self.unauthenticated))
            self.reject(sock, "too many connections in their handshake; try again")
            return
        if listener.tls_context is not None:
            sock = listener.tls_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
        connection = Connection(self, sock, listener, peer_name, peer_uid)
        self.connections.add(connection)
        self.unauthenticated.add(connection)
        log.debug("accepted %s on %s", peer_name, format_address(listener.address))

    def check_unix_peer(self, pid, uid, gid):
        """Return why a unix socket peer may not connect, or None if it may."""
        if uid in (os.getuid(), 0):
            return None
        group_id = self.config.socket_group_id
        if group_id is not None and peer_in_group(pid, uid, gid, group_id):
            return None
        return ("permission denied: uid %d is neither the daemon's user (uid %d), "
                "root, nor in its --socket-group" % (uid, os.getuid()))

    def reject(self, sock, message):
        """Best-effort fatal ERROR to a peer that gets no Connection, then close.

        NOTE: on TCP, a HELLO that arrives after this close draws a reset,
        which can discard the ERROR before the client reads it.  The client
        then reports a lost connection instead of this message.
        """
        try:
            sock.send(frame_bytes(ERROR, encode_json({"message": message, "fatal": True})))
        except OSError as e:
            io_error_kind(e)  # the peer has gone or its buffer is full: just close
        sock.close()

    def auth_failed(self, host):
        """Count a failed token from host; return the delay before the reply."""
        now = time.monotonic()
        count, last = self.auth_failures.get(host, (0, now))
        if now - last > AUTH_FAILURE_MEMORY:
            count = 0
        self.auth_failures[host] = (count + 1, now)
        if len(self.auth_failures) > 10000:  # bound the table under a scan
            oldest = sorted(self.auth_failures.items(), key=lambda item: item[1][1])
            for stale_host, _ in oldest[:5000]:
                del self.auth_failures[stale_host]
        return min(AUTH_DELAY_CAP, AUTH_DELAY_BASE * 2 ** count)

    def auth_succeeded(self, host):
        self.auth_failures.pop(host, None)

    # -- sessions ------------------------------------------------------------

    def next_session_number(self):
        self.session_counter += 1
        return self.session_counter

    def session_members(self, session_id):
        """Return the live pids in a session, or None without /proc.

        One scan of /proc serves a whole loop pass: hanging up 500 sessions
        at once then costs one scan, not 500.
        """
        scanned_in, sessions = self.process_scan
        if scanned_in != self.loop_pass:
            sessions = scan_sessions()
            self.process_scan = (self.loop_pass, sessions)
        return None if sessions is None else sessions.get(session_id, [])

    def forget_session(self, session):
        self.sessions.discard(session)

    def launch_plan(self, request, connection):
        """Turn a validated request into a LaunchPlan, checking user switches."""
        user = resolve_user(request, connection)
        account = pwd.getpwuid(user[1]) if user else daemon_account()
        argv = request["argv"]
        if argv:
            executable = argv[0]
        else:
            # No command: the login shell, named with a leading "-" as login(1) does.
            executable = account.pw_shell or "/bin/sh"
            argv = ["-" + os.path.basename(executable)]
        # A missing home directory means "/" for both, as login(1) does it.
        home = account.pw_dir if os.path.isdir(account.pw_dir) else "/"
        env = dict(os.environ)
        if request["tty"]:
            env["TERM"] = request["term"] or "dumb"
        if user is not None or not request["argv"]:
            env.update(HOME=home, USER=account.pw_name,
                       LOGNAME=account.pw_name, SHELL=account.pw_shell or "/bin/sh")
        env.update(request["env"])
        cwd = request["cwd"]
        if cwd is None:
            cwd = home
        return LaunchPlan(os.fsencode(executable), [os.fsencode(arg) for arg in argv],
                          {os.fsencode(k): os.fsencode(v) for k, v in env.items()},
                          os.fsencode(cwd), user)


def daemon_account():
    try:
        return pwd.getpwuid(os.getuid())
    except KeyError:  # a uid with no passwd entry, common in containers
        return pwd.struct_passwd(("uid%d" % os.getuid(), "x", os.getuid(), os.getgid(),
                                  "", os.environ.get("HOME", "/"), "/bin/sh"))


def resolve_user(request, connection):
    """Return (name, uid, gid) for --user/--group, or None to stay as we are.

    Switching is honoured only for a root daemon, and only for a root peer on
    a unix socket or a token-authenticated TCP peer.  Anything else is an
    error, never a silent run as the daemon's user.
    """
    user_name, group_name = request["user"], request["group"]
    if user_name is None and group_name is None:
        return None
    try:
        account = pwd.getpwnam(user_name) if user_name else daemon_account()
    except KeyError:
        raise ProtocolError("unknown user %r on the daemon's host" % user_name)
    try:
        gid = grp.getgrnam(group_name).gr_gid if group_name else account.pw_gid
    except KeyError:
        raise ProtocolError("unknown group %r on the daemon's host" % group_name)
    if account.pw_uid == os.getuid() and gid == os.getgid():
        return None  # already that user and group: nothing to switch
    if os.geteuid() != 0:
        raise ProtocolError("cannot run as user %r group %r: the daemon runs as uid %d, "
                            "and only a root daemon can switch users"
                            % (account.pw_name, group_name or account.pw_gid, os.getuid()))
    if connection.peer_uid != 0 and not connection.token_verified:
        raise ProtocolError("cannot run as another user or group: only root or a "
                            "token-authenticated client may ask for --user/--group")
    return (account.pw_name, account.pw_uid, gid)


def configure_tcp(sock, keepalive):
    """Turn on TCP keepalive so a peer that vanished is noticed in bounded time.

    The kernel probes after `keepalive` idle seconds, then every keepalive/3
    seconds, and drops the connection after 3 unanswered probes.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", keepalive),
                          ("TCP_KEEPINTVL", max(1, keepalive // 3)),
                          ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux names; macOS has only some
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


# --- Start-up -------------------------------------------------------------------

def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid integer %r" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("invalid value %r: must be at least 1" % text)
    return value


def positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid number of seconds %r" % text)
    if not value > 0:
        raise argparse.ArgumentTypeError("invalid value %r: must be above 0" % text)
    return value


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message):
        self.exit(2, "execd.py: error: %s (see execd.py --help)\n" % message)


def parse_args(argv):
    """Parse the command line; one statement per option, hence the length."""
    parser = OneLineParser(
        prog="execd.py",
        description="Run commands for execc clients over a unix socket or TCP.",
        epilog="Default socket: $EXECD_SOCKET, else $XDG_RUNTIME_DIR/execd/execd.sock, "
               "else /tmp/execd-UID/execd.sock (now: %s).  SIGTERM or SIGINT stops the "
               "daemon: it hangs up every session and exits 0.  SIGHUP reopens "
               "--log-file." % default_socket_path())
    parser.add_argument("--listen", action="append", metavar="ADDR", default=[],
                        help="where to listen, repeatable: unix:PATH, a path containing "
                             "'/', HOST:PORT or [V6ADDR]:PORT (TCP needs --token-file)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="shared secret for TCP clients; mode 600, at least 16 bytes")
    parser.add_argument("--socket-group", metavar="GROUP",
                        help="also let members of GROUP use unix sockets (mode 0660); "
                             "they can then run anything as the daemon's user")
    parser.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM) for TCP")
    parser.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM) for TCP")

    parser.add_argument("--max-frame", type=positive_int, default=DEFAULT_MAX_FRAME,
                        metavar="BYTES", help="max frame payload after authentication, "
                        "at least 65536 (default: %(default)s)")
    parser.add_argument("--max-sessions", type=positive_int, default=1024, metavar="N",
                        help="max concurrent sessions (default: %(default)s)")
    parser.add_argument("--max-unauthenticated", type=positive_int, default=64, metavar="N",
                        help="max connections still in their handshake (default: %(default)s)")
    parser.add_argument("--handshake-timeout", type=positive_seconds, default=10.0,
                        metavar="SECONDS", help="time a client has from connect to "
                        "its request (default: %(default)s)")
    parser.add_argument("--hangup-grace", type=positive_seconds, default=5.0,
                        metavar="SECONDS", help="after SIGHUP to a session whose client "
                        "has gone, wait this long before SIGKILL (default: %(default)s)")
    parser.add_argument("--keepalive", type=positive_int, default=30, metavar="SECONDS",
                        help="TCP keepalive idle time; a vanished peer is dropped about "
                        "2x this later (default: %(default)s)")

    parser.add_argument("--log-file", metavar="FILE", help="log here instead of stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (debug: every state change)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--version", action="version", version="execd %s (protocol %d)"
                        % (VERSION, PROTOCOL_VERSION))

    config = parser.parse_args(argv)
    if config.max_frame < READ_SIZE:
        parser.error("--max-frame %d is too small: use at least %d" % (config.max_frame, READ_SIZE))
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key go together: give both or neither")
    try:
        config.addresses = [parse_address(text) for text in config.listen]
    except ValueError as e:
        parser.error(str(e))
    config.default_address = not config.addresses
    if config.default_address:
        config.addresses = [("unix", default_socket_path())]
    if any(a[0] == "tcp" for a in config.addresses) and not config.token_file:
        tcp = next(a for a in config.addresses if a[0] == "tcp")
        parser.error("--listen %s is a TCP address and needs --token-file FILE; create "
                     "one with: head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE"
                     % format_address(tcp))
    config.socket_group_id = None
    if config.socket_group:
        try:
            config.socket_group_id = grp.getgrnam(config.socket_group).gr_gid
        except KeyError:
            parser.error("unknown --socket-group %r" % config.socket_group)
    return config


LOG_FORMAT = "%(asctime)s execd[%(process)d]: %(levelname)s: %(message)s"


def setup_logging(config):
    """Set the level and open the destination; raise ConfigError if it cannot open."""
    level = logging.INFO
    if config.quiet:
        level = logging.WARNING
    if config.verbose:
        level = logging.DEBUG
    log.setLevel(level)
    error = reopen_log(config)
    if error is not None:
        raise ConfigError(error)


def reopen_log(config):
    """Open (or, after SIGHUP, reopen) the log destination."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    error = None
    handler = logging.StreamHandler(sys.stderr)
    if config.log_file:
        try:
            handler = logging.FileHandler(config.log_file)
        except OSError as e:
            error = "cannot open --log-file %s: %s" % (config.log_file, e.strerror)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(handler)
    log.propagate = False
    if error is not None:
        log.error("%s; logging to stderr", error)
    return error


def ensure_standard_fds():
    """Open /dev/null on any of fds 0-2 that is closed.

    Otherwise os.pipe() could return fd 0, 1 or 2, and the dup2() calls that
    set up a child's stdio would overwrite one pipe end with another.
    """
    for fd in (STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free fd: this one


def open_listeners(daemon, config):
    token = read_token_file(config.token_file) if config.token_file else None
    tls_context = make_tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
    for address in config.addresses:
        if address[0] == "unix":
            sockets = bind_unix(address[1], config.default_address, config.socket_group_id)
            listener_token, listener_tls = None, None
        else:
            sockets = bind_tcp(address[1], address[2])
            listener_token, listener_tls = token, tls_context
            if tls_context is None and not is_loopback(address[1]):
                log.warning("%s is not a loopback address and TLS is off: commands and "
                            "output cross the network in clear (use --tls-cert/--tls-key)",
                            format_address(address))
        for sock in sockets:
            listener = Listener(daemon, address, sock, listener_token, listener_tls)
            daemon.listeners.append(listener)
            listener.watch()
            log.info("listening on %s", format_address(address)
                     if address[0] == "unix" else format_address(("tcp",) + sock.getsockname()[:2]))


def main(argv=None):
    config = parse_args(argv)
    try:
        setup_logging(config)
    except ConfigError:
        return 1  # already logged to stderr, as one line
    ensure_standard_fds()
    daemon = Daemon(config)
    try:
        daemon.install_signal_handlers()
        open_listeners(daemon, config)
    except (ConfigError, OSError) as e:
        for listener in daemon.listeners:
            listener.close()
        message = str(e) if isinstance(e, ConfigError) else "%s: %s" % (
            e.filename or "start-up", e.strerror)
        log.error("%s", message)
        return 1
    return daemon.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
