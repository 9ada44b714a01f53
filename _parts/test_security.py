import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_exec import *  # noqa
from test_exec import daemon, time_limit  # fixtures

import grp
import hashlib
import json
import pwd
import random
import shutil
import stat
import struct
import tempfile


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
    """Read count bytes; return fewer only at end of file or a reset."""
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
    """The messages of the fatal ERROR frames among frames."""
    return [json.loads(p)["message"] for t, p in frames
            if t == SEC_ERROR and json.loads(p).get("fatal")]


def sec_raw_session(daemon, argv=("true",), stdin=b""):
    """Run one command with the raw protocol; return (EXIT info, stdout bytes)."""
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
            elif frame[0] in (SEC_EXIT, SEC_ERROR):
                return json.loads(frame[1]), stdout


def sec_serves_session(daemon):
    """True when the daemon still runs a normal command for execc."""
    token = getattr(daemon, "token_file", None)
    result = execc(daemon, "echo", "still serving", timeout=20,
                   options=["--token-file", token] if token else [])
    return result.returncode == 0 and result.stdout == b"still serving\n"


def sec_fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def sec_proc_stat(pid):
    """Fields of /proc/PID/stat after the command name (state is field 0)."""
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
    """(pid, state) of every process whose parent is pid."""
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
    """A preexec_fn that runs the child as uid/gid with exactly these groups."""
    def drop():
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    return drop


_sec_python_cache = []


def sec_python_for_nobody():
    """An interpreter that uid 65534 can run (PYTHON may sit under /root), or skip."""
    if not _sec_python_cache:
        for candidate in (PYTHON, "/usr/bin/python3", "/usr/local/bin/python3"):
            try:
                probe = subprocess.run([candidate, "-c", "pass"], stderr=subprocess.DEVNULL,
                                       preexec_fn=sec_drop_to(SEC_NOBODY, SEC_NOBODY))
            except OSError:
                continue  # EACCES: a directory on its path is closed to nobody
            if probe.returncode == 0:
                _sec_python_cache.append(candidate)
                break
        else:
            _sec_python_cache.append(None)
    if _sec_python_cache[0] is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    return _sec_python_cache[0]


