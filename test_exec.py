"""Black-box tests for execd.py and execc.py: real daemons, sockets, ptys and signals.

Every test starts its own daemon on a temporary unix socket (or on 127.0.0.1
with a token), runs execc.py as a subprocess, and kills only the processes it
started.  An autouse fixture bounds every test with SIGALRM.

Run: python3 -m pytest -q
"""

import ast
import concurrent.futures
import errno
import fcntl
import functools
import grp
import hashlib
import json
import os
import pty
import pwd
import random
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import types

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

    def __init__(self, directory, *extra_args, python=PYTHON, listen_unix=True, env=None,
                 script=EXECD):
        self.directory = str(directory)
        self.socket = os.path.join(self.directory, "execd.sock")
        self.destination = "unix:" + self.socket
        argv = [python, script] + (["--listen", self.destination] if listen_unix else [])
        argv += list(extra_args)
        self.lines = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env)
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        # The reader sets ready at the "listening on" line, or at end of file
        # when the daemon exits during start-up; the poll() distinguishes them.
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
          env=None, script=EXECC, **kwargs):
    """Run execc.py with options, destination and command; return CompletedProcess."""
    argv = [python, script] + list(options) + [daemon.destination, "--"] + list(command)
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


# ============================================================================
# Pipe mode, protocol, drain, exit statuses, TCP, compatibility
# ============================================================================

# --- Pipe mode: helpers -----------------------------------------------------------

PIPE_HEADER = struct.Struct("!IB")  # the wire header: payload length, frame type
PIPE_HELLO, PIPE_REQUEST, PIPE_STDIN, PIPE_ERROR = 0x01, 0x04, 0x10, 0x7F
PIPE_MIB = 1 << 20


def pipe_frame(frame_type, payload=b""):
    """Return one frame as bytes.  A dict payload is encoded as JSON."""
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode("utf-8")
    return PIPE_HEADER.pack(len(payload), frame_type) + payload


