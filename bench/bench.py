#!/usr/bin/env python3
"""Benchmark execd and execc against local baselines measured in the same run.

The script starts its own execd on a temporary unix socket, measures, stops
the daemon, prints a Markdown table and writes it, with the machine it ran
on, to bench/README.md.  It needs only the Python standard library and Linux
(/proc, GNU head, cat and wc).

Targets (benchmark goals, not test assertions):
  1. Throughput.  `execc -- head -c 1G /dev/zero | cat > /dev/null` (stdout)
     and `head -c 1G /dev/zero | execc -- wc -c` (stdin) each reach at least
     half the throughput of the local pipe `head -c 1G /dev/zero | cat >
     /dev/null`.
  2. Latency.  `execc -- true` takes at most 1.5x the start-up time of
     `python3 -c pass` run by the same interpreter.
  3. Slow reader.  While a reader paced to 50 MB/s consumes `execc -- head -c
     2G /dev/zero`, the daemon's peak RSS stays within 2 MiB of its idle RSS.
  4. Idle sessions.  With 500 sessions held open (raw protocol clients running
     `cat`), the daemon's RSS grows by at most 64 KiB per session.

Timings are medians over interleaved rounds: each round runs the local and
the remote measurements one after the other, in a rotating order, so that
load from other work on the machine hits both alike.  Memory tests each use
a fresh daemon, warmed up by one `true` session before its idle RSS is taken.

Every process the script starts is ended by its pid.  Interpreter: the one
running this script (sys.executable), or --python; give a real interpreter,
not a pyenv shim, whose own start-up would distort the latency ratio.

Usage:
    python3 bench/bench.py              # the full run: 3 minutes on 2 cores
    python3 bench/bench.py --quick      # small sizes; prints, writes nothing
"""

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXECD = os.path.join(ROOT, "execd.py")
EXECC = os.path.join(ROOT, "execc.py")
README = os.path.join(HERE, "README.md")

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB
MB = 1000 * 1000  # throughput and the reader's pace use decimal megabytes

# Targets: remote throughput / local throughput, latency ratio, bytes.
MIN_THROUGHPUT_RATIO = 0.5
MAX_LATENCY_RATIO = 1.5
MAX_SLOW_READER_GROWTH = 2 * MIB
MAX_SESSION_GROWTH = 64 * KIB

# Frame header and types of execd's protocol version 1 (execd.py docstring).
HEADER = struct.Struct("!IB")
HELLO = 0x01
REQUEST = 0x04
STARTED = 0x05
STDIN_EOF = 0x11
EXIT = 0x23
ERROR = 0x7F

DAEMON_START_TIMEOUT = 10.0   # seconds for the socket to accept connections
DAEMON_STOP_TIMEOUT = 15.0    # seconds after SIGTERM before SIGKILL
SESSION_END_TIMEOUT = 30.0    # seconds for ended sessions' children to be reaped
RSS_SAMPLE_INTERVAL = 0.01    # seconds between VmRSS samples
SETTLE_SECONDS = 0.5          # pause before an idle or held-sessions RSS reading

# The slow reader: reads stdin in blocks of at most CHUNK bytes, sleeping after
# each so that its average rate stays at RATE bytes per second or below, and
# prints the byte count.
SLOW_READER = r"""
import os, sys, time
rate, chunk = float(sys.argv[1]), int(sys.argv[2])
start, total = time.monotonic(), 0
while True:
    data = os.read(0, chunk)
    if not data:
        break
    total += len(data)
    delay = start + total / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(total)
"""


class BenchError(Exception):
    """A measurement could not be taken; main() prints it and exits 1."""


# --- Processes and /proc --------------------------------------------------------

def read_status(pid):
    """Return /proc/PID/status as a dict of field name to value in bytes."""
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * KIB
    return fields


def rss(pid):
    return read_status(pid)["VmRSS"]


def settled_rss(pid, samples=5):
    """Return the median of a few VmRSS readings taken after SETTLE_SECONDS."""
    time.sleep(SETTLE_SECONDS)
    readings = []
    for _ in range(samples):
        readings.append(rss(pid))
        time.sleep(0.02)
    return statistics.median(readings)