def sec_launcher(directory, name, setup, interpreter=PYTHON):
    """Write a launcher that runs `setup` (Python code), then execs interpreter.

    Daemon() takes an interpreter path; this one drops privileges or lowers
    limits first, so the daemon itself starts in that state.
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


def sec_tcp_daemon(directory, *extra_args, token_file=None, python=PYTHON):
    """A daemon on 127.0.0.1 with a token; destination set for execc()."""
    token_file = token_file or os.path.join(str(directory), "token")
    if not os.path.exists(token_file):
        sec_write_token(token_file)
    d = Daemon(directory, "--listen", "127.0.0.1:0", "--token-file", token_file,
               *extra_args, listen_unix=False, python=python)
    d.token_file = token_file
    d.destination = "127.0.0.1:%d" % d.tcp_port()
    return d


def sec_failed_start(directory, *extra_args, listen_unix=True):
    """Run a daemon that must refuse to start; return (exit status, its log)."""
    argv = [PYTHON, EXECD] + list(extra_args)
    if listen_unix:
        argv += ["--listen", "unix:" + os.path.join(str(directory), "execd.sock")]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=20)
    return result.returncode, result.stderr.decode("utf-8", "replace")


@pytest.fixture
def sec_open_dir():
    """A directory that other users may traverse (tmp_path's parents are 0700)."""
    path = tempfile.mkdtemp(prefix="execd-sec-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sec_nogroup():
    try:
        return grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no group named nogroup on this host")


@pytest.fixture(autouse=False)
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


def test_refuses_socket_planted_by_other_user(tmp_path, sec_root):
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(tmp_path / "execd.sock"))
    planted.close()
    os.chown(str(tmp_path / "execd.sock"), SEC_NOBODY, SEC_NOBODY)
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "owned by uid 65534, not by you; refusing" in log
    assert os.stat(str(tmp_path / "execd.sock")).st_uid == SEC_NOBODY


def test_refuses_file_planted_by_other_user(tmp_path, sec_root):
    (tmp_path / "execd.sock").write_bytes(b"planted")
    os.chown(str(tmp_path / "execd.sock"), SEC_NOBODY, SEC_NOBODY)
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "exists and is not a socket" in log
    assert (tmp_path / "execd.sock").read_bytes() == b"planted"


def test_refuses_world_writable_directory(tmp_path):
    os.chmod(str(tmp_path), 0o777)
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "writable by others without the sticky bit" in log


def test_refuses_path_that_is_not_a_socket(tmp_path):
    (tmp_path / "execd.sock").mkdir()
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "exists and is not a socket" in log
    assert (tmp_path / "execd.sock").is_dir()


def test_refusal_is_one_log_line(tmp_path):
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


def test_second_daemon_refuses_live_socket(daemon, tmp_path):
    status, log = sec_failed_start(tmp_path)
    assert status != 0
    assert "already listening" in log
    assert sec_serves_session(daemon)


# --- SO_PEERCRED: who may use a unix socket -------------------------------------

def test_socket_group_member_accepted(sec_open_dir, sec_root, sec_nogroup):
    d = Daemon(sec_open_dir, "--socket-group", "nogroup")
    try:
        result = execc(d, "echo", "member", python=sec_python_for_nobody(), preexec_fn=sec_drop_to(
            SEC_NOBODY, SEC_OTHER_GID, [sec_nogroup]))
        assert result.returncode == 0
        assert result.stdout == b"member\n"
    finally:
        d.stop()


@pytest.mark.parametrize("group_args", [(), ("--socket-group", "nogroup")])
def test_peer_of_other_uid_rejected(sec_open_dir, sec_root, sec_nogroup, group_args):
    d = Daemon(sec_open_dir, *group_args)
    try:
        # The socket mode is the first guard; opening it up shows the second,
        # the SO_PEERCRED check, still refuses.
        os.chmod(d.socket, 0o666)
        result = execc(d, "echo", "outsider", python=sec_python_for_nobody(), preexec_fn=sec_drop_to(
            SEC_NOBODY, SEC_OTHER_GID))
        assert result.returncode == 255
        assert result.stdout == b""
        assert len(result.stderr.splitlines()) == 1
        assert b"permission denied: uid 65534" in result.stderr
        d.wait_for_log(r"rejected pid \d+ uid 65534: permission denied")
    finally:
        d.stop()


def test_socket_group_member_cannot_switch_user(sec_open_dir, sec_root, sec_nogroup):
    d = Daemon(sec_open_dir, "--socket-group", "nogroup")
    try:
        result = execc(d, "id", "-u", options=["--user", "nobody"],
                       python=sec_python_for_nobody(), preexec_fn=sec_drop_to(
            SEC_NOBODY, SEC_OTHER_GID, [sec_nogroup]))
        assert result.returncode == 255
        assert b"only root or a token-authenticated client" in result.stderr
    finally:
        d.stop()


# --- TCP: token challenge-response -----------------------------------------------

def sec_wrong_token_attempt(port):
    """Authenticate with a wrong MAC; return (seconds until the answer, frames)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO))
        frame_type, payload = sec_read_frame(sock)
        assert json.loads(payload)["auth"] == "token"
        started = time.monotonic()
        sock.sendall(sec_frame(SEC_AUTH, {"nonce": os.urandom(32).hex(),
                                          "mac": os.urandom(32).hex()}))
        frames = sec_frames_until_close(sock)
        return time.monotonic() - started, frames


class SecRecordingProxy:
    """A TCP relay on 127.0.0.1 that records every byte in both directions."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(30)
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        peers = {client: upstream, upstream: client}
        open_ends = set(peers)
        while open_ends:
            ready, _, _ = select.select(list(open_ends), [], [], 30)
            if not ready:
                break
            for sock in ready:
                data = sock.recv(65536)
                self.recorded += data
                if data:
                    peers[sock].sendall(data)
                else:
                    open_ends.discard(sock)
                    peers[sock].shutdown(socket.SHUT_WR)
        for sock in peers:
            sock.close()
        self.listener.close()


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
        d.wait_for_log(r"connection from 127\.0\.0\.1:\d+: authentication failed")
    finally:
        d.stop()


def test_repeated_auth_failures_slow_down(tmp_path):
    d = sec_tcp_daemon(tmp_path)
    try:
        delays = [sec_wrong_token_attempt(d.tcp_port())[0] for _ in range(3)]
        # Each failure from one address doubles the wait (0.25, 0.5, 1 s).
        assert delays[1] > delays[0] + 0.15, delays
        assert delays[2] > delays[1] + 0.3, delays
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
        token = open(d.token_file, "rb").read().strip()
        proxy = SecRecordingProxy(d.tcp_port())
        d.destination = "127.0.0.1:%d" % proxy.port
        result = execc(d, "echo", "relayed", options=["--token-file", d.token_file])
        proxy.thread.join(30)
        assert result.returncode == 0
        assert b"relayed" in proxy.recorded  # the recording saw the session
        assert b'"mac"' in proxy.recorded     # ... and its authentication
        assert token not in proxy.recorded
        assert token.hex().encode() not in proxy.recorded
    finally:
        d.stop()


def test_daemon_refuses_token_readable_by_others(tmp_path):
    sec_write_token(tmp_path / "token", mode=0o640)
    status, log = sec_failed_start(tmp_path, "--listen", "127.0.0.1:0", "--token-file",
                                   str(tmp_path / "token"), listen_unix=False)
    assert status != 0
    assert len(log.splitlines()) == 1
    assert "chmod 600" in log


def test_client_refuses_token_readable_by_others(tmp_path):
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
    """A self-signed certificate and key from openssl; return (cert, key, sha256 hex)."""
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


def test_tls_non_loopback_listener_does_not_warn(tmp_path):
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
    """What SEC_SHOW_IDENTITY prints for user name, as login(1) would set it up."""
    account = pwd.getpwnam(name)
    home = account.pw_dir if os.path.isdir(account.pw_dir) else "/"
    return ("%d\n%d\n%s|%s|%s|%s\n%s\n" % (
        account.pw_uid, account.pw_gid, account.pw_dir, name, name,
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


def test_non_root_daemon_refuses_user_switch(sec_open_dir, sec_root):
    os.chown(sec_open_dir, SEC_NOBODY, SEC_NOBODY)
    launcher = sec_launcher(sec_open_dir, "as-nobody", "os.setgroups([]); os.setgid(%d); "
                            "os.setuid(%d)" % (SEC_NOBODY, SEC_NOBODY),
                            interpreter=sec_python_for_nobody())
    d = Daemon(sec_open_dir, python=launcher)
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
    """Start a command over a raw connection; return the socket once it runs."""
    sock = sec_connect(daemon)
    sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO) + sec_request(argv))
    while True:
        frame = sec_read_frame(sock)
        assert frame is not None and frame[0] != SEC_ERROR, frame
        if frame[0] == SEC_STARTED:
            return sock


def sec_finish_session(sock):
    """Send end of file, read to EXIT, close; return the EXIT info."""
    sock.sendall(sec_frame(SEC_STDIN_EOF))
    with sock:
        for frame_type, payload in sec_frames_until_close(sock):
            if frame_type == SEC_EXIT:
                return json.loads(payload)


def sec_hello(daemon):
    """A raw connection past HELLO (no authentication on a unix socket)."""
    sock = sec_connect(daemon)
    sock.sendall(sec_frame(SEC_HELLO, SEC_CLIENT_HELLO))
    frame_type, payload = sec_read_frame(sock)
    assert frame_type == SEC_HELLO
    return sock, json.loads(payload)


def test_session_over_max_sessions_refused(tmp_path):
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
        assert 0.8 < elapsed < 2.0
        assert sec_serves_session(d)
    finally:
        d.stop()


def test_connection_over_max_unauthenticated_refused(tmp_path):
    d = Daemon(tmp_path, "--max-unauthenticated", "3", "--handshake-timeout", "30")
    try:
        sec_serves_session(d)  # the first session opens the daemon's lazy fds
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
    """Like sec_open_session, but return (None, message) when the daemon refuses."""
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
        assert sec_serves_session(d)
        baseline = sec_fd_count(d.pid)
        sessions, refusal = [], None
        while refusal is None and len(sessions) < 20:
            sock, refusal = sec_try_session(d)
            if sock is not None:
                sessions.append(sock)
        assert refusal == "cannot start the command: Too many open files"
        idle = [sec_connect(d) for _ in range(20)]  # queue beyond what accept can take
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

import concurrent.futures

SEC_DAEMON_FRAME_TYPES = {0x01, 0x03, 0x05, 0x20, 0x21, 0x22, 0x23, 0x7F}
SEC_FUZZ_WORKERS = 6


def sec_valid_session_bytes(argv=("/bin/true",)):
    """A complete, valid client side of a session, frame by frame."""
    return [sec_frame(SEC_HELLO, SEC_CLIENT_HELLO),
            sec_request(argv, env={"PATH": "/nonexistent"}, cwd="/"),
            sec_frame(SEC_STDIN, b"fuzz input\n"),
            sec_frame(SEC_STDIN_EOF)]


def sec_fuzz_case(daemon, data, how="shut"):
    """Send data on a new connection, then end it; return a problem or None.

    how: "shut" half-closes and reads the daemon's frames up to its close,
    which must come (the daemon sees end of file); "answer" reads until the
    daemon's EXIT, fatal ERROR or close, then closes; "reset" closes at once
    with RST, as a crashed client would.  Every frame read must be well formed.
    """
    sock = sec_connect(daemon, timeout=15)
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused the input early and closed: fine
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        if how == "shut":
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
                if how == "answer" and (frame_type == SEC_EXIT or frame_type == SEC_ERROR
                                        and json.loads(payload).get("fatal")):
                    return None
        except socket.timeout:
            return "no answer within 15 s to %r" % data[:200]
    finally:
        sock.close()


def sec_run_batch(daemon, cases):
    """Run (data, reset) cases in parallel; return the problems found."""
    with concurrent.futures.ThreadPoolExecutor(SEC_FUZZ_WORKERS) as pool:
        results = pool.map(lambda case: sec_fuzz_case(daemon, *case), cases)
        return [problem for problem in results if problem]


@pytest.fixture
def sec_fuzz_daemon(tmp_path):
    d = Daemon(tmp_path, "--handshake-timeout", "2", "--hangup-grace", "1")
    assert sec_serves_session(d)
    d.baseline_fds = sec_fd_count(d.pid)
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
    for _ in range(1000):
        size = rng.choice([rng.randint(0, 16), rng.randint(0, 200), rng.randint(0, 6000)])
        data = bytes(rng.randrange(256) for _ in range(size))
        if rng.random() < 0.5:  # a plausible header makes the body get parsed
            data = SEC_HEADER.pack(len(data), rng.choice([1, 2, 4, 0x10, 0x7F])) + data
        cases.append((data, rng.choice(["shut", "shut", "reset"])))
    assert sec_run_batch(sec_fuzz_daemon, cases) == []
    sec_assert_healthy(sec_fuzz_daemon)


def test_fuzz_mutated_valid_sessions(sec_fuzz_daemon):
    rng = random.Random(2)
    valid = b"".join(sec_valid_session_bytes())
    # Not "answer": a mutated length may leave the daemon rightly waiting.
    cases = [(sec_mutate(rng, valid), rng.choice(["shut", "shut", "reset"]))
             for _ in range(1000)]
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
    """HELLO, a REQUEST and in-session frames whose JSON fields take odd values."""
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
    # A login shell (empty argv) may miss an end of file typed before its
    # prompt, so those sessions end with the client's close instead.
    how = "shut" if request["argv"] == [] else "answer"
    return data + sec_frame(SEC_STDIN_EOF), how


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
        cases.append((data, rng.choice(["shut", "shut", "reset"])))
    assert sec_run_batch(sec_fuzz_daemon, cases) == []
    sec_assert_healthy(sec_fuzz_daemon)


def test_abrupt_close_at_every_offset(sec_fuzz_daemon):
    valid = b"".join(sec_valid_session_bytes(("cat",)))
    cases = [(valid[:offset], how) for offset in range(len(valid) + 1)
             for how in ("shut", "reset")]
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