def pipe_recv_exact(sock, count):
    """Read exactly count bytes, or return None if the peer closes first."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def pipe_frames_until_close(sock):
    """Read frames until the peer closes and return them as [(type, payload)]."""
    frames = []
    while True:
        header = pipe_recv_exact(sock, PIPE_HEADER.size)
        if header is None:
            return frames
        length, frame_type = PIPE_HEADER.unpack(header)
        payload = pipe_recv_exact(sock, length)
        if payload is None:
            return frames
        frames.append((frame_type, payload))


def pipe_connect(daemon):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.socket)
    return sock


def pipe_hello(protocol=1):
    return pipe_frame(PIPE_HELLO, {"protocol": protocol, "program": "pipe-test 0"})


def pipe_start_pid(daemon, argv):
    """Return the pid (also the session id) of the command argv, from the daemon log."""
    pattern = r"session \d+: start: .*, pid (\d+), pipes, argv " + re.escape(repr(list(argv)))
    return int(daemon.wait_for_log(pattern).group(1))


def pipe_kill_session(session_id):
    """Send SIGKILL to every process left in a command's session and return their pids."""
    pids = session_pids(session_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def pipe_proc_state(pid):
    """Return (comm, state letter) of a process, or (None, None) once it has exited."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat_line = f.read()
    except OSError:
        return None, None
    comm = stat_line[stat_line.find(b"(") + 1:stat_line.rfind(b")")].decode()
    return comm, stat_line[stat_line.rfind(b")") + 2:].split()[0].decode()


def pipe_one_line(stderr):
    """Return True if stderr is exactly one non-empty line."""
    return stderr.endswith(b"\n") and stderr.count(b"\n") == 1 and len(stderr) > 1


@pytest.fixture
def pipe_leftovers(daemon):
    """Kill, after the test, the background processes that any session left running."""
    yield daemon
    for match in re.finditer(r"session \d+: start: .*?, pid (\d+), ", daemon.log):
        pipe_kill_session(int(match.group(1)))


def pipe_tcp(port):
    """Return a destination for execc(): a TCP port on 127.0.0.1."""
    return types.SimpleNamespace(destination="127.0.0.1:%d" % port)


def pipe_write_token(path, text, mode=0o600):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(str(path), mode)  # os.open applied the umask to the mode
    return str(path)


# --- Pipe mode: stdout, stderr and stdin bytes -------------------------------------

def test_binary_file_identical_to_local(daemon, tmp_path):
    path = str(tmp_path / "random.bin")
    written = execc(daemon, "sh", "-c", "head -c 1000000 /dev/urandom > " + path)
    assert written.returncode == 0
    local = subprocess.run(["cat", path], stdout=subprocess.PIPE, timeout=30).stdout
    remote = execc(daemon, "cat", path)
    assert len(local) == 1000000
    assert remote.stdout == local


def test_all_byte_values_pass_through(daemon, tmp_path):
    data = bytes(range(256)) * 64
    path = tmp_path / "bytes.bin"
    path.write_bytes(data)
    result = execc(daemon, "cat", str(path))
    assert result.stdout == data


def test_interleaved_streams_stay_separate(daemon):
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
    result = execc(daemon, "sh", "-c", script)
    assert result.stdout == b"out1\nout2\nout3\n"
    assert result.stderr == b"err1\nerr2\nerr3\n"


def test_large_concurrent_streams_stay_separate(daemon, tmp_path):
    out_data, err_data = os.urandom(2 * PIPE_MIB), os.urandom(2 * PIPE_MIB)
    (tmp_path / "out").write_bytes(out_data)
    (tmp_path / "err").write_bytes(err_data)
    result = execc(daemon, "sh", "-c", "cat out & cat err >&2; wait",
                   options=["--cwd", str(tmp_path)])
    assert result.stdout == out_data
    assert result.stderr == err_data


def test_printf_stdin_counts_three_bytes(daemon):
    printf = subprocess.Popen(["printf", "abc"], stdout=subprocess.PIPE)
    result = execc(daemon, "wc", "-c", stdin=printf.stdout)
    printf.stdout.close()
    printf.wait(10)
    assert result.stdout.strip() == b"3"


def test_large_stdin_round_trips_exactly(daemon):
    data = os.urandom(20 * PIPE_MIB)
    result = execc(daemon, "cat", input=data)
    assert result.returncode == 0
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_endless_stdin_to_true_ends_promptly(daemon, record_property):
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        start = time.monotonic()
        result = execc(daemon, "true", stdin=yes.stdout, timeout=30)
        elapsed = time.monotonic() - start
    finally:
        yes.stdout.close()
        yes.kill()
        yes.wait(10)
    record_property("yes_to_true_seconds", round(elapsed, 3))
    print("yes | execc -- true took %.3f s" % elapsed)
    assert result.returncode == 0
    assert elapsed < 5


# --- Pipe mode: the drain, by repetition ------------------------------------------
# Each command writes and exits at once; every run must deliver every byte.
# The runs go four at a time, so 100 of each fit in the time budget.

PIPE_DRAIN_RUNS = 100


def pipe_repeat(daemon, runs, command_for, expected_for):
    """Run command_for(i) for i in range(runs); return the runs that lost bytes."""
    def one(i):
        result = execc(daemon, *command_for(i), timeout=60)
        expected = expected_for(i)
        if result.returncode != 0 or result.stdout != expected:
            return (i, result.returncode, len(result.stdout), len(expected),
                    result.stderr[-300:])
        return None
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return [failure for failure in pool.map(one, range(runs)) if failure]


def pipe_seq(count):
    return b"".join(b"%d\n" % n for n in range(1, count + 1))


def test_drain_small_output_every_time(daemon):
    failures = pipe_repeat(daemon, PIPE_DRAIN_RUNS,
                           lambda i: ["printf", "run %s done\\n", str(i)],
                           lambda i: b"run %d done\n" % i)
    assert failures == []


def test_drain_large_output_every_time(daemon):
    # seq's 350 KB exceed the daemon's output high-water mark (256 KiB), so the
    # drain also runs while reading is paused for a slow client.
    failures = pipe_repeat(daemon, PIPE_DRAIN_RUNS,
                           lambda i: ["seq", str(60000 + i)],
                           lambda i: pipe_seq(60000 + i))
    assert failures == []


def test_drain_held_output_every_time(pipe_leftovers):
    # A background sleep keeps the pipe open, so no EOF comes.  The daemon must
    # send exactly the bytes already in the pipe when the shell is reaped.
    failures = pipe_repeat(pipe_leftovers, PIPE_DRAIN_RUNS // 2,
                           lambda i: ["sh", "-c", "seq %d; sleep 60 &" % (60000 + i)],
                           lambda i: pipe_seq(60000 + i))
    assert failures == []


# --- Pipe mode: background processes holding the output ----------------------------

def test_background_sleep_returns_promptly(pipe_leftovers, record_property):
    start = time.monotonic()
    result = execc(pipe_leftovers, "sh", "-c", "sleep 100 &", timeout=30)
    elapsed = time.monotonic() - start
    record_property("background_sleep_seconds", round(elapsed, 3))
    print("execc -- sh -c 'sleep 100 &' took %.3f s" % elapsed)
    session_id = pipe_start_pid(pipe_leftovers, ["sh", "-c", "sleep 100 &"])
    assert result.returncode == 0
    assert elapsed < 2
    assert result.stderr == b""  # no -v: a silent holder is not reported
    assert pipe_kill_session(session_id) != []  # the sleep was still running


def test_verbose_reports_silent_holder(pipe_leftovers):
    result = execc(pipe_leftovers, "sh", "-c", "sleep 100 &", options=["-v"])
    assert result.returncode == 0
    assert b"held the command's output open" in result.stderr


def test_background_yes_output_bounded(pipe_leftovers):
    start = time.monotonic()
    result = execc(pipe_leftovers, "sh", "-c", "yes &", timeout=30)
    elapsed = time.monotonic() - start
    assert result.returncode == 0
    assert elapsed < 5
    assert len(result.stdout) < 4 * PIPE_MIB


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_discarded_output_reported_unless_quiet(pipe_leftovers, tmp_path, quiet):
    # `sh -c 'yes &'` made deterministic: execc's stdout is not read until yes
    # blocks on a full pipe, so yes writes more during the drain, to be discarded.
    go = str(tmp_path / "go")
    os.mkfifo(go)
    argv = ["sh", "-c", "yes & read line < " + go]
    client = subprocess.Popen(execc_argv(pipe_leftovers, *argv, options=["-q"] if quiet else []),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        session_id = pipe_start_pid(pipe_leftovers, argv)

        def yes_blocked():
            states = [pipe_proc_state(pid) for pid in session_pids(session_id)]
            return ("yes", "S") in states
        assert wait_until(yes_blocked, timeout=20)
        with open(go, "w") as f:
            f.write("go\n")
        stdout, stderr = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    assert client.returncode == 0
    assert len(stdout) < 8 * PIPE_MIB
    reported = re.search(rb"execc: \d+ bytes of output were discarded", stderr)
    assert bool(reported) is not quiet


# --- Pipe mode: exit statuses ------------------------------------------------------

@pytest.mark.parametrize("code", [0, 1, 2, 254, 255])
def test_exit_status_passes_through(daemon, code):
    result = execc(daemon, "sh", "-c", "exit %d" % code)
    assert result.returncode == code
    assert result.stderr == b""


def test_not_executable_gives_126(daemon, tmp_path):
    script = tmp_path / "no-x-bit"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    result = execc(daemon, str(script))
    assert result.returncode == 126
    assert result.stdout == b""
    assert os.strerror(errno.EACCES).encode() in result.stderr


def test_not_found_gives_127(daemon):
    result = execc(daemon, "pipe-test-no-such-command")
    assert result.returncode == 127
    assert b"pipe-test-no-such-command" in result.stderr
    assert os.strerror(errno.ENOENT).encode() in result.stderr


def test_bad_cwd_gives_125(daemon):
    result = execc(daemon, "true", options=["--cwd", "/nonexistent"])
    assert result.returncode == 125
    assert b"/nonexistent" in result.stderr
    assert os.strerror(errno.ENOENT).encode() in result.stderr


@pytest.mark.parametrize("name", ["HUP", "INT", "TERM", "KILL"])
def test_self_signal_gives_128_plus_n(daemon, name):
    result = execc(daemon, "sh", "-c", "kill -%s $$" % name)
    assert result.returncode == 128 + getattr(signal, "SIG" + name)


def test_outside_sigkill_gives_137(daemon):
    client = subprocess.Popen(execc_argv(daemon, "sleep", "60"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid = pipe_start_pid(daemon, ["sleep", "60"])
        assert wait_until(lambda: pipe_proc_state(pid)[0] == "sleep")
        os.kill(pid, signal.SIGKILL)
        client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    assert client.returncode == 137


# --- Pipe mode: the command's process state ----------------------------------------

def test_pipeline_inside_has_default_sigpipe(daemon):
    result = execc(daemon, "sh", "-c", "yes | head -n 1")
    assert result.stdout == b"y\n"
    assert result.stderr == b""


def test_command_inherits_only_stdio_fds(daemon):
    # `; true` keeps sh from exec'ing ls, whose own directory fd would show.
    result = execc(daemon, "sh", "-c", "ls /proc/$$/fd; true")
    assert result.stdout.split() == [b"0", b"1", b"2"]


def test_daemon_leaked_fd_not_inherited(tmp_path):
    # A daemon started from a shell may inherit an fd without close-on-exec
    # (fd 7 here).  The command must not inherit it in turn.
    wrapper = tmp_path / "leaky-python"
    wrapper.write_text("#!/bin/sh\nexec 7</dev/null\nexec %s \"$@\"\n" % PYTHON)
    wrapper.chmod(0o755)
    d = Daemon(tmp_path, python=str(wrapper))
    try:
        daemon_fds = os.listdir("/proc/%d/fd" % d.pid)
        result = execc(d, "sh", "-c", "ls /proc/$$/fd; true")
    finally:
        d.stop()
    assert "7" in daemon_fds
    assert result.stdout.split() == [b"0", b"1", b"2"]


def test_no_signal_blocked_or_ignored(daemon):
    result = execc(daemon, "grep", "-E", "SigBlk|SigIgn", "/proc/self/status")
    masks = {}
    for line in result.stdout.splitlines():
        name, value = line.split(b":")
        masks[name] = int(value, 16)
    assert masks == {b"SigBlk": 0, b"SigIgn": 0}


# --- Pipe mode: --env and --cwd ------------------------------------------------------

def test_env_key_value_reaches_command(daemon):
    result = execc(daemon, "printenv", "PIPE_TEST_VAR", options=["--env", "PIPE_TEST_VAR=a=b c"])
    assert result.stdout == b"a=b c\n"


def test_env_key_alone_takes_client_value(daemon):
    env = dict(os.environ, PIPE_TEST_FROM_CLIENT="from the client")
    assert "PIPE_TEST_FROM_CLIENT" not in os.environ  # so the daemon cannot have it
    result = execc(daemon, "printenv", "PIPE_TEST_FROM_CLIENT",
                   options=["--env", "PIPE_TEST_FROM_CLIENT"], env=env)
    assert result.stdout == b"from the client\n"


def test_cwd_option_sets_directory(daemon, tmp_path):
    result = execc(daemon, "pwd", options=["--cwd", str(tmp_path)])
    assert result.stdout == os.path.realpath(str(tmp_path)).encode() + b"\n"


@pytest.mark.parametrize("entry", ["=x", "PIPE_TEST_UNSET_VAR"], ids=["empty-key", "unset-key"])
def test_bad_env_is_usage_error(daemon, entry):
    env = dict(os.environ)
    env.pop("PIPE_TEST_UNSET_VAR", None)
    result = execc(daemon, "true", options=["--env", entry], env=env)
    assert result.returncode == 255
    assert b"Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert b"--env" in result.stderr


# --- Pipe mode: execc's own failures -----------------------------------------------

def test_no_daemon_unix_gives_255(tmp_path):
    destination = "unix:" + str(tmp_path / "nobody.sock")
    result = execc(types.SimpleNamespace(destination=destination), "true")
    assert result.returncode == 255
    assert pipe_one_line(result.stderr)
    assert destination.encode() in result.stderr


def test_no_daemon_tcp_gives_255():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on the port now
    result = execc(pipe_tcp(port), "true")
    assert result.returncode == 255
    assert pipe_one_line(result.stderr)
    assert b"127.0.0.1:%d" % port in result.stderr


def test_daemon_rejects_newer_protocol(daemon):
    with pipe_connect(daemon) as sock:
        sock.sendall(pipe_hello(protocol=99))
        frames = pipe_frames_until_close(sock)
    assert [frame_type for frame_type, _ in frames] == [PIPE_ERROR]
    error = json.loads(frames[0][1])
    assert error["fatal"] is True
    assert "99" in error["message"]
    assert "version 1" in error["message"]


def test_client_rejects_newer_protocol(tmp_path):
    path = str(tmp_path / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(20)
    received = []

    def fake_daemon():
        conn, _ = server.accept()
        with conn:
            conn.settimeout(20)
            header = pipe_recv_exact(conn, PIPE_HEADER.size)
            length, frame_type = PIPE_HEADER.unpack(header)
            received.append((frame_type, json.loads(pipe_recv_exact(conn, length))))
            conn.sendall(pipe_frame(PIPE_HELLO, {"protocol": 99, "program": "execd 99.0.0",
                                                 "auth": "none"}))
            pipe_frames_until_close(conn)
    thread = threading.Thread(target=fake_daemon, daemon=True)
    thread.start()
    try:
        result = execc(types.SimpleNamespace(destination="unix:" + path), "true", timeout=30)
    finally:
        thread.join(20)
        server.close()
    assert received[0][0] == PIPE_HELLO
    assert received[0][1]["protocol"] == 1
    assert result.returncode == 255
    assert pipe_one_line(result.stderr)
    assert b"protocol version mismatch" in result.stderr
    assert b"99" in result.stderr


# --- Pipe mode: protocol robustness (raw sockets) ----------------------------------

PIPE_BAD_FRAMES = {
    # Before authentication a frame may carry at most 4096 bytes, so the
    # header alone is enough to reject it.
    "oversized-before-hello": (PIPE_HEADER.pack(5000, PIPE_HELLO), "exceeds the maximum"),
    "oversized-after-hello": (pipe_hello() + PIPE_HEADER.pack(0xFFFFFFFF, PIPE_STDIN),
                              "exceeds the maximum"),
    "unknown-type": (pipe_frame(0x42, b"{}"), "unknown frame type 0x42"),
    "stdin-before-request": (pipe_hello() + pipe_frame(PIPE_STDIN, b"data"),
                             "unexpected STDIN"),
    "stdin-before-hello": (pipe_frame(PIPE_STDIN, b"data"), "unexpected STDIN"),
    "json-array-hello": (pipe_frame(PIPE_HELLO, b"[1]"), "JSON object"),
}


@pytest.mark.parametrize("case", sorted(PIPE_BAD_FRAMES))
def test_bad_frame_gets_error_then_close(daemon, case):
    data, message = PIPE_BAD_FRAMES[case]
    with pipe_connect(daemon) as sock:
        sock.sendall(data)
        frames = pipe_frames_until_close(sock)
    errors = [json.loads(payload) for frame_type, payload in frames if frame_type == PIPE_ERROR]
    assert frames[-1][0] == PIPE_ERROR
    assert errors[-1]["fatal"] is True
    assert message in errors[-1]["message"]
    after = execc(daemon, "echo", "still serving")
    assert after.stdout == b"still serving\n"


def test_request_before_hello_rejected(daemon):
    request = {"argv": ["touch", "/nonexistent-pipe-test"], "tty": False}
    with pipe_connect(daemon) as sock:
        sock.sendall(pipe_frame(PIPE_REQUEST, request))
        frames = pipe_frames_until_close(sock)
    assert [frame_type for frame_type, _ in frames] == [PIPE_ERROR]
    assert "start:" not in daemon.log
    assert not os.path.exists("/nonexistent-pipe-test")


# --- Pipe mode: TCP with a token ---------------------------------------------------

@pytest.fixture
def pipe_tcp_daemon(tmp_path):
    token = pipe_write_token(tmp_path / "token", "pipe-test-token-" + os.urandom(16).hex())
    d = Daemon(tmp_path, "--listen", "127.0.0.1:0", "--token-file", token)
    d.token_file = token
    yield d
    d.stop()


def test_tcp_port_zero_is_reported(pipe_tcp_daemon):
    assert pipe_tcp_daemon.proc.poll() is None
    assert pipe_tcp_daemon.tcp_port() > 0


def test_tcp_with_token_runs_command(pipe_tcp_daemon):
    port = pipe_tcp_daemon.tcp_port()
    result = execc(pipe_tcp(port), "sh", "-c", "cat; echo err >&2; exit 7",
                   options=["--token-file", pipe_tcp_daemon.token_file], input=b"over tcp\n")
    assert result.returncode == 7
    assert result.stdout == b"over tcp\n"
    assert result.stderr == b"err\n"


def test_tcp_wrong_token_fails_authentication(pipe_tcp_daemon, tmp_path):
    wrong = pipe_write_token(tmp_path / "wrong", "not-the-right-token-at-all")
    result = execc(pipe_tcp(pipe_tcp_daemon.tcp_port()), "true", options=["--token-file", wrong])
    assert result.returncode == 255
    assert pipe_one_line(result.stderr)
    assert b"authentication failed" in result.stderr


def test_tcp_without_token_file_named(pipe_tcp_daemon):
    result = execc(pipe_tcp(pipe_tcp_daemon.tcp_port()), "true")
    assert result.returncode == 255
    assert pipe_one_line(result.stderr)
    assert b"--token-file" in result.stderr


def pipe_failed_start(*args):
    """Run execd with args, which must make it fail at start-up, and return the result."""
    return subprocess.run([PYTHON, EXECD] + list(args), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)


def test_daemon_rejects_tcp_without_token():
    result = pipe_failed_start("--listen", "127.0.0.1:0")
    errors = [line for line in result.stderr.splitlines() if b"error" in line.lower()]
    assert result.returncode != 0
    assert b"Traceback" not in result.stderr
    assert len(errors) == 1
    assert b"--token-file" in errors[0]


def test_daemon_rejects_readable_token_file(tmp_path):
    token = pipe_write_token(tmp_path / "token", "pipe-test-token-" + os.urandom(16).hex(),
                             mode=0o644)
    result = pipe_failed_start("--listen", "127.0.0.1:0", "--token-file", token)
    assert result.returncode != 0
    assert b"Traceback" not in result.stderr
    assert pipe_one_line(result.stderr)
    assert b"644" in result.stderr
    assert b"chmod 600" in result.stderr


# --- Pipe mode: concurrent sessions ------------------------------------------------

def test_concurrent_sessions_keep_own_payloads(daemon):
    rng = random.Random(1234)
    payloads = [b"session %d:" % i + os.urandom(rng.randrange(1, 300000)) for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(lambda payload: execc(daemon, "cat", input=payload), payloads))
    mismatched = [i for i, (payload, result) in enumerate(zip(payloads, results))
                  if result.returncode != 0 or result.stdout != payload]
    assert mismatched == []
    assert len(re.findall(r"session \d+: end: exit 0", daemon.log)) == 30


# --- Pipe mode: stopping the daemon -------------------------------------------------

def test_sigterm_removes_socket_exits_zero(tmp_path):
    d = Daemon(tmp_path)
    try:
        assert os.path.exists(d.socket)
        d.proc.send_signal(signal.SIGTERM)
        status = d.proc.wait(15)
    finally:
        d.stop()
    assert status == 0
    assert not os.path.exists(d.socket)


def test_sigterm_hangs_up_running_session(tmp_path):
    d = Daemon(tmp_path)
    client = subprocess.Popen(execc_argv(d, "sleep", "60"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = None
    try:
        pid = pipe_start_pid(d, ["sleep", "60"])
        d.proc.send_signal(signal.SIGTERM)
        status = d.proc.wait(15)
        _, stderr = client.communicate(timeout=15)
        sleep_gone = wait_until(lambda: session_pids(pid) == [])
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        d.stop()
        if pid is not None:
            pipe_kill_session(pid)
    assert status == 0
    assert not os.path.exists(d.socket)
    assert client.returncode == 255
    assert b"stopping" in stderr
    assert sleep_gone


# --- Pipe mode: Python versions and the standard library -----------------------------

def pipe_pyenv_pythons():
    """Return [(version, python3 path)] for every CPython 3.x pyenv lists, or None."""
    try:
        root = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=30, check=True)
        names = subprocess.run(["pyenv", "versions", "--bare"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    versions = root.stdout.decode().strip()
    return [(name, os.path.join(versions, "versions", name, "bin", "python3"))
            for name in names.stdout.decode().split()
            if re.match(r"^3\.\d+(\.\d+)?$", name)]


PIPE_PYTHONS = pipe_pyenv_pythons()


@pytest.mark.parametrize(
    "version,python",
    [pytest.param(v, p, id=v) for v, p in PIPE_PYTHONS] if PIPE_PYTHONS
    else [pytest.param(None, None, id="no-pyenv")])
def test_smoke_under_python_version(tmp_path, version, python):
    if version is None:
        pytest.skip("pyenv is not installed or lists no CPython 3.x")
    if not os.access(python, os.X_OK):
        pytest.skip("CPython %s is listed by pyenv but %s is absent" % (version, python))
    # The client runs from a directory of its own, as when copied alone to a host.
    alone = tmp_path / "client"
    alone.mkdir()
    client = str(alone / "execc.py")
    shutil.copy(EXECC, client)
    d = Daemon(tmp_path, python=python)

    def run(*command, **kwargs):
        return subprocess.run([python, client, d.destination, "--"] + list(command),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                              **kwargs)
    try:
        status = run("sh", "-c", "echo out; echo err >&2; exit 3")
        counted = run("wc", "-c", input=b"abc")
        data = os.urandom(600000)
        echoed = run("cat", input=data)
    finally:
        d.stop()
    print("smoke test ran under CPython %s" % version)
    assert d.proc.returncode == 0
    assert status.returncode == 3
    assert status.stdout == b"out\n"
    assert status.stderr == b"err\n"
    assert counted.stdout.strip() == b"3"
    assert echoed.stdout == data


# Used when sys.stdlib_module_names (3.10+) is missing: standard modules that
# scripts like these import.  NOTE: not the whole standard library, so under
# Python 3.9 or older an unlisted standard module fails the test wrongly.
PIPE_STDLIB_FALLBACK = frozenset("""
    __future__ argparse array base64 binascii codecs collections contextlib copy
    ctypes datetime enum errno fcntl functools getpass grp hashlib heapq hmac io
    ipaddress itertools json locale logging math os pathlib platform pty pwd
    queue random re resource secrets select selectors shlex shutil signal socket
    ssl stat string struct subprocess sys tempfile termios textwrap threading time
    traceback tty types typing warnings weakref
""".split())


def pipe_imported_modules(path):
    """Return the top-level names of every module a script imports, anywhere in it."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", [EXECD, EXECC], ids=["execd", "execc"])
def test_script_imports_only_stdlib(script):
    stdlib = getattr(sys, "stdlib_module_names", PIPE_STDLIB_FALLBACK)
    assert sorted(pipe_imported_modules(script) - set(stdlib)) == []


def test_client_never_imports_daemon():
    with open(EXECC) as f:
        source = f.read()
    assert "execd" not in pipe_imported_modules(EXECC)
    assert "__import__" not in source
    assert "importlib" not in source


# ============================================================================
# Signal forwarding and session lifecycle
# ============================================================================

# --- Signals and session lifecycle: helpers ------------------------------------

SIG_GRACE = 1.0  # --hangup-grace of the daemons below, in seconds
SIG_MODES = ("pipe", "pty")
SIG_FORWARDED = ("TERM", "HUP", "INT", "QUIT", "USR1", "USR2")