def reset_peak_rss(pid):
    """Reset VmHWM to the current RSS; return False if the kernel rejects it."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_pids(pid):
    """Return the pids whose parent is pid, from a scan of /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue  # exited during the scan
        # The command name in brackets may contain spaces: split after it.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def end_process(process, timeout=5.0):
    """Stop a process this script started: SIGTERM, then SIGKILL, by its pid."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_pipeline(commands, capture=False):
    """Start commands joined by pipes, like a shell pipeline; return the Popens.

    The first command reads /dev/null.  The last writes to /dev/null, or to
    a pipe the caller reads when capture is true.
    """
    processes = []
    upstream = subprocess.DEVNULL
    for index, command in enumerate(commands):
        last = index == len(commands) - 1
        if not last:
            stdout = subprocess.PIPE
        else:
            stdout = subprocess.PIPE if capture else subprocess.DEVNULL
        process = subprocess.Popen(command, stdin=upstream, stdout=stdout)
        if index:
            upstream.close()  # only the next command keeps the read end
        upstream = process.stdout
        processes.append(process)
    return processes


def finish_pipeline(processes, commands):
    """Wait for every process; return the last one's output.  Raise on failure."""
    output = processes[-1].stdout.read() if processes[-1].stdout else b""
    for process, command in zip(processes, commands):
        code = process.wait()
        if code != 0:
            raise BenchError("%s exited with status %d" % (" ".join(command), code))
    return output


def run_pipeline(commands, capture=False):
    """Run a pipeline; return (wall seconds, the last command's output)."""
    start = time.perf_counter()
    processes = start_pipeline(commands, capture)
    try:
        output = finish_pipeline(processes, commands)
    finally:
        for process in processes:
            end_process(process)
    return time.perf_counter() - start, output


# --- The daemon ---------------------------------------------------------------

