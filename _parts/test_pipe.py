import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_exec import *  # noqa
from test_exec import daemon, time_limit  # fixtures

import ast
import concurrent.futures
import errno
import hashlib
import json
import random
import shutil
import struct
import types


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
    errors = [line for line in result.stderr.splitlines() if b"error:" in line]
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert len(errors) == 1
    assert b"--env" in errors[0]


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