@pytest.fixture
def sig_daemon(tmp_path):
    """A daemon with a short hangup grace, so SIGKILL cleanups end quickly."""
    short_grace = Daemon(tmp_path, "--hangup-grace", str(SIG_GRACE))
    yield short_grace
    short_grace.stop()


@pytest.fixture
def sig_clients():
    """Clients a test starts.  Any still running at the end are SIGKILLed by pid."""
    started = []
    yield started
    for client in started:
        if isinstance(client, Terminal):
            client.kill()
            continue
        if client.poll() is None:
            client.kill()
            client.wait(5)
        client.stdout.close()
        client.stderr.close()


def sig_spawn(clients, daemon, mode, *command):
    """Start execc running command: -T with piped stdio, or -t on a real pty."""
    if mode == "pty":
        client = Terminal(execc_argv(daemon, *command, options=["-t"]))
    else:
        client = subprocess.Popen(execc_argv(daemon, *command, options=["-T"]),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        client.output = b""
    clients.append(client)
    return client


def sig_read_until(client, pattern, timeout=10):
    """Read the client's stdout (or its terminal) until the bytes regex matches."""
    if isinstance(client, Terminal):
        return client.read_until(pattern, timeout)
    deadline = time.monotonic() + timeout
    fd = client.stdout.fileno()
    while not re.search(pattern, client.output):
        remaining = deadline - time.monotonic()
        ready = remaining > 0 and select.select([fd], [], [], remaining)[0]
        data = os.read(fd, 65536) if ready else b""
        if not data:
            raise AssertionError("no match for %r in %r" % (pattern, client.output))
        client.output += data
    return re.search(pattern, client.output)


def sig_finish(client, timeout=10):
    """Wait for the client to exit and return (status, stdout or terminal, stderr)."""
    if isinstance(client, Terminal):
        status = client.wait(timeout)
        return status, client.output, client.output
    rest, errors = client.communicate(timeout=timeout)
    client.output += rest
    return client.returncode, client.output, errors


def sig_session(daemon, marker):
    """Return (session number, command pid) from the start line naming marker."""
    match = daemon.wait_for_log(r"session (\d+): start: .*, pid (\d+), (?:pipes|pty), argv .*%s"
                                % re.escape(marker))
    return int(match.group(1)), int(match.group(2))


def sig_forward_count(daemon, number, name):
    """Count the daemon's log lines that report forwarding SIG<name> in session number."""
    pattern = "session %d: forwarding SIG%s " % (number, name)
    return sum(pattern in line for line in list(daemon.lines))


def sig_zombie_children(parent):
    """Return the pids of zombie processes whose parent is parent."""
    zombies = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] == b"Z" and int(fields[1]) == parent:
            zombies.append(int(name))
    return zombies


def sig_state(pid):
    """Return the /proc state letter of pid (b"R", b"S", b"T", b"Z"...), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()[0]


def sig_is_alive(pid):
    """Return whether pid exists and is not a zombie."""
    return sig_state(pid) not in (None, b"Z")


# --- Signals: each forwarded signal reaches the command -------------------------

@pytest.mark.parametrize("mode", SIG_MODES)
@pytest.mark.parametrize("name", SIG_FORWARDED)
def test_forwarded_signal_reaches_command(sig_daemon, sig_clients, mode, name):
    # The sleep gets the signal too, so ulimit keeps a SIGQUIT from leaving a core file.
    script = ('ulimit -c 0; trap "echo got-%s; exit 0" %s; echo ready; '
              'while :; do sleep 0.1; done' % (name, name))
    client = sig_spawn(sig_clients, sig_daemon, mode, "sh", "-c", script)
    sig_read_until(client, rb"ready")
    os.kill(client.pid, getattr(signal, "SIG" + name))
    status, output, _ = sig_finish(client)
    assert ("got-%s" % name).encode() in output
    assert status == 0


@pytest.mark.parametrize("mode", SIG_MODES)
def test_command_killed_by_sigterm_gives_143(sig_daemon, sig_clients, mode):
    client = sig_spawn(sig_clients, sig_daemon, mode, "sh", "-c", "echo ready; exec sleep 60")
    sig_read_until(client, rb"ready")
    os.kill(client.pid, signal.SIGTERM)
    status, _, _ = sig_finish(client)
    assert status == 128 + signal.SIGTERM


def test_pty_sigint_by_kill_is_forwarded(sig_daemon, sig_clients):
    # The client's terminal is raw, so Ctrl-C arrives as a byte.  A SIGINT
    # from kill(2) must still be caught and forwarded to the remote sleep.
    client = sig_spawn(sig_clients, sig_daemon, "pty", "sh", "-c", "echo ready; exec sleep 60")
    sig_read_until(client, rb"ready")
    os.kill(client.pid, signal.SIGINT)
    status, _, _ = sig_finish(client)
    assert status == 128 + signal.SIGINT


def test_timeout_wrapper_gives_124(sig_daemon):
    marker = "timeout-wrapper-marker"
    argv = ["timeout", "2"] + execc_argv(sig_daemon, "sh", "-c", ": %s; exec sleep 60" % marker,
                                         options=["-T"])
    started = time.monotonic()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 124
    assert elapsed < 10
    _, pid = sig_session(sig_daemon, marker)
    assert wait_until(lambda: not session_pids(pid), timeout=SIG_GRACE + 5)


@pytest.mark.parametrize("mode", SIG_MODES)
def test_sigterm_reaches_every_pipeline_member(sig_daemon, sig_clients, mode):
    marker = "pipeline-marker-" + mode
    client = sig_spawn(sig_clients, sig_daemon, mode, "sh", "-c",
                       ": %s; echo ready; sleep 60 | cat" % marker)
    sig_read_until(client, rb"ready")
    _, pid = sig_session(sig_daemon, marker)
    # sh, sleep and cat: wait until the pipeline is running before signalling.
    assert wait_until(lambda: len(session_pids(pid)) >= 3)
    os.kill(client.pid, signal.SIGTERM)
    status, _, _ = sig_finish(client)
    assert status == 128 + signal.SIGTERM
    assert wait_until(lambda: not session_pids(pid), timeout=5)


# --- Signals: escalation after three interrupts ----------------------------------

@pytest.mark.parametrize("mode", SIG_MODES)
@pytest.mark.parametrize("name", ("INT", "TERM"))
def test_third_interrupt_disconnects_client(sig_daemon, sig_clients, mode, name):
    marker = "escalation-marker-%s-%s" % (name, mode)
    number = getattr(signal, "SIG" + name)
    client = sig_spawn(sig_clients, sig_daemon, mode, "sh", "-c",
                       ': %s; trap "" %s; echo ready; sleep 60' % (marker, name))
    sig_read_until(client, rb"ready")
    session, pid = sig_session(sig_daemon, marker)
    for count in (1, 2):
        # Space the signals out: a second kill(2) before the first is
        # delivered would merge with it, as standard signals do not queue.
        os.kill(client.pid, number)
        assert wait_until(lambda: sig_forward_count(sig_daemon, session, name) == count)
    started = time.monotonic()
    os.kill(client.pid, number)
    status, output, errors = sig_finish(client)
    elapsed = time.monotonic() - started
    assert status == 128 + number
    assert elapsed < 3
    assert errors.count(b"did not exit after 3 signals") == 1
    if mode == "pipe":
        assert len(errors.splitlines()) == 1
    sig_daemon.wait_for_log(r"session %d: hanging up" % session)
    assert wait_until(lambda: not session_pids(pid), timeout=SIG_GRACE + 3)


# --- Signals: broken pipe on the client's stdout --------------------------------

def test_closed_stdout_kills_command_with_sigpipe(sig_daemon):
    marker = "epipe-marker"
    pipeline = '%s | head -n 3; echo "${PIPESTATUS[0]}" >&2' % " ".join(
        shlex.quote(arg) for arg in execc_argv(
            sig_daemon, "sh", "-c", ": %s; exec yes" % marker, options=["-T"]))
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", pipeline], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    elapsed = time.monotonic() - started
    assert result.stdout == b"y\ny\ny\n"
    assert result.stderr.splitlines()[-1:] == [b"141"]
    assert elapsed < 5
    _, pid = sig_session(sig_daemon, marker)
    assert wait_until(lambda: not session_pids(pid), timeout=5)


def test_pty_closed_stdout_ends_session(sig_daemon, sig_clients):
    # In pty mode the daemon closes the terminal, so the command dies of the
    # hangup and the client still receives EXIT.
    marker = "pty-epipe-marker"
    execc_command = " ".join(shlex.quote(arg) for arg in execc_argv(
        sig_daemon, "sh", "-c", ": %s; exec yes" % marker, options=["-t"]))
    script = execc_command + ' | head -n 3; echo "status ${PIPESTATUS[0]}"'
    shell = Terminal(["bash", "-c", script])
    sig_clients.append(shell)
    match = shell.read_until(rb"status (\d+)")
    _, pid = sig_session(sig_daemon, marker)
    assert match.group(1) == b"%d" % (128 + signal.SIGHUP)
    assert shell.output.count(b"y\r\n") == 3
    assert wait_until(lambda: not session_pids(pid), timeout=5)


# --- Session lifecycle: the client goes away ---------------------------------------

@pytest.mark.parametrize("mode", SIG_MODES)
def test_client_sigkill_hangs_up_session(sig_daemon, sig_clients, mode):
    marker = "sigkill-marker-" + mode
    client = sig_spawn(sig_clients, sig_daemon, mode, "sh", "-c",
                       ": %s; sleep 60 & sleep 60" % marker)
    number, pid = sig_session(sig_daemon, marker)
    # Wait for sh and both sleeps.
    assert wait_until(lambda: len(session_pids(pid)) >= 3)
    os.kill(client.pid, signal.SIGKILL)
    sig_finish(client)
    assert wait_until(lambda: not session_pids(pid), timeout=SIG_GRACE + 3)
    assert sig_daemon.wait_for_log(r"session %d: hanging up" % number)


def test_hup_ignoring_command_killed_after_grace(sig_daemon, sig_clients):
    marker = "ignores-hup-marker"
    client = sig_spawn(sig_clients, sig_daemon, "pipe", "sh", "-c",
                       ': %s; trap "" HUP; echo ready; sleep 60' % marker)
    sig_read_until(client, rb"ready")
    number, pid = sig_session(sig_daemon, marker)
    os.kill(client.pid, signal.SIGKILL)
    sig_finish(client)
    sig_daemon.wait_for_log(r"session %d: hanging up" % number)
    assert session_pids(pid)  # SIGHUP is ignored, so they remain until the grace ends
    assert wait_until(lambda: not session_pids(pid), timeout=SIG_GRACE + 3)
    assert sig_daemon.wait_for_log(r"session %d: grace period over: SIGKILL" % number)


def test_stopped_command_woken_for_hangup(tmp_path, sig_clients):
    # A long grace: the command must die of the SIGHUP (woken by SIGCONT),
    # not of the SIGKILL at the end of the grace period.
    slow = Daemon(tmp_path, "--hangup-grace", "30")
    try:
        marker = "stopped-marker"
        client = sig_spawn(sig_clients, slow, "pipe", "sh", "-c",
                           ": %s; echo ready; kill -STOP $$; sleep 60" % marker)
        sig_read_until(client, rb"ready")
        number, pid = sig_session(slow, marker)
        assert wait_until(lambda: sig_state(pid) == b"T")
        os.kill(client.pid, signal.SIGKILL)
        sig_finish(client)
        assert wait_until(lambda: not session_pids(pid), timeout=5)
        assert slow.wait_for_log(r"session %d: end after hangup: signal HUP" % number)
    finally:
        slow.stop()


def test_background_job_survives_normal_exit(sig_daemon):
    # execd.py documents that a command that exited by itself is not hung up,
    # so its background jobs keep running, as after a local `sh -c 'sleep 30 &'`.
    started = time.monotonic()
    result = execc(sig_daemon, "sh", "-c", "sleep 30 & echo $!", options=["-T"], timeout=30)
    elapsed = time.monotonic() - started
    background = int(result.stdout)
    try:
        sig_daemon.wait_for_log(r"session \d+: end: ")
        assert result.returncode == 0
        assert elapsed < 10
        assert sig_is_alive(background)
    finally:
        os.kill(background, signal.SIGKILL)


def test_closing_client_terminal_hangs_up_command(sig_daemon, sig_clients):
    # Closing the user's terminal window: the kernel sends the client SIGHUP,
    # which it forwards, so the remote command ends with it.
    marker = "terminal-closed-marker"
    terminal = sig_spawn(sig_clients, sig_daemon, "pty", "sh", "-c",
                         ": %s; echo ready; exec sleep 60" % marker)
    sig_read_until(terminal, rb"ready")
    number, pid = sig_session(sig_daemon, marker)
    os.close(terminal.fd)
    terminal.fd = os.open(os.devnull, os.O_RDONLY)  # Terminal.wait() closes this one
    status = terminal.wait()
    assert status == 128 + signal.SIGHUP
    assert sig_daemon.wait_for_log(r"session %d: end: signal HUP" % number)
    assert wait_until(lambda: not session_pids(pid), timeout=5)


# --- Session lifecycle: no zombies -------------------------------------------------

def test_no_zombies_after_200_sessions(sig_daemon):
    def one_session(index):
        return execc(sig_daemon, "true", options=["-T"], timeout=60).returncode
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one_session, range(200)))
    assert statuses == [0] * 200
    assert wait_until(lambda: not sig_zombie_children(sig_daemon.pid), timeout=5)


# --- Session lifecycle: daemon signals ------------------------------------------------

@pytest.mark.parametrize("name", ("TERM", "INT"))
def test_daemon_stop_signal_hangs_up_sessions(sig_daemon, sig_clients, name):
    piped = sig_spawn(sig_clients, sig_daemon, "pipe", "sh", "-c",
                      ": stop-pipe-marker; echo ready; exec sleep 60")
    terminal = sig_spawn(sig_clients, sig_daemon, "pty", "sh", "-c",
                         ": stop-pty-marker; echo ready; exec sleep 60")
    sig_read_until(piped, rb"ready")
    sig_read_until(terminal, rb"ready")
    _, piped_pid = sig_session(sig_daemon, "stop-pipe-marker")
    _, terminal_pid = sig_session(sig_daemon, "stop-pty-marker")
    started = time.monotonic()
    sig_daemon.proc.send_signal(getattr(signal, "SIG" + name))
    daemon_status = sig_daemon.proc.wait(SIG_GRACE + 5)
    elapsed = time.monotonic() - started
    piped_status, _, piped_errors = sig_finish(piped)
    terminal_status, terminal_output, _ = sig_finish(terminal)
    assert daemon_status == 0
    assert elapsed < SIG_GRACE + 2
    assert piped_status == 255
    assert b"stopping" in piped_errors
    assert terminal_status == 255
    assert b"stopping" in terminal_output
    assert wait_until(lambda: not session_pids(piped_pid), timeout=3)
    assert wait_until(lambda: not session_pids(terminal_pid), timeout=3)
    assert not os.path.exists(sig_daemon.socket)


def test_daemon_stop_outlasts_hup_ignoring_job(sig_daemon, sig_clients):
    # The command dies of SIGHUP at once, but its background job ignores it:
    # the session ends inside the grace timer, and the daemon must still exit.
    marker = "stop-ignores-hup-marker"
    client = sig_spawn(sig_clients, sig_daemon, "pipe", "sh", "-c",
                       ': %s; (trap "" HUP; exec sleep 60) & echo ready; sleep 60' % marker)
    sig_read_until(client, rb"ready")
    _, pid = sig_session(sig_daemon, marker)
    started = time.monotonic()
    sig_daemon.proc.send_signal(signal.SIGTERM)
    status = sig_daemon.proc.wait(SIG_GRACE + 10)
    elapsed = time.monotonic() - started
    assert status == 0
    assert elapsed < SIG_GRACE + 2
    assert wait_until(lambda: not session_pids(pid), timeout=3)


def test_second_daemon_sigterm_kills_at_once(tmp_path, sig_clients):
    slow = Daemon(tmp_path, "--hangup-grace", "30")
    try:
        marker = "second-stop-marker"
        client = sig_spawn(sig_clients, slow, "pipe", "sh", "-c",
                           ': %s; trap "" HUP; echo ready; sleep 60' % marker)
        sig_read_until(client, rb"ready")
        _, pid = sig_session(slow, marker)
        slow.proc.send_signal(signal.SIGTERM)
        slow.wait_for_log(r"stopping: 1 sessions")
        slow.proc.send_signal(signal.SIGTERM)
        status = slow.proc.wait(10)
        assert status == 0
        assert wait_until(lambda: not session_pids(pid), timeout=3)
        assert slow.wait_for_log(r"second SIGTERM: killing every session now")
    finally:
        slow.stop()


def test_daemon_sighup_reopens_log_file(tmp_path):
    log_file = str(tmp_path / "execd.log")
    rotated = str(tmp_path / "execd.log.1")
    destination = "unix:" + str(tmp_path / "execd.sock")
    proc = subprocess.Popen([PYTHON, EXECD, "--listen", destination, "--log-file", log_file],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def log_text(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""
    try:
        assert wait_until(lambda: "listening on" in log_text(log_file))
        os.rename(log_file, rotated)
        proc.send_signal(signal.SIGHUP)
        # The daemon creates the new file as soon as it handles SIGHUP.
        assert wait_until(lambda: os.path.exists(log_file))
        result = subprocess.run([PYTHON, EXECC, "-T", destination, "--", "true"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=30)
        assert proc.poll() is None
        assert result.returncode == 0
        assert wait_until(lambda: "session 1: end: " in log_text(log_file))
        assert "session 1: start: " not in log_text(rotated)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ============================================================================
# Pty mode
# ============================================================================

# --- Pty mode: helpers ---------------------------------------------------------

# One line of `stty -g` output: colon-separated hex fields.  The pty_wrapped
# shell prints one before and one after execc, and the two must be equal.
PTY_STTY_LINE = rb"[0-9a-f]+(?::[0-9a-f]+){10,}"


@pytest.fixture
def pty_terminals():
    """Start Terminals and kill, at teardown, any whose process still runs."""
    started = []

    def start(argv, **kwargs):
        terminal = Terminal(argv, **kwargs)
        started.append(terminal)
        return terminal
    yield start
    for terminal in started:
        terminal.kill()


@pytest.fixture
def pty_quick_daemon(tmp_path):
    """Start a daemon that SIGKILLs a hung-up session after one second, not five."""
    quick = Daemon(tmp_path, "--hangup-grace", "1")
    yield quick
    quick.stop()


def pty_env(**extra):
    """Return the test's environment with a TERM that vi and top know."""
    env = dict(os.environ, TERM="xterm")
    env.update(extra)
    return env


