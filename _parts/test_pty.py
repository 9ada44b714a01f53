import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_exec import *  # noqa
from test_exec import daemon, time_limit  # fixtures

import fcntl
import pwd
import struct
import termios


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
    assert result.returncode == 2
    assert b"login shell needs a pty" in result.stderr


@pytest.mark.parametrize("escape", ["ab", "^1", "\u00e9"])
def test_invalid_escape_option_refused(daemon, escape):
    result = execc(daemon, "true", options=["-t", "-e", escape], stdin=subprocess.DEVNULL)
    assert result.returncode == 2
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
    script = 'trap "" HUP; while :; do sleep 0.1; done'
    terminal = pty_terminals(execc_argv(pty_quick_daemon, "sh", "-c", script))
    _, pid = pty_running(pty_quick_daemon, terminal, "sh")
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
    time.sleep(0.2)  # no event to wait for, because execc holds the "~" back
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
