"""Black-box tests for execd.py and execc.py: real daemons, sockets, ptys and signals.

Every test starts its own daemon on a temporary unix socket (or on 127.0.0.1
with a token), runs execc.py as a subprocess, and kills only the processes it
started.  An autouse fixture bounds every test with SIGALRM.

Run: python3 -m pytest -q
"""

import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXECD = os.path.join(HERE, "execd.py")
EXECC = os.path.join(HERE, "execc.py")
PYTHON = sys.executable
TEST_TIME_LIMIT = 120  # seconds for any one test, enforced by SIGALRM


# --- Harness ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def time_limit():
    """Fail a test that runs longer than TEST_TIME_LIMIT instead of hanging CI."""
    def expire(signum, frame):
        raise TimeoutError("test exceeded %d s" % TEST_TIME_LIMIT)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIME_LIMIT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class Daemon:
    """An execd.py process on a private unix socket (plus any extra --listen)."""

    def __init__(self, directory, *extra_args, python=PYTHON, listen_unix=True, env=None):
        self.directory = str(directory)
        self.socket = os.path.join(self.directory, "execd.sock")
        self.destination = "unix:" + self.socket
        argv = [python, EXECD] + (["--listen", self.destination] if listen_unix else [])
        argv += list(extra_args)
        self.lines = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env)
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        # The reader sets ready at the "listening on" line, or at end of file
        # when the daemon exits during start-up; the poll() tells them apart.
        if not self.ready.wait(20) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("execd did not start:\n" + self.log)
        self.pid = self.proc.pid

    def _read_log(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if "listening on" in line:
                self.ready.set()
        self.ready.set()

    @property
    def log(self):
        return "".join(self.lines)

    def wait_for_log(self, pattern, timeout=10):
        """Wait until a log line matches the regex pattern; return the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            time.sleep(0.02)
        raise AssertionError("no log line matches %r; log:\n%s" % (pattern, self.log))

    def tcp_port(self):
        match = self.wait_for_log(r"listening on (?:127\.0\.0\.1|\[::1\]):(\d+)")
        return int(match.group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(5)
        self.proc.stderr.close()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


def execc(daemon, *command, options=(), input=None, timeout=60, python=PYTHON,
          env=None, **kwargs):
    """Run execc.py with options, destination and command; return CompletedProcess."""
    argv = [python, EXECC] + list(options) + [daemon.destination, "--"] + list(command)
    return subprocess.run(argv, input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, env=env, **kwargs)


class Terminal:
    """A process on a real pty, as a user's terminal would run it."""

    def __init__(self, argv, rows=24, cols=80, env=None):
        import fcntl
        import struct
        import termios
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                if env is not None:
                    os.execvpe(argv[0], argv, env)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.output = b""
        self.status = None

    def write(self, data):
        os.write(self.fd, data)

    def read_until(self, pattern, timeout=10):
        """Read until the output matches the bytes regex pattern; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read_some(remaining):
                raise AssertionError("no match for %r in %r" % (pattern, self.output[-2000:]))

    def _read_some(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            return False  # EIO: the process on the pty has exited
        self.output += data
        return bool(data)

    def wait(self, timeout=20):
        """Read everything to EOF and return the exit status (128+n on signal n)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read_some(deadline - time.monotonic()):
            pass
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = (128 + os.WTERMSIG(status) if os.WIFSIGNALED(status)
                               else os.WEXITSTATUS(status))
                os.close(self.fd)
                return self.status
            time.sleep(0.02)
        self.kill()
        raise AssertionError("process on the pty did not exit; output %r" % self.output[-2000:])

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.status = -1


def execc_argv(daemon, *command, options=()):
    return [PYTHON, EXECC] + list(options) + [daemon.destination, "--"] + list(command)


def session_pids(session_id):
    """Return live (non-zombie) pids whose session id is session_id."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[3]) == session_id and fields[0] != b"Z":
            pids.append(int(name))
    return pids


def wait_until(condition, timeout=10, interval=0.02):
    """Poll condition() until it is true; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --- Pipe mode: streams ----------------------------------------------------------

def test_stdout_matches_local_run(daemon):
    local = subprocess.run(["ls", "-al", "/usr/lib"], stdout=subprocess.PIPE, cwd="/")
    remote = execc(daemon, "ls", "-al", "/usr/lib")
    assert remote.returncode == 0
    assert remote.stdout == local.stdout


def test_stdout_and_stderr_kept_apart(daemon):
    result = execc(daemon, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert result.returncode == 3


def test_stdin_eof_reaches_command(daemon):
    result = execc(daemon, "wc", "-c", input=b"abc")
    assert result.stdout.strip() == b"3"