def pty_wrapped(daemon, *command, options=()):
    """Return the argv of a shell that prints `stty -g`, runs execc, prints its
    status as rc=N, and prints `stty -g` again."""
    script = 'stty -g; "$@"; echo "rc=$?"; stty -g'
    return ["sh", "-c", script, "sh"] + execc_argv(daemon, *command, options=options)


def pty_settings(terminal):
    """Return the (before, after) `stty -g` lines a pty_wrapped shell printed."""
    lines = re.findall(PTY_STTY_LINE, terminal.output)
    return lines[0], lines[-1]


def pty_status(terminal):
    """Return execc's status as a pty_wrapped shell printed it."""
    return int(terminal.read_until(rb"rc=(\d+)").group(1))


def pty_is_raw(terminal):
    """Return True while the process on the Terminal has its pty in raw mode."""
    # On Linux, tcgetattr on the master reads the slave's settings.
    return not termios.tcgetattr(terminal.fd)[3] & termios.ICANON


def pty_started(daemon, number=1):
    """Wait for session number to start; return (execc's pid, the command's pid)."""
    match = daemon.wait_for_log(r"session %d: start: peer pid (\d+) .*, pid (\d+), pty"
                                % number)
    return int(match.group(1)), int(match.group(2))


def pty_comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def pty_running(daemon, terminal, program, number=1):
    """Wait until the session's command runs program and execc is in raw mode.

    A key typed after that reaches the remote terminal.  Return
    (execc's pid, the command's pid)."""
    client_pid, pid = pty_started(daemon, number)
    assert wait_until(lambda: pty_comm(pid) == program), pty_comm(pid)
    assert wait_until(lambda: pty_is_raw(terminal))
    return client_pid, pid


def pty_foreground_job(session_id):
    """Return the name of a process of the session in its terminal's
    foreground process group, other than the session leader, or None."""
    for pid in session_pids(session_id):
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        process_group, foreground_group = int(fields[2]), int(fields[5])
        if pid != session_id and process_group == foreground_group:
            return pty_comm(pid)
    return None


def pty_kill_session(session_id):
    """SIGKILL what is left of a remote session this test caused."""
    for pid in session_pids(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pty_resize(terminal, rows, cols):
    fcntl.ioctl(terminal.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# A prompt that the shell's echo of typed commands cannot match.
PTY_PROMPT = "pty-prompt> "


def pty_shell(daemon, start):
    """Start execc with `bash --norc -i` on a Terminal and wait for the first prompt."""
    options = ["--env", "PS1=" + PTY_PROMPT]
    terminal = start(execc_argv(daemon, "bash", "--norc", "-i", options=options))
    pty_prompt(terminal)
    return terminal


def pty_prompt(terminal):
    """Wait for a fresh prompt: the output ends with it."""
    return terminal.read_until(re.escape(PTY_PROMPT.encode()) + rb"$")


# --- Pty mode: choosing a terminal -----------------------------------------------

def test_t_gives_remote_pts(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "tty", options=["-t"]))
    assert terminal.wait() == 0
    assert re.match(rb"/dev/pts/\d+\r\n$", terminal.output)


def test_terminal_defaults_to_pty(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "tty"))
    assert terminal.wait() == 0
    assert re.match(rb"/dev/pts/\d+\r\n$", terminal.output)


def test_T_forbids_pty_on_terminal(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "tty", options=["-T"]))
    assert terminal.wait() == 1
    assert b"not a tty" in terminal.output


def test_default_pipes_when_stdout_piped(daemon, pty_terminals):
    script = '"$@" | cat'
    terminal = pty_terminals(["sh", "-c", script, "sh"] + execc_argv(daemon, "tty"))
    assert terminal.wait() == 0
    assert b"not a tty" in terminal.output


def test_login_shell_refuses_T(daemon):
    result = subprocess.run([PYTHON, EXECC, "-T", daemon.destination],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=20)
    assert result.returncode == 255
    assert b"login shell needs a pty" in result.stderr


@pytest.mark.parametrize("escape", ["ab", "^1", "\u00e9"])
def test_invalid_escape_option_refused(daemon, escape):
    result = execc(daemon, "true", options=["-t", "-e", escape], stdin=subprocess.DEVNULL)
    assert result.returncode == 255
    assert len(result.stderr.splitlines()) == 1
    assert b"invalid -e" in result.stderr


def test_t_with_piped_stdin_works(daemon):
    script = b"echo piped-$((6 * 7))\nexit 3\n"
    result = execc(daemon, "bash", "--norc", "-i", options=["-t"], input=script)
    assert result.returncode == 3
    assert b"piped-42" in result.stdout


def test_pty_eof_after_partial_line(daemon):
    result = execc(daemon, "cat", options=["-t"], input=b"abc", timeout=20)
    assert result.returncode == 0
    assert result.stdout.endswith(b"abc")


def test_remote_term_is_clients(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sh", "-c", 'echo "term=$TERM"'),
                             env=pty_env(TERM="vt220"))
    assert terminal.wait() == 0
    assert b"term=vt220\r\n" in terminal.output


def test_stdout_stderr_share_terminal(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sh", "-c", "echo out; echo err >&2"))
    assert terminal.wait() == 0
    assert b"out\r\nerr\r\n" in terminal.output


def test_pty_stderr_arrives_on_stdout(daemon):
    result = execc(daemon, "sh", "-c", "echo out; echo err >&2", options=["-t"],
                   stdin=subprocess.DEVNULL)
    assert result.stdout == b"out\r\nerr\r\n"
    assert result.stderr == b""


def test_pty_output_is_byte_exact(daemon, pty_terminals):
    command = ["printf", r"\377\000\033[0m\t"]
    terminal = pty_terminals(execc_argv(daemon, *command))
    assert terminal.wait() == 0
    assert terminal.output == b"\xff\x00\x1b[0m\t"


def test_control_keys_reach_raw_remote(daemon, pty_terminals):
    script = "stty raw -echo; echo ready; head -c 4 | od -An -tx1"
    terminal = pty_terminals(execc_argv(daemon, "sh", "-c", script))
    terminal.read_until(rb"ready")
    assert wait_until(lambda: pty_is_raw(terminal))
    terminal.write(b"\x03\x1a\x1c\xff")
    assert terminal.wait() == 0
    assert re.search(rb"03 1a 1c ff", terminal.output)


# --- Pty mode: window size ---------------------------------------------------------

def test_stty_size_matches_client(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "stty", "size"), rows=33, cols=111)
    assert terminal.wait() == 0
    assert terminal.output == b"33 111\r\n"


def test_no_terminal_gets_default_size(daemon):
    result = execc(daemon, "stty", "size", options=["-t"], stdin=subprocess.DEVNULL)
    assert result.stdout == b"24 80\r\n"


def test_zero_window_gets_default_size(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "stty", "size"), rows=0, cols=0)
    assert terminal.wait() == 0
    assert terminal.output == b"24 80\r\n"


def test_resize_reaches_remote_command(daemon, pty_terminals):
    script = 'trap "stty size; exit 0" WINCH; echo ready; while :; do sleep 0.1; done'
    terminal = pty_terminals(execc_argv(daemon, "bash", "-c", script), rows=33, cols=111)
    terminal.read_until(rb"ready\r\n")
    assert wait_until(lambda: pty_is_raw(terminal))
    # No explicit SIGWINCH: the kernel sends it to execc, the foreground
    # process of the pty whose size changed.
    pty_resize(terminal, 40, 132)
    terminal.read_until(rb"40 132\r\n")
    assert terminal.wait() == 0


# --- Pty mode: terminal keys ---------------------------------------------------------