class Daemon:
    """An execd started by this script on a unix socket in its own directory."""

    def __init__(self, python, directory, name):
        self.socket_path = os.path.join(directory, name + ".sock")
        self.log_path = os.path.join(directory, name + ".log")
        self.address = "unix:" + self.socket_path
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [python, EXECD, "--listen", self.address, "-q"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.wait_until_ready()

    def wait_until_ready(self):
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError("execd exited with status %d at start-up; log: %s"
                                 % (self.process.returncode, self.log_path))
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        self.stop()
        raise BenchError("execd did not listen on %s within %g s"
                         % (self.socket_path, DAEMON_START_TIMEOUT))

    def wait_for_no_sessions(self):
        """Wait until the daemon has no child processes left."""
        deadline = time.monotonic() + SESSION_END_TIMEOUT
        while child_pids(self.pid):
            if time.monotonic() > deadline:
                raise BenchError("execd pid %d still has children %d s after its "
                                 "sessions ended" % (self.pid, SESSION_END_TIMEOUT))
            time.sleep(0.05)

    def stop(self):
        """SIGTERM hangs up every session and exits; SIGKILL if it does not."""
        end_process(self.process, DAEMON_STOP_TIMEOUT)
        self.log.close()


# --- Raw protocol clients -----------------------------------------------------

def receive_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise BenchError("execd closed a raw client's connection")
        data += chunk
    return data


def receive_frame(sock):
    length, frame_type = HEADER.unpack(receive_exactly(sock, HEADER.size))
    payload = receive_exactly(sock, length)
    if frame_type == ERROR:
        raise BenchError("execd sent an error: %s" % json.loads(payload.decode()).get("message"))
    return frame_type, payload


def send_json_frame(sock, frame_type, obj):
    payload = json.dumps(obj).encode()
    sock.sendall(HEADER.pack(len(payload), frame_type) + payload)


def open_raw_session(socket_path, argv):
    """Run argv in pipe mode over a bare socket; return the socket once STARTED.

    No STDIN_EOF is sent here, so a command such as `cat` waits on its stdin
    until the caller sends one or closes the socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10.0)
    try:
        sock.connect(socket_path)
        send_json_frame(sock, HELLO, {"protocol": 1, "program": "bench.py"})
        frame_type, _ = receive_frame(sock)
        if frame_type != HELLO:
            raise BenchError("expected HELLO from execd, got frame type 0x%02x" % frame_type)
        send_json_frame(sock, REQUEST, {"argv": argv, "env": {}, "tty": False,
                                        "rows": 24, "cols": 80})
        frame_type, _ = receive_frame(sock)
        if frame_type != STARTED:
            raise BenchError("expected STARTED from execd, got frame type 0x%02x"
                             % frame_type)
        return sock
    except BaseException:
        sock.close()
        raise


def close_after_exit(sock):
    """Wait for the EXIT frame of a session whose stdin got STDIN_EOF; close."""
    try:
        while receive_frame(sock)[0] != EXIT:
            pass
    finally:
        sock.close()


# --- Measurements -------------------------------------------------------------

def measure_throughput(python, daemon, size, rounds, log):
    """Time the local pipe and both remote directions; return name -> [seconds]."""
    count = str(size)
    execc = [python, EXECC, daemon.address, "--"]
    kinds = [
        ("local", [["head", "-c", count, "/dev/zero"], ["cat"]], False),
        ("stdout", [execc + ["head", "-c", count, "/dev/zero"], ["cat"]], False),
        ("stdin", [["head", "-c", count, "/dev/zero"], execc + ["wc", "-c"]], True),
        # Not a target: `wc -c` reads a pipe more slowly than `cat` does, and
        # this shows how much of the stdin figure is wc's own limit.
        ("local wc", [["head", "-c", count, "/dev/zero"], ["wc", "-c"]], True),
    ]
    times = {name: [] for name, _, _ in kinds}
    for round_number in range(rounds):
        shift = round_number % len(kinds)
        for name, commands, capture in kinds[shift:] + kinds[:shift]:
            seconds, output = run_pipeline(commands, capture)
            if capture and int(output.split()[0]) != size:
                raise BenchError("wc -c counted %s bytes, expected %d"
                                 % (output.strip().decode(), size))
            times[name].append(seconds)
            log("  round %d %-6s %7.3f s  %8.1f MB/s"
                % (round_number + 1, name, seconds, size / seconds / MB))
    return times


def measure_latency(python, daemon, rounds, runs_per_round, log):
    """Time `execc -- true` and `python -c pass`, alternating; return name -> [seconds].

    The same two also run with -S (no site module) for reference: the site
    module runs every .pth file in site-packages, which can dominate start-up.
    """
    execc = [EXECC, daemon.address, "--", "true"]
    commands = {
        "python": [python, "-c", "pass"],
        "execc": [python] + execc,
        "python -S": [python, "-S", "-c", "pass"],
        "execc -S": [python, "-S"] + execc,
    }
    for command in commands.values():  # warm the page cache, untimed
        run_pipeline([command])
    names = list(commands)
    times = {name: [] for name in names}
    for round_number in range(rounds):
        for run in range(runs_per_round):
            for name in names if run % 2 == 0 else names[::-1]:
                seconds, _ = run_pipeline([commands[name]])
                times[name].append(seconds)
        log("  round %d medians: %s" % (round_number + 1, ", ".join(
            "%s %.1f ms" % (name, 1000 * statistics.median(times[name][-runs_per_round:]))
            for name in names)))
    return times


def warm_up(python, daemon):
    """Run one short session so first-use allocations are in the idle RSS."""
    run_pipeline([[python, EXECC, daemon.address, "--", "true"]])
    daemon.wait_for_no_sessions()


def measure_slow_reader(python, directory, size, rate, chunk, log, name):
    """Return (idle RSS, peak sampled RSS, VmHWM or None) for one slow transfer."""
    daemon = Daemon(python, directory, name)
    try:
        warm_up(python, daemon)
        idle = settled_rss(daemon.pid)
        hwm_reset = reset_peak_rss(daemon.pid)
        commands = [[python, EXECC, daemon.address, "--", "head", "-c", str(size), "/dev/zero"],
                    [python, "-c", SLOW_READER, str(rate), str(chunk)]]
        start = time.perf_counter()
        processes = start_pipeline(commands, capture=True)
        peak = 0
        try:
            while processes[-1].poll() is None:
                peak = max(peak, rss(daemon.pid))
                time.sleep(RSS_SAMPLE_INTERVAL)
            hwm = read_status(daemon.pid)["VmHWM"] if hwm_reset else None
            output = finish_pipeline(processes, commands)
        finally:
            for process in processes:
                end_process(process)
        seconds = time.perf_counter() - start
        if int(output) != size:
            raise BenchError("the slow reader got %s bytes, expected %d"
                             % (output.strip().decode(), size))
        log("  %s: idle %.0f KiB, sampled peak +%.0f KiB, VmHWM %s, %.1f s (%.1f MB/s)"
            % (name, idle / KIB, (peak - idle) / KIB,
               "+%.0f KiB" % ((hwm - idle) / KIB) if hwm is not None else "unavailable",
               seconds, size / seconds / MB))
        return idle, peak, hwm
    finally:
        daemon.stop()


def measure_idle_sessions(python, directory, sessions, log, name):
    """Return (idle RSS, RSS with `sessions` raw `cat` sessions held open)."""
    daemon = Daemon(python, directory, name)
    clients = []
    try:
        warm_up(python, daemon)
        idle = settled_rss(daemon.pid)
        start = time.perf_counter()
        for _ in range(sessions):
            clients.append(open_raw_session(daemon.socket_path, ["cat"]))
        opened = time.perf_counter() - start
        loaded = settled_rss(daemon.pid)
        log("  %s: idle %.0f KiB, with %d sessions %.0f KiB (+%.1f KiB each); "
            "opened in %.1f s" % (name, idle / KIB, sessions, loaded / KIB,
                                  (loaded - idle) / sessions / KIB, opened))
        # STDIN_EOF lets every `cat` exit by itself.  Closing the sockets
        # instead makes the daemon hang each session up, and each hangup
        # scans /proc: 500 at once took 15 s of daemon CPU in a trial run.
        for client in clients:
            client.sendall(HEADER.pack(0, STDIN_EOF))
        while clients:
            close_after_exit(clients.pop())
        daemon.wait_for_no_sessions()
        return idle, loaded
    finally:
        for client in clients:
            client.close()
        daemon.stop()


# --- Report ---------------------------------------------------------------------

def machine_facts(python):
    """Return [(label, value)] describing the machine and the interpreter."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             stdout=subprocess.PIPE, check=True).stdout.decode().strip()
    return [
        ("CPU", model),
        ("Cores", "%d online, %d usable by this process"
         % (os.cpu_count(), len(os.sched_getaffinity(0)))),
        ("Kernel", "%s %s" % (platform.system(), platform.release())),
        ("Python", "%s at %s" % (version, python)),
        ("Date", datetime.datetime.now(datetime.timezone.utc)
         .strftime("%Y-%m-%d %H:%M UTC")),
    ]


def peak_rss(slow_result):
    """Return the higher of VmHWM and the highest sampled VmRSS.

    In trial runs on Linux 6.18, VmHWM after a reset read lower than some
    VmRSS samples, so neither alone is taken as the peak.
    """
    idle, sampled, hwm = slow_result
    return sampled if hwm is None else max(sampled, hwm)


def verdict(ok):
    return "pass" if ok else "**FAIL**"


def build_rows(config, throughput, latency, slow, sessions):
    """Return the summary rows: (target, local, remote, measured, limit, verdict)."""
    rows = []
    size_text = human_size(config.size)
    local = statistics.median(throughput["local"])
    for name, command in (("stdout", "`execc -- head -c %s /dev/zero | cat`" % size_text),
                          ("stdin", "`head -c %s /dev/zero | execc -- wc -c`" % size_text)):
        remote = statistics.median(throughput[name])
        ratio = local / remote  # throughput ratio = inverse time ratio
        rows.append(("%s throughput: %s vs local `head | cat`" % (name, command),
                     "%.0f MB/s" % (config.size / local / MB),
                     "%.0f MB/s" % (config.size / remote / MB),
                     "%.2fx local" % ratio, ">= %.1fx" % MIN_THROUGHPUT_RATIO,
                     verdict(ratio >= MIN_THROUGHPUT_RATIO)))
    local_wc = statistics.median(throughput["local wc"])
    remote = statistics.median(throughput["stdin"])
    rows.append(("reference: stdin vs local `head -c %s /dev/zero | wc -c`" % size_text,
                 "%.0f MB/s" % (config.size / local_wc / MB),
                 "%.0f MB/s" % (config.size / remote / MB),
                 "%.2fx local wc" % (local_wc / remote), "none", "not a target"))

    baseline = statistics.median(latency["python"])
    remote = statistics.median(latency["execc"])
    ratio = remote / baseline
    rows.append(("latency: `execc -- true` vs `python3 -c pass`",
                 "%.1f ms" % (1000 * baseline), "%.1f ms" % (1000 * remote),
                 "%.2fx" % ratio, "<= %.1fx" % MAX_LATENCY_RATIO,
                 verdict(ratio <= MAX_LATENCY_RATIO)))
    baseline = statistics.median(latency["python -S"])
    remote = statistics.median(latency["execc -S"])
    rows.append(("reference: the same with `python3 -S` (no site module)",
                 "%.1f ms" % (1000 * baseline), "%.1f ms" % (1000 * remote),
                 "%.2fx" % (remote / baseline), "none", "not a target"))

    idle = statistics.median(s[0] for s in slow)
    growth = statistics.median(peak_rss(s) - s[0] for s in slow)
    rows.append(("peak daemon RSS, slow reader: `execc -- head -c %s /dev/zero` read at "
                 "%g MB/s" % (human_size(config.slow_size), config.slow_rate / MB),
                 "idle %.1f MiB" % (idle / MIB), "peak %.1f MiB" % ((idle + growth) / MIB),
                 "+%.0f KiB" % (growth / KIB), "<= +%d KiB" % (MAX_SLOW_READER_GROWTH // KIB),
                 verdict(growth <= MAX_SLOW_READER_GROWTH)))

    idle = statistics.median(s[0] for s in sessions)
    loaded = statistics.median(s[1] for s in sessions)
    per_session = statistics.median((s[1] - s[0]) / config.sessions for s in sessions)
    rows.append(("daemon RSS with %d idle `cat` sessions" % config.sessions,
                 "idle %.1f MiB" % (idle / MIB), "%.1f MiB" % (loaded / MIB),
                 "+%.1f KiB/session" % (per_session / KIB),
                 "<= +%d KiB" % (MAX_SESSION_GROWTH // KIB),
                 verdict(per_session <= MAX_SESSION_GROWTH)))
    return rows


def human_size(size):
    for unit, factor in (("G", GIB), ("M", MIB), ("K", KIB)):
        if size >= factor and size % factor == 0:
            return "%d%s" % (size // factor, unit)
    return str(size)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    # GitHub's tables split cells at "|" even inside code spans, unless escaped.
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def round_details(config, throughput, latency, slow, sessions):
    """Return a Markdown table of every measurement behind the medians."""
    rows = []
    for name in ("local", "stdout", "stdin", "local wc"):
        rows.append(("%s, MB/s" % name, ", ".join(
            "%.0f" % (config.size / seconds / MB) for seconds in throughput[name])))
    for name, label in (("python", "`python3 -c pass`, ms"),
                        ("execc", "`execc -- true`, ms"),
                        ("python -S", "`python3 -S -c pass`, ms"),
                        ("execc -S", "`python3 -S execc.py -- true`, ms")):
        rows.append((label, ", ".join("%.1f" % (1000 * s) for s in latency[name])))
    rows.append(("slow reader: idle RSS / VmHWM / sampled peak, KiB", "; ".join(
        "%.0f / %s / %.0f" % (idle / KIB, "%.0f" % (hwm / KIB) if hwm else "n/a", peak / KIB)
        for idle, peak, hwm in slow)))
    rows.append(("%d sessions: idle RSS / loaded RSS, KiB" % config.sessions, "; ".join(
        "%.0f / %.0f" % (idle / KIB, loaded / KIB) for idle, loaded in sessions)))
    return markdown_table(("measurement", "values in run order"), rows)


def write_readme(path, facts, summary, details, config, elapsed):
    command = "python3 bench/bench.py" + (" --quick" if config.quick else "")
    text = """# execd/execc benchmark

Written by `bench/bench.py`, which starts its own execd on a temporary unix
socket and compares it with local baselines measured in the same run.  To
measure again, run it from the repository root:

    {command}

The targets are benchmark goals, not test assertions.  Each timing is the
median of {rounds} interleaved rounds, with {latency_runs} runs of each
command per round for latency.  Each memory figure is the median of
{memory_rounds} runs, each on a fresh daemon.  A throughput ratio divides MB/s by MB/s, so
0.50x means half the local pipe's throughput.  Memory growth is counted from
the daemon's idle RSS after one warm-up session.  The slow reader's peak is
the higher of VmHWM, after a reset through /proc/PID/clear_refs, and the
highest VmRSS sampled every {interval:g} ms.

The `-S` row shows how much of the baseline is the site module, which runs
every .pth file in site-packages at start-up.  It is not a target.

## Machine

{machine}

## Results

{summary}

Every measurement, in run order:

{details}

The whole run took {elapsed:.0f} s.
""".format(command=command, rounds=config.rounds, latency_runs=config.latency_runs,
           memory_rounds=config.memory_rounds, interval=RSS_SAMPLE_INTERVAL * 1000,
           machine="\n".join("- %s: %s" % fact for fact in facts),
           summary=summary, details=details, elapsed=elapsed)
    with open(path, "w") as f:
        f.write(text)


# --- Main -------------------------------------------------------------------------

def parse_size(text):
    units = {"K": KIB, "M": MIB, "G": GIB}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark execd/execc against local baselines and write "
                    "the table to bench/README.md.")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for execd, execc and the baseline "
                             "(default: this one, %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the timing tests (default: 5)")
    parser.add_argument("--latency-runs", type=int, default=10,
                        help="runs of each latency command per round (default: 10)")
    parser.add_argument("--size", type=parse_size, default=GIB,
                        help="bytes per throughput transfer, suffix K, M or G "
                             "(default: 1G)")
    parser.add_argument("--slow-size", type=parse_size, default=2 * GIB,
                        help="bytes the slow reader reads (default: 2G)")
    parser.add_argument("--slow-rate", type=float, default=50 * MB,
                        help="the slow reader's pace in bytes per second "
                             "(default: 50000000)")
    parser.add_argument("--slow-chunk", type=parse_size, default=64 * KIB,
                        help="bytes per read of the slow reader (default: 64K)")
    parser.add_argument("--sessions", type=int, default=500,
                        help="idle sessions held open (default: 500)")
    parser.add_argument("--memory-rounds", type=int, default=3,
                        help="fresh daemons per memory test (default: 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a trial run: 64M transfers, a 256M slow read, 100 "
                             "sessions, 3 rounds; writes no README unless --output")
    parser.add_argument("--output", default=None,
                        help="where to write the Markdown report (default: "
                             "bench/README.md, none with --quick)")
    config = parser.parse_args(argv)
    if config.quick:
        config.size, config.slow_size = 64 * MIB, 256 * MIB
        config.sessions, config.rounds, config.memory_rounds = 100, 3, 1
    if config.output is None and not config.quick:
        config.output = README
    if "/shims/" in config.python:
        parser.error("%s is a pyenv shim; pass the real interpreter, e.g. the "
                     "output of: python3 -c 'import sys; print(sys.executable)'"
                     % config.python)
    return config


def main(argv=None):
    config = parse_args(sys.argv[1:] if argv is None else argv)

    def log(message):
        print(message, flush=True)

    started = time.perf_counter()
    facts = machine_facts(config.python)
    for fact in facts:
        log("%s: %s" % fact)
    with tempfile.TemporaryDirectory(prefix="execd-bench-") as directory:
        try:
            daemon = Daemon(config.python, directory, "timing")
            try:
                log("throughput, %s per transfer:" % human_size(config.size))
                throughput = measure_throughput(config.python, daemon, config.size,
                                                config.rounds, log)
                log("latency:")
                latency = measure_latency(config.python, daemon, config.rounds,
                                          config.latency_runs, log)
            finally:
                daemon.stop()
            log("slow reader, %s at %g MB/s:" % (human_size(config.slow_size),
                                                 config.slow_rate / MB))
            slow = [measure_slow_reader(config.python, directory, config.slow_size,
                                        config.slow_rate, config.slow_chunk, log,
                                        "slow%d" % (n + 1))
                    for n in range(config.memory_rounds)]
            log("idle sessions:")
            sessions = [measure_idle_sessions(config.python, directory, config.sessions,
                                              log, "sessions%d" % (n + 1))
                        for n in range(config.memory_rounds)]
        except BenchError as e:
            print("bench.py: %s" % e, file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - started

    header = ("target", "local / idle", "execd/execc", "measured", "limit", "result")
    summary = markdown_table(header, build_rows(config, throughput, latency, slow, sessions))
    details = round_details(config, throughput, latency, slow, sessions)
    print()
    print(summary)
    print()
    print(details)
    if config.output:
        write_readme(config.output, facts, summary, details, config, elapsed)
        print("\nwrote %s" % config.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
