import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_exec import *  # noqa
from test_exec import daemon, time_limit  # fixtures

import concurrent.futures
import shlex


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