def test_ctrl_c_interrupts_remote_sleep(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sleep", "30"))
    pty_running(daemon, terminal, "sleep")
    started = time.monotonic()
    terminal.write(b"\x03")
    assert terminal.wait() == 130
    assert time.monotonic() - started < 3


def test_ctrl_backslash_quits_remote_sleep(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sleep", "30"))
    pty_running(daemon, terminal, "sleep")
    terminal.write(b"\x1c")
    assert terminal.wait() == 131


def test_ctrl_z_stops_job_in_shell(daemon, pty_terminals):
    terminal = pty_shell(daemon, pty_terminals)
    _, shell_pid = pty_started(daemon)
    terminal.write(b"sleep 30\r")
    assert wait_until(lambda: pty_foreground_job(shell_pid) == "sleep")
    terminal.write(b"\x1a")
    terminal.read_until(rb"Stopped\s+sleep 30")
    pty_prompt(terminal)
    terminal.write(b"bg\r")
    terminal.read_until(rb"sleep 30 &")
    pty_prompt(terminal)
    terminal.write(b"jobs\r")
    terminal.read_until(rb"Running\s+sleep 30 &")
    pty_prompt(terminal)
    terminal.write(b"fg\r")
    assert wait_until(lambda: pty_foreground_job(shell_pid) == "sleep")
    terminal.write(b"\x03")
    pty_prompt(terminal)
    terminal.write(b"exit 4\r")
    assert terminal.wait() == 4


# --- Pty mode: the client's terminal is restored ---------------------------------------

def test_raw_mode_restored_after_exit(daemon, pty_terminals):
    terminal = pty_terminals(pty_wrapped(daemon, "true"))
    assert pty_status(terminal) == 0
    assert terminal.wait() == 0
    before, after = pty_settings(terminal)
    assert before == after


def test_raw_mode_restored_after_signal(daemon, pty_terminals):
    terminal = pty_terminals(pty_wrapped(daemon, "sh", "-c", "kill -KILL $$"))
    assert pty_status(terminal) == 137
    assert terminal.wait() == 0
    before, after = pty_settings(terminal)
    assert before == after


def test_raw_mode_restored_daemon_killed(daemon, pty_terminals):
    terminal = pty_terminals(pty_wrapped(daemon, "sleep", "30"))
    _, pid = pty_running(daemon, terminal, "sleep")
    daemon.proc.kill()
    try:
        assert pty_status(terminal) == 255
        assert terminal.wait() == 0
        assert b"connection to unix:%s lost" % daemon.socket.encode() in terminal.output
        before, after = pty_settings(terminal)
        assert before == after
    finally:
        pty_kill_session(pid)


def test_raw_mode_restored_after_sigterm(daemon, pty_terminals):
    terminal = pty_terminals(pty_wrapped(daemon, "sleep", "30"))
    client_pid, pid = pty_running(daemon, terminal, "sleep")
    os.kill(client_pid, signal.SIGTERM)
    assert pty_status(terminal) == 128 + signal.SIGTERM
    assert terminal.wait() == 0
    assert wait_until(lambda: not session_pids(pid))
    before, after = pty_settings(terminal)
    assert before == after


def test_raw_mode_restored_after_sighup(daemon, pty_terminals):
    terminal = pty_terminals(pty_wrapped(daemon, "sleep", "30"))
    client_pid, pid = pty_running(daemon, terminal, "sleep")
    os.kill(client_pid, signal.SIGHUP)
    assert pty_status(terminal) == 128 + signal.SIGHUP
    assert terminal.wait() == 0
    assert wait_until(lambda: not session_pids(pid))
    before, after = pty_settings(terminal)
    assert before == after


def test_raw_mode_restored_after_ignored_sigterms(pty_quick_daemon, pty_terminals):
    # The remote shell and its sleeps ignore SIGTERM, because SIG_IGN
    # survives exec.  Only the third SIGTERM, which disconnects, ends execc.
    script = 'trap "" TERM; while :; do sleep 0.1; done'
    terminal = pty_terminals(pty_wrapped(pty_quick_daemon, "sh", "-c", script))
    client_pid, pid = pty_running(pty_quick_daemon, terminal, "sh")
    try:
        for count in (1, 2, 3):
            os.kill(client_pid, signal.SIGTERM)
            assert wait_until(lambda: pty_quick_daemon.log.count("forwarding SIGTERM") == count)
        assert pty_status(terminal) == 128 + signal.SIGTERM
        assert terminal.wait() == 0
        before, after = pty_settings(terminal)
        assert before == after
    finally:
        pty_kill_session(pid)


def test_closing_terminal_hangs_up_remote(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sleep", "30"))
    _, pid = pty_running(daemon, terminal, "sleep")
    # As when the user closes the terminal window: the kernel sends SIGHUP
    # to execc, which forwards it.
    os.close(terminal.fd)
    waited = wait_until(lambda: os.waitpid(terminal.pid, os.WNOHANG)[0])
    terminal.status = -1  # reaped above, so the fixture must not kill the pid
    assert waited == terminal.pid
    assert wait_until(lambda: not session_pids(pid), timeout=5)


def test_raw_mode_restored_after_escape(daemon, pty_terminals):
    terminal = pty_terminals(pty_wrapped(daemon, "sleep", "30"))
    pty_running(daemon, terminal, "sleep")
    terminal.write(b"~.")
    assert pty_status(terminal) == 255
    assert terminal.wait() == 0
    before, after = pty_settings(terminal)
    assert before == after


def test_raw_mode_restored_after_vi(daemon, pty_terminals, tmp_path):
    terminal = pty_terminals(pty_wrapped(daemon, "vi", str(tmp_path / "new.txt"),
                                         options=["-t"]), env=pty_env())
    pty_running(daemon, terminal, "vi")
    terminal.read_until(rb"new\.txt")
    terminal.write(b":q\r")
    assert pty_status(terminal) == 0
    assert terminal.wait() == 0
    before, after = pty_settings(terminal)
    assert before == after


# --- Pty mode: escapes -------------------------------------------------------------

def test_escape_dot_disconnects_and_hangs_up(pty_quick_daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(pty_quick_daemon, "sleep", "30"))
    _, pid = pty_running(pty_quick_daemon, terminal, "sleep")
    terminal.write(b"~.")
    assert terminal.wait() == 255
    assert wait_until(lambda: not session_pids(pid), timeout=5)


def test_escape_dot_kills_hup_ignorer(pty_quick_daemon, pty_terminals):
    script = 'trap "" HUP; echo trapped; while :; do sleep 0.1; done'
    terminal = pty_terminals(execc_argv(pty_quick_daemon, "sh", "-c", script))
    _, pid = pty_running(pty_quick_daemon, terminal, "sh")
    terminal.read_until(rb"trapped")  # SIGHUP before the trap would kill sh at once
    terminal.write(b"~.")
    assert terminal.wait() == 255
    pty_quick_daemon.wait_for_log(r"session 1: grace period over: SIGKILL")
    assert wait_until(lambda: not session_pids(pid), timeout=5)


def test_escape_after_enter_disconnects(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "cat"))
    pty_running(daemon, terminal, "cat")
    terminal.write(b"line\r")
    terminal.read_until(rb"line\r\nline\r\n")
    terminal.write(b"~.")
    assert terminal.wait() == 255


def test_escape_split_across_reads(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sleep", "30"))
    pty_running(daemon, terminal, "sleep")
    terminal.write(b"~")
    time.sleep(0.2)  # no event to wait for, because execc keeps the "~" back
    terminal.write(b".")
    assert terminal.wait() == 255


def test_escape_then_other_sends_both(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "cat"))
    pty_running(daemon, terminal, "cat")
    terminal.write(b"~x\r")
    terminal.read_until(rb"~x\r\n~x\r\n")
    terminal.write(b"\x04")
    assert terminal.wait() == 0


def test_escape_dot_needs_line_start(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "cat"))
    pty_running(daemon, terminal, "cat")
    terminal.write(b"a~.\r")
    terminal.read_until(rb"a~\.\r\na~\.\r\n")
    terminal.write(b"\x04")
    assert terminal.wait() == 0


def test_escape_question_lists_escapes(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "cat"))
    pty_running(daemon, terminal, "cat")
    terminal.write(b"~?")
    terminal.read_until(rb"~\.\s+disconnect")
    terminal.write(b"\x04")
    assert terminal.wait() == 0


def test_double_escape_sends_one(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "cat"))
    pty_running(daemon, terminal, "cat")
    terminal.write(b"~~x\r")
    terminal.read_until(rb"~x\r\n~x\r\n")
    terminal.write(b"\x04")
    assert terminal.wait() == 0
    assert b"~~" not in terminal.output


def test_escape_option_control_char(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sleep", "30", options=["-e", "^]"]))
    pty_running(daemon, terminal, "sleep")
    terminal.write(b"\x1d.")
    assert terminal.wait() == 255


def test_escape_option_percent_sign(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "sleep", "30", options=["-e", "%"]))
    pty_running(daemon, terminal, "sleep")
    terminal.write(b"%.")
    assert terminal.wait() == 255


def test_changed_escape_frees_tilde(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "cat", options=["-e", "%"]))
    pty_running(daemon, terminal, "cat")
    terminal.write(b"~.\r")
    terminal.read_until(rb"~\.\r\n~\.\r\n")
    terminal.write(b"\x04")
    assert terminal.wait() == 0


def test_escape_none_passes_tilde_dot(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "cat", options=["-e", "none"]))
    pty_running(daemon, terminal, "cat")
    terminal.write(b"~.\r")
    terminal.read_until(rb"~\.\r\n~\.\r\n")
    terminal.write(b"\x04")
    assert terminal.wait() == 0


# --- Pty mode: nothing is lost at the end ---------------------------------------------

def test_seq_prints_every_line(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "seq", "1", "100000", options=["-t"]))
    assert terminal.wait(timeout=60) == 0
    lines = terminal.output.split(b"\r\n")
    assert lines[-1] == b""
    assert lines[-2] == b"100000"
    assert len(lines) - 1 == 100000


def test_short_outputs_never_truncated(daemon):
    for batch in range(5):
        terminals = [Terminal(execc_argv(daemon, "echo", "hello-%d" % n, options=["-t"]))
                     for n in range(batch * 20, batch * 20 + 20)]
        try:
            for n, terminal in enumerate(terminals, batch * 20):
                assert terminal.wait() == 0
                assert terminal.output == b"hello-%d\r\n" % n
        finally:
            for terminal in terminals:
                terminal.kill()


# --- Pty mode: background jobs ---------------------------------------------------------

@pytest.mark.parametrize("job", ["yes > /dev/null &", "sleep 100 &"])
def test_background_job_does_not_hold(daemon, pty_terminals, job):
    terminal = pty_shell(daemon, pty_terminals)
    _, shell_pid = pty_started(daemon)
    try:
        terminal.write(job.encode() + b"\r")
        terminal.read_until(rb"\[1\] \d+")
        pty_prompt(terminal)
        terminal.write(b"exit\r")
        started = time.monotonic()
        assert terminal.wait() == 0
        assert time.monotonic() - started < 3
    finally:
        pty_kill_session(shell_pid)


def test_chatty_background_job_cut_promptly(daemon, pty_terminals):
    # When bash, the session leader, exits, Linux sends SIGHUP to the
    # foreground group but does not hang up a pty.  The job ignores SIGHUP
    # and keeps writing, so only the daemon's drain deadline ends the session.
    script = '(trap "" HUP; while :; do echo tick; sleep 0.05; done) & echo started'
    terminal = pty_terminals(execc_argv(daemon, "bash", "-c", script))
    _, pid = pty_started(daemon)
    try:
        terminal.read_until(rb"started")
        started = time.monotonic()
        assert terminal.wait() == 0
        assert time.monotonic() - started < 3
    finally:
        pty_kill_session(pid)


# --- Pty mode: full-screen programs and login shells --------------------------------------

def test_top_batch_output_is_sane(daemon, pty_terminals):
    terminal = pty_terminals(execc_argv(daemon, "top", "-b", "-n", "1", options=["-t"]),
                             env=pty_env())
    assert terminal.wait() == 0
    assert b"PID" in terminal.output


def test_no_command_starts_login_shell(daemon, pty_terminals):
    terminal = pty_terminals([PYTHON, EXECC, daemon.destination])
    shell = os.path.basename(pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh")
    pty_running(daemon, terminal, shell)
    terminal.read_until(rb"[#$] $")
    terminal.write(b"echo $0; exit\r")
    assert terminal.wait() == 0
    assert re.search(rb"[\r\n]-" + re.escape(shell.encode()) + rb"\r\n", terminal.output)


# ============================================================================
# Security, limits, fuzz and soak
# ============================================================================

# --- Security helpers: raw protocol, identities, /proc ------------------------

SEC_NOBODY = 65534               # uid of `nobody`
SEC_OTHER_GID = 65533            # a gid that is not the socket group
SEC_HEADER = struct.Struct("!IB")
SEC_HELLO, SEC_AUTH, SEC_REQUEST, SEC_STARTED = 0x01, 0x02, 0x04, 0x05
SEC_STDIN, SEC_STDIN_EOF, SEC_STDOUT, SEC_EXIT, SEC_ERROR = 0x10, 0x11, 0x20, 0x23, 0x7F
SEC_CLIENT_HELLO = {"protocol": 1, "program": "test_security"}


def sec_frame(frame_type, payload=b""):
    """Encode one frame; a dict payload becomes JSON."""
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return SEC_HEADER.pack(len(payload), frame_type) + payload


def sec_request(argv=("true",), **fields):
    request = {"argv": list(argv), "env": {}, "tty": False}
    request.update(fields)
    return sec_frame(SEC_REQUEST, request)


def sec_connect(daemon, timeout=10):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(daemon.socket)
    return sock


def sec_recv_exact(sock, count):
    """Read count bytes, or fewer at end of file or after a reset."""
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def sec_read_frame(sock):
    """Return the next (type, payload) from the daemon, or None at end of file."""
    header = sec_recv_exact(sock, SEC_HEADER.size)
    if len(header) < SEC_HEADER.size:
        return None
    length, frame_type = SEC_HEADER.unpack(header)
    return frame_type, sec_recv_exact(sock, length)


def sec_frames_until_close(sock):
    frames = []
    while True:
        frame = sec_read_frame(sock)
        if frame is None:
            return frames
        frames.append(frame)


def sec_fatal_errors(frames):
    """Return the messages of the fatal ERROR frames among frames."""
    return [json.loads(p)["message"] for t, p in frames
            if t == SEC_ERROR and json.loads(p).get("fatal")]


def sec_raw_session(daemon, argv=("true",), stdin=b""):
    """Run one command with the raw protocol and return (EXIT info, stdout bytes)."""
    with sec_connect(daemon) as sock:
        sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO))
        assert sec_read_frame(sock)[0] == SEC_HELLO
        data = sec_request(argv)
        if stdin:
            data += sec_frame(SEC_STDIN, stdin)
        sock.sendall(data + sec_frame(SEC_STDIN_EOF))
        stdout = b""
        while True:
            frame = sec_read_frame(sock)
            if frame is None:
                return None, stdout
            if frame[0] == SEC_STDOUT:
                stdout += frame[1]
            elif frame[0] == SEC_EXIT:
                return json.loads(frame[1]), stdout
            elif frame[0] == SEC_ERROR:
                return {"code": None, "error": json.loads(frame[1])["message"]}, stdout


def sec_serves_session(daemon):
    """Return True when the daemon still runs a normal command for execc."""
    token = getattr(daemon, "token_file", None)
    result = execc(daemon, "echo", "still serving", timeout=20,
                   options=["--token-file", token] if token else [])
    return result.returncode == 0 and result.stdout == b"still serving\n"


def sec_fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def sec_proc_stat(pid):
    """Return the fields of /proc/PID/stat after the command name (state is field 0)."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        line = f.read()
    return line[line.rfind(b")") + 2:].split()


def sec_cpu_seconds(pid):
    fields = sec_proc_stat(pid)  # utime and stime are fields 14 and 15 of stat
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sec_rss_bytes(pid):
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sec_children(pid):
    """Return (pid, state) for every process whose parent is pid."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = sec_proc_stat(int(name))
            except OSError:
                continue  # exited while we looked
            if int(fields[1]) == pid:
                found.append((int(name), fields[0].decode()))
    return found


def sec_settled(daemon, baseline_fds):
    """Wait until the daemon is back to baseline_fds open fds and no children."""
    return wait_until(lambda: sec_fd_count(daemon.pid) <= baseline_fds
                      and not sec_children(daemon.pid), timeout=15, interval=0.1)


def sec_drop_to(uid, gid, groups=()):
    """Return a preexec_fn that runs the child as uid/gid with exactly these groups."""
    def drop():
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    return drop


@functools.lru_cache(maxsize=None)
def sec_find_python_for_nobody():
    for candidate in (PYTHON, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run([candidate, "-c", "pass"], stderr=subprocess.DEVNULL,
                                   preexec_fn=sec_drop_to(SEC_NOBODY, SEC_NOBODY),
                                   timeout=30)
        except OSError:
            continue  # EACCES: a directory on its path is closed to uid 65534
        if probe.returncode == 0:
            return candidate
    return None


def sec_python_for_nobody():
    """Return an interpreter that uid 65534 can run, or skip (PYTHON may be under /root)."""
    python = sec_find_python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    return python


def sec_launcher(directory, name, setup, interpreter=PYTHON):
    """Write a launcher that runs `setup` (Python code), then execs interpreter.

    Daemon() takes an interpreter path.  A launcher in its place drops
    privileges or lowers limits first, so the daemon starts in that state.
    """
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write("#!%s\nimport os, resource, sys\n%s\n"
                "os.execv(%r, [%r] + sys.argv[1:])\n"
                % (PYTHON, setup, interpreter, interpreter))
    os.chmod(path, 0o755)
    return path


def sec_write_token(path, mode=0o600):
    token = b"sec-" + hashlib.sha256(os.urandom(32)).hexdigest().encode()
    with open(str(path), "wb") as f:
        f.write(token + b"\n")
    os.chmod(str(path), mode)
    return token


def sec_tcp_daemon(directory, *extra_args):
    """Start a daemon on 127.0.0.1 with a new token, its destination set for execc()."""
    token_file = os.path.join(str(directory), "token")
    sec_write_token(token_file)
    d = Daemon(directory, "--listen", "127.0.0.1:0", "--token-file", token_file,
               *extra_args, listen_unix=False)
    d.token_file = token_file
    d.destination = "127.0.0.1:%d" % d.tcp_port()
    return d


def sec_failed_start(directory, *extra_args, listen_unix=True):
    """Run a daemon that must fail to start and return (exit status, its log)."""
    argv = [PYTHON, EXECD] + list(extra_args)
    if listen_unix:
        argv += ["--listen", "unix:" + os.path.join(str(directory), "execd.sock")]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=20)
    return result.returncode, result.stderr.decode("utf-8", "replace")


@pytest.fixture
def sec_open_dir():
    """Create a directory that other users may traverse (tmp_path's parents are 0700)."""
    path = tempfile.mkdtemp(prefix="execd-sec-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sec_scripts(sec_open_dir):
    """Copy both scripts where uid 65534 can read them: the checkout may be private."""
    copies = []
    for script in (EXECC, EXECD):
        copy = os.path.join(sec_open_dir, os.path.basename(script))
        shutil.copyfile(script, copy)
        os.chmod(copy, 0o644)
        copies.append(copy)
    return copies


@pytest.fixture
def sec_nogroup():
    try:
        return grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no group named nogroup on this host")


@pytest.fixture
def sec_root():
    if os.geteuid() != 0:
        pytest.skip("needs root to act as other users")
    try:
        pwd.getpwuid(SEC_NOBODY)
    except KeyError:
        pytest.skip("no user with uid 65534 (nobody) on this host")


# --- Unix socket: permissions and planted paths --------------------------------

def test_socket_mode_is_0600(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


def test_socket_group_makes_mode_0660(tmp_path, sec_nogroup):
    d = Daemon(tmp_path, "--socket-group", "nogroup")
    try:
        st = os.stat(d.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == sec_nogroup
    finally:
        d.stop()


def test_rejects_socket_planted_by_other_user(tmp_path, sec_root):
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(tmp_path / "execd.sock"))
    planted.close()
    os.chown(str(tmp_path / "execd.sock"), SEC_NOBODY, SEC_NOBODY)
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "owned by uid 65534, not by you; refusing" in log
    assert os.stat(str(tmp_path / "execd.sock")).st_uid == SEC_NOBODY


def test_rejects_file_planted_by_other_user(tmp_path, sec_root):
    (tmp_path / "execd.sock").write_bytes(b"planted")
    os.chown(str(tmp_path / "execd.sock"), SEC_NOBODY, SEC_NOBODY)
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "exists and is not a socket" in log
    assert (tmp_path / "execd.sock").read_bytes() == b"planted"


def test_rejects_world_writable_directory(tmp_path):
    os.chmod(str(tmp_path), 0o777)
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "writable by others without the sticky bit" in log


def test_rejects_path_not_a_socket(tmp_path):
    (tmp_path / "execd.sock").mkdir()
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "exists and is not a socket" in log
    assert (tmp_path / "execd.sock").is_dir()


def test_rejection_is_one_log_line(tmp_path):
    (tmp_path / "execd.sock").write_bytes(b"")
    status, log = sec_failed_start(tmp_path)
    assert len(log.splitlines()) == 1


def test_stale_socket_replaced_on_restart(tmp_path):
    first = Daemon(tmp_path)
    first.proc.kill()
    first.stop()
    assert stat.S_ISSOCK(os.lstat(first.socket).st_mode)
    second = Daemon(tmp_path)
    try:
        assert sec_serves_session(second)
    finally:
        second.stop()


def test_second_daemon_rejects_live_socket(daemon, tmp_path):
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "already listening" in log
    assert sec_serves_session(daemon)


def test_default_socket_directory_is_private(tmp_path):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("EXECD_SOCKET", None)
    d = Daemon(tmp_path, listen_unix=False, env=env)
    try:
        d.socket = str(tmp_path / "execd" / "execd.sock")
        assert stat.S_IMODE(os.stat(str(tmp_path / "execd")).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    finally:
        d.stop()


def test_default_socket_directory_must_be_private(tmp_path):
    (tmp_path / "execd").mkdir(mode=0o775)
    os.chmod(str(tmp_path / "execd"), 0o775)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("EXECD_SOCKET", None)
    result = subprocess.run([PYTHON, EXECD], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20)
    assert result.returncode != 0
    assert b"writable only by you" in result.stderr


def test_client_rejects_foreign_default_socket(tmp_path, sec_root):
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(tmp_path / "planted.sock"))
    planted.listen(1)
    os.chown(str(tmp_path / "planted.sock"), SEC_NOBODY, SEC_NOBODY)
    env = dict(os.environ, EXECD_SOCKET=str(tmp_path / "planted.sock"))
    try:
        result = subprocess.run([PYTHON, EXECC, "--", "echo", "never"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=20)
    finally:
        planted.close()
    assert result.returncode == 255
    assert b"owned by uid 65534, not by you" in result.stderr


# --- SO_PEERCRED: who may use a unix socket -------------------------------------

def test_socket_group_member_accepted(sec_open_dir, sec_scripts, sec_root, sec_nogroup):
    d = Daemon(sec_open_dir, "--socket-group", "nogroup")
    try:
        result = execc(d, "echo", "member", python=sec_python_for_nobody(),
                       script=sec_scripts[0],
                       preexec_fn=sec_drop_to(SEC_NOBODY, SEC_OTHER_GID, [sec_nogroup]))
        assert result.returncode == 0
        assert result.stdout == b"member\n"
    finally:
        d.stop()


@pytest.mark.parametrize("group_args", [(), ("--socket-group", "nogroup")])
def test_peer_of_other_uid_rejected(sec_open_dir, sec_scripts, sec_root, sec_nogroup,
                                    group_args):
    d = Daemon(sec_open_dir, *group_args)
    try:
        # The socket mode is the first guard.  With the mode opened up, the
        # second guard, the SO_PEERCRED check, must still reject the peer.
        os.chmod(d.socket, 0o666)
        result = execc(d, "echo", "outsider", python=sec_python_for_nobody(),
                       script=sec_scripts[0],
                       preexec_fn=sec_drop_to(SEC_NOBODY, SEC_OTHER_GID))
        assert result.returncode == 255
        assert result.stdout == b""
        assert len(result.stderr.splitlines()) == 1
        assert b"permission denied: uid 65534" in result.stderr
        d.wait_for_log(r"rejected pid \d+ uid 65534: permission denied")
    finally:
        d.stop()


def test_socket_group_member_cannot_switch_user(sec_open_dir, sec_scripts, sec_root,
                                                sec_nogroup):
    d = Daemon(sec_open_dir, "--socket-group", "nogroup")
    try:
        result = execc(d, "id", "-u", options=["--user", "nobody"],
                       python=sec_python_for_nobody(), script=sec_scripts[0],
                       preexec_fn=sec_drop_to(SEC_NOBODY, SEC_OTHER_GID, [sec_nogroup]))
        assert result.returncode == 255
        assert b"only root or a token-authenticated client" in result.stderr
    finally:
        d.stop()


# --- TCP: token challenge-response -----------------------------------------------

def sec_wrong_token_attempt(port):
    """Authenticate with a wrong MAC; return (seconds until the reply, frames)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO))
        frame_type, payload = sec_read_frame(sock)
        assert json.loads(payload)["auth"] == "token"
        started = time.monotonic()
        sock.sendall(sec_frame(SEC_AUTH, {"nonce": os.urandom(32).hex(),
                                          "mac": os.urandom(32).hex()}))
        frames = sec_frames_until_close(sock)
        return time.monotonic() - started, frames


def sec_recording_proxy(target_port):
    """Start a TCP relay on 127.0.0.1 to target_port that records both directions.

    Returns (port, recording, thread).  The thread ends after one connection.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    recording = bytearray()

    def relay():
        with listener:
            client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port), timeout=30)
        peers = {client: upstream, upstream: client}
        open_ends = set(peers)
        while open_ends and select.select(list(open_ends), [], [], 30)[0]:
            for sock in select.select(list(open_ends), [], [], 0)[0]:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                recording.extend(data)
                if data:
                    peers[sock].sendall(data)
                    continue
                open_ends.discard(sock)
                try:
                    peers[sock].shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # ENOTCONN: that side has closed completely
        for sock in peers:
            sock.close()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    return listener.getsockname()[1], recording, thread


def test_correct_token_runs_command(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        result = execc(d, "echo", "authenticated", options=["--token-file", d.token_file])
        assert result.returncode == 0
        assert result.stdout == b"authenticated\n"
    finally:
        d.stop()


def test_wrong_token_fails_with_255(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        sec_write_token(tmp_path / "wrong")
        result = execc(d, "echo", "never", options=["--token-file", str(tmp_path / "wrong")])
        assert result.returncode == 255
        assert result.stdout == b""
        assert b"authentication failed" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    finally:
        d.stop()


def test_missing_token_fails_with_255(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        result = execc(d, "echo", "never")
        assert result.returncode == 255
        assert b"requires a token" in result.stderr
    finally:
        d.stop()


def test_failed_auth_logged_with_peer_address(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        sec_wrong_token_attempt(d.tcp_port())
        assert d.wait_for_log(r"connection from 127\.0\.0\.1:\d+: authentication failed")
    finally:
        d.stop()


def test_repeated_auth_failures_slow_down(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        delays = [sec_wrong_token_attempt(d.tcp_port())[0] for _ in range(3)]
        # Each failure from one address doubles the wait (0.25, 0.5, 1 s).
        # Load only adds time, so the lower bounds hold on a busy machine.
        assert delays[1] > delays[0], delays
        assert delays[2] > delays[1], delays
        assert delays[1] >= 0.45, delays
        assert delays[2] >= 0.9, delays
    finally:
        d.stop()


def test_wrong_token_answered_with_fatal_error(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        _, frames = sec_wrong_token_attempt(d.tcp_port())
        assert [m[:21] for m in sec_fatal_errors(frames)] == ["authentication failed"]
        assert sec_serves_session(d)
    finally:
        d.stop()


def test_token_never_crosses_the_wire(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        with open(d.token_file, "rb") as f:
            token = f.read().strip()
        port, recording, relay = sec_recording_proxy(d.tcp_port())
        d.destination = "127.0.0.1:%d" % port
        result = execc(d, "echo", "relayed", options=["--token-file", d.token_file])
        relay.join(30)
        assert result.returncode == 0
        assert b"relayed" in recording  # the recording saw the session
        assert b'"mac"' in recording    # ... and its authentication
        assert token not in recording
        assert token.hex().encode() not in recording
    finally:
        d.stop()


def test_daemon_rejects_loose_token_file(tmp_path):
    sec_write_token(tmp_path / "token", mode=0o640)
    status, log = sec_failed_start(tmp_path, "--listen", "127.0.0.1:0", "--token-file",
                                   str(tmp_path / "token"), listen_unix=False)
    assert status != 0
    assert len(log.splitlines()) == 1
    assert "chmod 600" in log


def test_daemon_rejects_short_token(tmp_path):
    (tmp_path / "token").write_bytes(b"short\n")
    os.chmod(str(tmp_path / "token"), 0o600)
    status, log = sec_failed_start(tmp_path, "--listen", "127.0.0.1:0", "--token-file",
                                   str(tmp_path / "token"), listen_unix=False)
    assert status != 0
    assert "use at least 16" in log


def test_client_rejects_loose_token_file(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        shutil.copy(d.token_file, str(tmp_path / "loose"))
        os.chmod(str(tmp_path / "loose"), 0o644)
        result = execc(d, "echo", "never", options=["--token-file", str(tmp_path / "loose")])
        assert result.returncode == 255
        assert len(result.stderr.splitlines()) == 1
        assert b"chmod 600" in result.stderr
    finally:
        d.stop()


# --- TLS ----------------------------------------------------------------------------

def sec_make_cert(directory, name, alt_name):
    """Create a self-signed certificate and key with openssl; return (cert, key, sha256)."""
    import ssl
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert = os.path.join(str(directory), name + ".crt")
    key = os.path.join(str(directory), name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=execd-test", "-addext", "subjectAltName=" + alt_name,
                    "-keyout", key, "-out", cert],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    with open(cert) as f:
        fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()
    return cert, key, fingerprint


@pytest.fixture
def sec_tls_daemon(tmp_path):
    cert, key, fingerprint = sec_make_cert(tmp_path, "daemon", "IP:127.0.0.1")
    d = sec_tcp_daemon(tmp_path, "--tls-cert", cert, "--tls-key", key)
    d.cert, d.fingerprint = cert, fingerprint
    yield d
    d.stop()


def test_tls_with_pinned_fingerprint_works(sec_tls_daemon):
    d = sec_tls_daemon
    result = execc(d, "echo", "over tls", options=[
        "--token-file", d.token_file, "--tls", "--tls-fingerprint", d.fingerprint])
    assert result.returncode == 0
    assert result.stdout == b"over tls\n"


def test_tls_wrong_fingerprint_fails_255(sec_tls_daemon):
    d = sec_tls_daemon
    result = execc(d, "echo", "never", options=[
        "--token-file", d.token_file, "--tls", "--tls-fingerprint", "ab" * 32])
    assert result.returncode == 255
    assert result.stdout == b""
    assert b"fingerprint" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_tls_with_ca_matching_ip_works(sec_tls_daemon):
    d = sec_tls_daemon
    result = execc(d, "echo", "verified", options=[
        "--token-file", d.token_file, "--tls", "--tls-ca", d.cert])
    assert result.returncode == 0
    assert result.stdout == b"verified\n"


def test_tls_ca_rejects_other_name(tmp_path):
    cert, key, _ = sec_make_cert(tmp_path, "other", "DNS:other.invalid")
    d = sec_tcp_daemon(tmp_path, "--tls-cert", cert, "--tls-key", key)
    try:
        result = execc(d, "echo", "never", options=[
            "--token-file", d.token_file, "--tls", "--tls-ca", cert])
        assert result.returncode == 255
        assert b"TLS with 127.0.0.1" in result.stderr
    finally:
        d.stop()


def test_plain_client_on_tls_port_fails_255(sec_tls_daemon):
    d = sec_tls_daemon
    result = execc(d, "echo", "never", options=["--token-file", d.token_file])
    assert result.returncode == 255
    assert len(result.stderr.splitlines()) == 1


def test_plain_non_loopback_listener_warns_once(tmp_path):
    sec_write_token(tmp_path / "token")
    d = Daemon(tmp_path, "--listen", "0.0.0.0:0", "--token-file", str(tmp_path / "token"),
               listen_unix=False)
    try:
        d.wait_for_log(r"listening on 0\.0\.0\.0:\d+")
        warnings = [line for line in d.lines if "TLS is off" in line]
        assert len(warnings) == 1
        assert "0.0.0.0" in warnings[0]
    finally:
        d.stop()


def test_plain_loopback_listener_does_not_warn(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        assert "TLS is off" not in d.log
    finally:
        d.stop()


def test_tls_listener_never_warns(tmp_path):
    cert, key, _ = sec_make_cert(tmp_path, "daemon", "IP:127.0.0.1")
    sec_write_token(tmp_path / "token")
    d = Daemon(tmp_path, "--listen", "0.0.0.0:0", "--token-file", str(tmp_path / "token"),
               "--tls-cert", cert, "--tls-key", key, listen_unix=False)
    try:
        d.wait_for_log(r"listening on 0\.0\.0\.0:\d+")
        assert "TLS is off" not in d.log
    finally:
        d.stop()


# --- --user: switching users --------------------------------------------------------

SEC_SHOW_IDENTITY = ('id -u; id -G; echo "$HOME|$USER|$LOGNAME|$SHELL"; pwd')


def sec_expected_identity(name):
    """Return what SEC_SHOW_IDENTITY prints for user name; HOME and cwd are / if home is missing."""
    account = pwd.getpwnam(name)
    home = account.pw_dir if os.path.isdir(account.pw_dir) else "/"
    return ("%d\n%d\n%s|%s|%s|%s\n%s\n" % (
        account.pw_uid, account.pw_gid, home, name, name,
        account.pw_shell, home)).encode()


def test_root_peer_runs_command_as_nobody(daemon, sec_root):
    result = execc(daemon, "sh", "-c", SEC_SHOW_IDENTITY, options=["--user", "nobody"])
    assert result.returncode == 0
    assert result.stdout == sec_expected_identity("nobody")


def test_token_peer_runs_command_as_nobody(tmp_path, sec_root):
    d = sec_tcp_daemon(tmp_path)
    try:
        result = execc(d, "id", "-u", options=["--token-file", d.token_file,
                                               "--user", "nobody"])
        assert result.returncode == 0
        assert result.stdout == b"65534\n"
    finally:
        d.stop()


def test_unknown_user_is_clear_error(daemon):
    result = execc(daemon, "id", "-u", options=["--user", "nosuchuser"])
    assert result.returncode == 255
    assert result.stdout == b""
    assert b"unknown user 'nosuchuser'" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_unknown_group_is_clear_error(daemon):
    result = execc(daemon, "id", "-u", options=["--user", "nobody", "--group", "nosuchgroup"])
    assert result.returncode == 255
    assert b"unknown group 'nosuchgroup'" in result.stderr


def test_non_root_daemon_rejects_user_switch(sec_open_dir, sec_scripts, sec_root):
    os.chown(sec_open_dir, SEC_NOBODY, SEC_NOBODY)
    launcher = sec_launcher(sec_open_dir, "as-nobody", "os.setgroups([]); os.setgid(%d); "
                            "os.setuid(%d)" % (SEC_NOBODY, SEC_NOBODY),
                            interpreter=sec_python_for_nobody())
    d = Daemon(sec_open_dir, python=launcher, script=sec_scripts[1])
    try:
        assert os.stat(d.socket).st_uid == SEC_NOBODY
        result = execc(d, "id", "-u", options=["--user", "root"])
        assert result.returncode == 255
        assert result.stdout == b""
        assert b"only a root daemon can switch users" in result.stderr
        assert sec_serves_session(d)
    finally:
        d.stop()


# --- Limits: sessions, frame sizes, handshakes -----------------------------------------

def sec_open_session(daemon, argv=("cat",)):
    """Start a command over a raw connection and return the socket once it runs."""
    sock = sec_connect(daemon)
    sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO) + sec_request(argv))
    while True:
        frame = sec_read_frame(sock)
        assert frame is not None and frame[0] != SEC_ERROR, frame
        if frame[0] == SEC_STARTED:
            return sock


def sec_finish_session(sock):
    """Send end of file, read up to EXIT, close, and return the EXIT info."""
    sock.sendall(sec_frame(SEC_STDIN_EOF))
    with sock:
        for frame_type, payload in sec_frames_until_close(sock):
            if frame_type == SEC_EXIT:
                return json.loads(payload)


def sec_hello(daemon):
    """Open a raw connection and exchange HELLO (a unix socket needs no token)."""
    sock = sec_connect(daemon)
    sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO))
    frame_type, payload = sec_read_frame(sock)
    assert frame_type == SEC_HELLO
    return sock, json.loads(payload)


def test_session_over_max_sessions_rejected(tmp_path):
    d = Daemon(tmp_path, "--max-sessions", "2")
    try:
        running = [sec_open_session(d), sec_open_session(d)]
        result = execc(d, "echo", "third")
        assert result.returncode == 255
        assert result.stdout == b""
        assert b"too many sessions" in result.stderr
        d.wait_for_log(r"WARNING: .*too many sessions")
        assert [sec_finish_session(s)["code"] for s in running] == [0, 0]
        assert sec_serves_session(d)
    finally:
        d.stop()


def test_frame_above_max_frame_rejected(tmp_path):
    d = Daemon(tmp_path, "--max-frame", "65536")
    try:
        sock = sec_open_session(d)
        with sock:
            sock.sendall(SEC_HEADER.pack(65537, SEC_STDIN))
            messages = sec_fatal_errors(sec_frames_until_close(sock))
        assert messages == ["frame of 65537 bytes exceeds the maximum of 65536"]
        assert sec_serves_session(d)
    finally:
        d.stop()


def test_frame_at_max_frame_accepted(tmp_path):
    d = Daemon(tmp_path, "--max-frame", "65536")
    try:
        sock, hello = sec_hello(d)
        assert hello["max_frame"] == 65536
        sock.close()
        info, stdout = sec_raw_session(d, ["cat"], stdin=b"x" * 65536)
        assert info["code"] == 0
        assert stdout == b"x" * 65536
    finally:
        d.stop()


def test_request_above_max_frame_rejected(tmp_path):
    d = Daemon(tmp_path, "--max-frame", "65536")
    try:
        sock, _ = sec_hello(d)
        with sock:
            sock.sendall(sec_request(["echo", "y" * 70000]))
            messages = sec_fatal_errors(sec_frames_until_close(sock))
        assert len(messages) == 1
        assert "exceeds the maximum of 65536" in messages[0]
    finally:
        d.stop()


def test_preauth_frame_above_4096_rejected(daemon):
    with sec_connect(daemon) as sock:
        sock.sendall(SEC_HEADER.pack(4097, SEC_HELLO))
        messages = sec_fatal_errors(sec_frames_until_close(sock))
    assert messages == ["frame of 4097 bytes exceeds the maximum of 4096"]
    assert sec_serves_session(daemon)


def test_preauth_frame_of_4096_accepted(daemon):
    hello = json.dumps(SEC_CLIENT_HELLO).encode()
    hello += b" " * (4096 - len(hello))  # JSON allows trailing whitespace
    with sec_connect(daemon) as sock:
        sock.sendall(sec_frame(SEC_HELLO, hello))
        assert sec_read_frame(sock)[0] == SEC_HELLO


def test_preauth_limit_holds_until_token_verified(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", d.tcp_port()), timeout=10) as sock:
            sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO))
            assert sec_read_frame(sock)[0] == SEC_HELLO
            sock.sendall(SEC_HEADER.pack(4097, SEC_AUTH))
            messages = sec_fatal_errors(sec_frames_until_close(sock))
        assert messages == ["frame of 4097 bytes exceeds the maximum of 4096"]
    finally:
        d.stop()


def test_silent_connection_times_out(tmp_path):
    d = Daemon(tmp_path, "--handshake-timeout", "1")
    try:
        with sec_connect(d) as sock:
            started = time.monotonic()
            messages = sec_fatal_errors(sec_frames_until_close(sock))
            elapsed = time.monotonic() - started
        assert messages == ["handshake timed out after 1 s"]
        assert 0.8 < elapsed < 2.5
        assert sec_serves_session(d)
    finally:
        d.stop()


def test_connection_over_max_unauthenticated_rejected(tmp_path):
    d = Daemon(tmp_path, "--max-unauthenticated", "3", "--handshake-timeout", "30")
    try:
        baseline = sec_fd_count(d.pid)
        idle = [sec_connect(d) for _ in range(3)]
        assert wait_until(lambda: sec_fd_count(d.pid) == baseline + 3)
        with sec_connect(d) as fourth:
            messages = sec_fatal_errors(sec_frames_until_close(fourth))
        assert messages == ["too many connections in their handshake; try again"]
        d.wait_for_log(r"rejected pid \d+ uid 0: 3 connections are already in their handshake")
        for sock in idle:
            sock.close()
        assert wait_until(lambda: sec_fd_count(d.pid) == baseline)
        assert sec_serves_session(d)
    finally:
        d.stop()


# --- Out of file descriptors (EMFILE) ----------------------------------------------

def sec_try_session(daemon, argv=("cat",)):
    """Start a command like sec_open_session, or return (None, message) on an ERROR."""
    sock = sec_connect(daemon)
    sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO) + sec_request(argv))
    while True:
        frame = sec_read_frame(sock)
        if frame is None or frame[0] == SEC_ERROR:
            sock.close()
            return None, frame and json.loads(frame[1])["message"]
        if frame[0] == SEC_STARTED:
            return sock, None


def test_fd_exhaustion_survived_without_spinning(tmp_path):
    launcher = sec_launcher(tmp_path, "lowfd",
                            "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))")
    d = Daemon(tmp_path, "--handshake-timeout", "30", "--hangup-grace", "1", python=launcher)
    try:
        baseline = sec_fd_count(d.pid)  # before any client, so no connection fd counts
        assert sec_serves_session(d)
        # NOTE: assumes about 4 fds per running session, so a session start
        # (8 new pipe fds) runs out of fds before accept() (1 fd) does.
        sessions, rejection = [], None
        while rejection is None and len(sessions) < 20:
            sock, rejection = sec_try_session(d)
            if sock is not None:
                sessions.append(sock)
        assert rejection == "cannot start the command: Too many open files"
        # More connections than free fds, so accept() fails with EMFILE.
        idle = [sec_connect(d) for _ in range(20)]
        d.wait_for_log(r"ERROR: accept on unix:\S+ failed: Too many open files; pausing")
        cpu_before = sec_cpu_seconds(d.pid)
        time.sleep(2)  # a measurement window, not a wait for an event
        assert sec_cpu_seconds(d.pid) - cpu_before < 0.3
        assert d.proc.poll() is None
        for sock in idle:
            sock.close()
        assert [sec_finish_session(s)["code"] for s in sessions] == [0] * len(sessions)
        assert sec_settled(d, baseline)
        assert sec_serves_session(d)
    finally:
        d.stop()


# --- Fuzzing the daemon with bad input ------------------------------------------------

SEC_DAEMON_FRAME_TYPES = {0x01, 0x03, 0x05, 0x20, 0x21, 0x22, 0x23, 0x7F}
SEC_FUZZ_WORKERS = 6


def sec_valid_session_bytes(argv=("/bin/true",)):
    """Return the frames of a complete, valid client side of a session."""
    return [sec_frame(SEC_HELLO, SEC_CLIENT_HELLO),
            sec_request(argv, env={"PATH": "/nonexistent"}, cwd="/"),
            sec_frame(SEC_STDIN, b"fuzz input\n"),
            sec_frame(SEC_STDIN_EOF)]


def sec_fuzz_case(daemon, data, ending="half_close"):
    """Send data on a new connection, then end it; return a problem or None.

    ending "half_close" shuts down the write side and reads the daemon's
    frames up to its close, which must follow the end of file.  "await_exit"
    reads until EXIT, a fatal ERROR or the close, then closes.  "reset"
    closes at once with RST, as a crashed client would.  Every frame read
    must be well formed.
    """
    sock = sec_connect(daemon, timeout=15)
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # EPIPE: the daemon rejected the input early and closed
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        if ending == "half_close":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # ENOTCONN: already closed by the daemon
        try:
            while True:
                frame = sec_read_frame(sock)
                if frame is None:
                    return None
                frame_type, payload = frame
                if frame_type not in SEC_DAEMON_FRAME_TYPES:
                    return "frame type 0x%02x in reply to %r" % (frame_type, data[:200])
                if frame_type in (SEC_EXIT, SEC_ERROR) and not isinstance(
                        json.loads(payload), dict):
                    return "payload %r in reply to %r" % (payload, data[:200])
                if ending == "await_exit" and (frame_type == SEC_EXIT or frame_type == SEC_ERROR
                                        and json.loads(payload).get("fatal")):
                    return None
        except socket.timeout:
            return "no answer within 15 s to %r" % data[:200]
    finally:
        sock.close()


def sec_run_batch(daemon, cases):
    """Run (data, ending) cases in parallel and return the problems found."""
    with concurrent.futures.ThreadPoolExecutor(SEC_FUZZ_WORKERS) as pool:
        results = pool.map(lambda case: sec_fuzz_case(daemon, *case), cases)
        return [problem for problem in results if problem]


@pytest.fixture
def sec_fuzz_daemon(tmp_path):
    d = Daemon(tmp_path, "--handshake-timeout", "2", "--hangup-grace", "1")
    d.baseline_fds = sec_fd_count(d.pid)  # before any client, so no connection fd counts
    assert sec_serves_session(d)
    yield d
    d.stop()


def sec_assert_healthy(d):
    assert d.proc.poll() is None
    assert sec_settled(d, d.baseline_fds), (sec_fd_count(d.pid), sec_children(d.pid))
    assert sec_serves_session(d)
    assert "Traceback" not in d.log


def sec_mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        action = rng.random()
        position = rng.randrange(len(data))
        if action < 0.6:
            data[position] = rng.randrange(256)
        elif action < 0.8:
            del data[position]
        else:
            data.insert(position, rng.randrange(256))
    return bytes(data)


def test_fuzz_random_bytes(sec_fuzz_daemon):
    rng = random.Random(1)
    cases = []
    for _ in range(2000):
        size = rng.choice([rng.randint(0, 16), rng.randint(0, 200), rng.randint(0, 6000)])
        data = bytes(rng.randrange(256) for _ in range(size))
        if rng.random() < 0.5:  # a plausible header makes the body get parsed
            data = SEC_HEADER.pack(len(data), rng.choice([1, 2, 4, 0x10, 0x7F])) + data
        cases.append((data, rng.choice(["half_close", "half_close", "reset"])))
    assert sec_run_batch(sec_fuzz_daemon, cases) == []
    sec_assert_healthy(sec_fuzz_daemon)


def test_fuzz_mutated_valid_sessions(sec_fuzz_daemon):
    rng = random.Random(2)
    valid = b"".join(sec_valid_session_bytes())
    # Not "await_exit": a mutated length may leave the daemon waiting, correctly.
    cases = [(sec_mutate(rng, valid), rng.choice(["half_close", "half_close", "reset"]))
             for _ in range(2000)]
    assert sec_run_batch(sec_fuzz_daemon, cases) == []
    sec_assert_healthy(sec_fuzz_daemon)


SEC_WEIRD_VALUES = [None, True, False, -1, 0, 1, 65536, 2 ** 31, 2 ** 64, 1.5, "", "x" * 5000,
                    "\0", "\udc80", "\u00e9", [], {}, ["a"], {"a": 1}, "TERM", "KILL",
                    "STOP", "../..", "/nonexistent", "stdout", "root", "nosuchuser"]
SEC_FIELDS = {
    SEC_REQUEST: ["argv", "env", "cwd", "tty", "rows", "cols", "term", "user", "group"],
    0x12: ["signal"],             # SIGNAL
    0x13: ["rows", "cols"],       # WINSIZE
    0x14: ["stream"],             # OUTPUT_CLOSED
}
SEC_ARGVS = [["cat"], [], "cat", [1], ["cat", None], ["\0"], ["/nonexistent/x"], ["cat", "-u"]]


def sec_weird_session(rng):
    """Build HELLO, REQUEST and session frames with odd JSON values; return (data, ending)."""
    request = {"argv": ["cat"], "env": {}, "tty": rng.random() < 0.3}
    field = rng.choice(SEC_FIELDS[SEC_REQUEST])
    if field == "argv":
        request["argv"] = rng.choice(SEC_ARGVS)
    elif field == "env":
        request["env"] = rng.choice([{rng.choice(["", "A=B", "\0", "PATH"]): "x"},
                                     {"A": rng.choice(SEC_WEIRD_VALUES)},
                                     rng.choice(SEC_WEIRD_VALUES)])
    elif rng.random() < 0.8:
        request[field] = rng.choice(SEC_WEIRD_VALUES)
    data = sec_frame(SEC_HELLO, SEC_CLIENT_HELLO) + sec_frame(SEC_REQUEST, request)
    for _ in range(rng.randint(0, 3)):
        frame_type = rng.choice([0x12, 0x13, 0x14, SEC_STDIN])
        if frame_type == SEC_STDIN:
            # A terminal gives control bytes meaning (^S stops output, ^Z
            # the command), so in pty mode only plain lines go in.
            plain = request["tty"] is not False
            data += sec_frame(SEC_STDIN, b"plain line\n" if plain else
                              bytes(rng.randrange(256) for _ in range(20)))
            continue
        payload = {"signal": "USR1", "rows": 30, "cols": 100, "stream": "stderr"}
        payload[rng.choice(SEC_FIELDS[frame_type])] = rng.choice(SEC_WEIRD_VALUES)
        data += sec_frame(frame_type, payload)
    # NOTE: a login shell (empty argv, bash here) kept running after an end
    # of file sent before its prompt, so those sessions end by the close.
    ending = "half_close" if request["argv"] == [] else "await_exit"
    return data + sec_frame(SEC_STDIN_EOF), ending


def test_fuzz_weird_field_values(sec_fuzz_daemon):
    rng = random.Random(4)
    cases = [sec_weird_session(rng) for _ in range(500)]
    assert sec_run_batch(sec_fuzz_daemon, cases) == []
    sec_assert_healthy(sec_fuzz_daemon)


def test_fuzz_truncated_and_oversized_frames(sec_fuzz_daemon):
    rng = random.Random(3)
    frames = sec_valid_session_bytes()
    cases = []
    for _ in range(600):
        cut = rng.randrange(len(frames))
        prefix = b"".join(frames[:cut])
        frame = frames[cut]
        if rng.random() < 0.5:  # truncated: the frame stops early
            data = prefix + frame[:rng.randrange(len(frame))]
        else:  # oversized: the header claims more than follows
            length = rng.choice([len(frame) + 1, 4097, 1 << 20, (1 << 20) + 1,
                                 (1 << 32) - 1, rng.randrange(1 << 32)])
            data = prefix + SEC_HEADER.pack(length, frame[4]) + frame[5:]
        cases.append((data, rng.choice(["half_close", "half_close", "reset"])))
    assert sec_run_batch(sec_fuzz_daemon, cases) == []
    sec_assert_healthy(sec_fuzz_daemon)


def test_abrupt_close_at_every_offset(sec_fuzz_daemon):
    valid = b"".join(sec_valid_session_bytes(("cat",)))
    cases = [(valid[:offset], ending) for offset in range(len(valid) + 1)
             for ending in ("half_close", "reset")]
    assert sec_run_batch(sec_fuzz_daemon, cases) == []
    sec_assert_healthy(sec_fuzz_daemon)


SEC_OUT_OF_ORDER = [
    ("STDIN before the request", [0], sec_frame(SEC_STDIN, b"early"),
     "unexpected STDIN frame (wait request)"),
    ("REQUEST before HELLO", [], sec_request(), "unexpected REQUEST frame (wait hello)"),
    ("a second HELLO", [0], sec_frame(SEC_HELLO, SEC_CLIENT_HELLO),
     "unexpected HELLO frame (wait request)"),
    ("AUTH on a unix socket", [0], sec_frame(SEC_AUTH, {"nonce": "00", "mac": "00"}),
     "unexpected AUTH frame (wait request)"),
    ("a second REQUEST", [0, 1], sec_request(), "unexpected REQUEST frame (in session)"),
    ("STDIN after STDIN_EOF", [0, 1, 3], sec_frame(SEC_STDIN, b"late"),
     "STDIN after STDIN_EOF"),
    ("a second STDIN_EOF", [0, 1, 3], sec_frame(SEC_STDIN_EOF), "a second STDIN_EOF"),
    ("a daemon frame type", [0, 1], sec_frame(SEC_EXIT, {"code": 0}),
     "unexpected EXIT frame (in session)"),
    ("an unknown frame type", [0], sec_frame(0x42, b"{}"), "unknown frame type 0x42"),
]


@pytest.mark.parametrize("case", SEC_OUT_OF_ORDER, ids=[c[0] for c in SEC_OUT_OF_ORDER])
def test_out_of_order_frame_is_fatal(sec_fuzz_daemon, case):
    _, before, bad, message = case
    frames = sec_valid_session_bytes(("cat",))
    with sec_connect(sec_fuzz_daemon) as sock:
        sock.sendall(b"".join(frames[i] for i in before) + bad)
        replies = sec_frames_until_close(sock)
    assert sec_fatal_errors(replies) == [message]
    sec_assert_healthy(sec_fuzz_daemon)


# --- Soak: many sessions, no leaks --------------------------------------------------

SEC_SOAK_SEQUENTIAL = 2000
SEC_SOAK_CONCURRENT = 200
SEC_SOAK_RSS_GROWTH = 10 << 20  # bytes the daemon's RSS may grow over the soak


def test_soak_sessions_leave_no_leaks(tmp_path):
    d = Daemon(tmp_path, "--hangup-grace", "1")
    try:
        baseline_fds = sec_fd_count(d.pid)
        for _ in range(20):  # warm up allocator pools before the RSS baseline
            sec_raw_session(d)
        baseline_rss = sec_rss_bytes(d.pid)
        codes = [sec_raw_session(d)[0]["code"] for _ in range(SEC_SOAK_SEQUENTIAL)]
        assert codes == [0] * SEC_SOAK_SEQUENTIAL
        running = [sec_open_session(d) for _ in range(SEC_SOAK_CONCURRENT)]
        for sock in running:
            sock.sendall(sec_frame(SEC_STDIN, b"soak") + sec_frame(SEC_STDIN_EOF))
        results = set()
        for sock in running:
            with sock:
                frames = sec_frames_until_close(sock)
            results.add((b"".join(p for t, p in frames if t == SEC_STDOUT),
                         [json.loads(p)["code"] for t, p in frames if t == SEC_EXIT][0]))
        assert results == {(b"soak", 0)}
        assert sec_settled(d, baseline_fds), (sec_fd_count(d.pid), sec_children(d.pid))
        assert [pid for pid, state in sec_children(d.pid) if state == "Z"] == []
        assert sec_rss_bytes(d.pid) < baseline_rss + SEC_SOAK_RSS_GROWTH
        assert d.proc.poll() is None
    finally:
        d.stop()


# ==============================================================================
# Regressions found by trying the product as a new user
# ==============================================================================

def test_signal_right_after_request_delivered(daemon):
    # A raw client that sends SIGNAL at once, before the command's exec, used
    # to lose it: the process group did not exist yet.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(daemon.socket)
    hello = json.dumps({"protocol": 1}).encode()
    request = json.dumps({"argv": ["sleep", "30"], "tty": False}).encode()
    signal_frame = json.dumps({"signal": "TERM"}).encode()
    frames = b""
    for frame_type, payload in ((0x01, hello), (0x04, request), (0x12, signal_frame)):
        frames += struct.pack("!IB", len(payload), frame_type) + payload
    sock.sendall(frames)
    data = b""
    started = time.monotonic()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert time.monotonic() - started < 10
    assert b'"signal":"TERM"' in data


def test_bad_log_file_is_one_line(tmp_path):
    result = subprocess.run([PYTHON, EXECD, "--log-file", str(tmp_path / "no" / "log"),
                             "--listen", "unix:" + str(tmp_path / "s.sock")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=20)
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert b"cannot open --log-file" in result.stderr


def test_empty_command_rejected(daemon):
    result = execc(daemon, "")
    assert result.returncode == 255
    assert len(result.stderr.splitlines()) == 1
    assert b"empty string" in result.stderr


def test_daemon_usage_error_is_one_line():
    result = subprocess.run([PYTHON, EXECD, "--max-frame", "10"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert b"--max-frame" in result.stderr


def test_bad_tls_fingerprint_is_usage_error():
    # The value is checked before any connection: nothing listens on port 1.
    result = subprocess.run([PYTHON, EXECC, "--tls", "--tls-fingerprint", "zz",
                             "127.0.0.1:1", "--", "true"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    assert result.returncode == 255
    assert len(result.stderr.splitlines()) == 1
    assert b"64 hex digits" in result.stderr
