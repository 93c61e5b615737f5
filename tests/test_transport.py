"""Transports against a real sshd: commands, quoting, timeouts, files, ssh config, error translation."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest

from edgeq.errors import ConnectError, RemoteCommandError
from edgeq.remote import open_transport, shell_join
from edgeq.targets import Target, load_inventory, resolve_targets

pytestmark = pytest.mark.sshd


def dev0(inv) -> Target:
    return resolve_targets(load_inventory(inv.path), "dev-0")[0]


def test_run_quotes_every_argument(trusted_inventory, tmp_path):
    marker = tmp_path / "marker"
    tricky = ["a b", "$(touch " + str(marker) + ")", "`touch " + str(marker) + "`", "; touch " + str(marker),
              "'", '"', "*", "~", ""]
    with open_transport(dev0(trusted_inventory)) as transport:
        result = transport.run([sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))",
                                *tricky])
        assert result.stdout.strip() == __import__("json").dumps(tricky)
        echoed = transport.run(["cat"], input=b"hello\x00bytes")
        assert echoed.stdout == "hello\x00bytes"
        failed = transport.run(["sh", "-c", "echo oops >&2; exit 7"], check=False)
        assert (failed.exit_code, failed.stderr.strip()) == (7, "oops")
        with pytest.raises(RemoteCommandError, match=r"dev-0 .*exit code 7: oops"):
            transport.run(["sh", "-c", "echo oops >&2; exit 7"])
        with pytest.raises(RemoteCommandError, match="NUL or newline"):
            transport.run(["echo", "a\nb"])
    assert not marker.exists()


def test_shell_join_rejects_control_characters():
    assert shell_join(["echo", "a b", "$x"]) == "echo 'a b' '$x'"
    for bad in ("a\0b", "a\nb", "a\rb"):
        with pytest.raises(RemoteCommandError):
            shell_join(["echo", bad])


def test_command_timeout_is_bounded(trusted_inventory):
    with open_transport(dev0(trusted_inventory)) as transport:
        started = time.monotonic()
        with pytest.raises(RemoteCommandError, match="timed out after 1s"):
            transport.run(["sleep", "30"], timeout=1)
        assert time.monotonic() - started < 5
        assert transport.run(["true"]).exit_code == 0  # the connection is still usable


def test_blackholed_port_fails_within_the_timeout(tmp_path, ssh_home):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts TCP connections but never says a word
    port = listener.getsockname()[1]
    target = Target(name="frozen", host="127.0.0.1", port=port, profile="x86-avx2")
    try:
        started = time.monotonic()
        with pytest.raises(ConnectError, match=r"frozen .*no SSH banner within 2s"):
            open_transport(target, connect_timeout=2)
        assert time.monotonic() - started < 6
    finally:
        listener.close()


def test_refused_and_unresolvable_hosts(ssh_home):
    from tests.lab.sshd import free_port

    with pytest.raises(ConnectError, match="connection refused"):
        open_transport(Target(name="off", host="127.0.0.1", port=free_port(), profile="x86-avx2"))
    with pytest.raises(ConnectError, match="cannot resolve host name 'no-such-host.invalid'"):
        open_transport(Target(name="typo", host="no-such-host.invalid", profile="x86-avx2"))


def test_wrong_key_is_an_authentication_failure(trusted_inventory, tmp_path):
    from tests.lab.sshd import generate_key

    target = dev0(trusted_inventory).model_copy(update={"key": str(generate_key(tmp_path / "stranger"))})
    with pytest.raises(ConnectError, match=r"dev-0 .*authentication failed") as info:
        open_transport(target)
    assert "key" in info.value.hint
    missing = dev0(trusted_inventory).model_copy(update={"key": str(tmp_path / "absent")})
    with pytest.raises(ConnectError, match="key file not found"):
        open_transport(missing)


def test_put_get_and_progress(trusted_inventory, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    calls = []
    with open_transport(dev0(trusted_inventory)) as transport:
        transport.put(source, str(tmp_path / "up"), progress=lambda d, t: calls.append((d, t)))
        transport.get(str(tmp_path / "up"), tmp_path / "down")
        with pytest.raises(RemoteCommandError, match="cannot read"):
            transport.get(str(tmp_path / "missing"), tmp_path / "x")
    assert (tmp_path / "down").read_bytes() == source.read_bytes()
    assert calls[-1] == (source.stat().st_size, source.stat().st_size)


def test_a_big_upload_goes_over_several_sftp_sessions_byte_for_byte(trusted_inventory, tmp_path, monkeypatch):
    """A file of 3 x 8 MiB + 5 bytes goes over 3 SFTP sessions, each writing its range; the result is the
    file, progress only grows and ends at the size, and an upload over an existing larger file truncates it."""
    import hashlib
    import os

    import edgeq.remote.sftp as sftp

    assert sftp.upload_streams(3 * sftp.STREAM_MIN_BYTES + 5) == 3
    assert sftp.upload_streams(sftp.STREAM_MIN_BYTES * 2 - 1) == 1
    monkeypatch.setenv("EDGEQ_UPLOAD_STREAMS", "1")
    assert sftp.upload_streams(100 * sftp.STREAM_MIN_BYTES) == 1
    monkeypatch.delenv("EDGEQ_UPLOAD_STREAMS")
    source = tmp_path / "big"
    source.write_bytes(os.urandom(3 * sftp.STREAM_MIN_BYTES + 5))
    dest = tmp_path / "up"
    dest.write_bytes(b"x" * (4 * sftp.STREAM_MIN_BYTES))  # longer than the upload: must be truncated
    calls = []
    with open_transport(dev0(trusted_inventory)) as transport:
        transport.put(source, str(dest), progress=lambda d, t: calls.append(d))
        assert len(transport._more_sftp) == 2
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    assert calls == sorted(calls) and calls[-1] == source.stat().st_size


def test_a_server_that_caps_sessions_gets_the_upload_over_fewer(ssh_home, tmp_path):
    """sshd with MaxSessions 2 (hardened configs): a file worth 3 streams goes over the 2 sessions it allows."""
    import hashlib
    import os

    import edgeq.remote.sftp as sftp
    from tests.lab.sshd import start_sshd, trust_device, write_inventory

    server = start_sshd(tmp_path / "sshd", max_sessions=2)
    try:
        trust_device(server, ssh_home / ".ssh" / "known_hosts")
        inventory = write_inventory(tmp_path / "inv.yaml", {"capped": server}, python=sys.executable)
        source = tmp_path / "big"
        source.write_bytes(os.urandom(3 * sftp.STREAM_MIN_BYTES + 5))
        with open_transport(resolve_targets(load_inventory(inventory), "capped")[0]) as transport:
            transport.put(source, str(tmp_path / "up"))
            assert len(transport._more_sftp) == 1
            transport.put(source, str(tmp_path / "up2"))  # the limit is remembered: no refused request again
        digest = hashlib.sha256(source.read_bytes()).digest()
        assert hashlib.sha256((tmp_path / "up").read_bytes()).digest() == digest
        assert hashlib.sha256((tmp_path / "up2").read_bytes()).digest() == digest
    finally:
        server.stop()


@pytest.mark.parametrize("size_mib", [10, 17], ids=["one-stream", "two-streams"])
def test_an_upload_to_a_full_disk_is_one_clear_error(trusted_inventory, tmp_path, size_mib):
    """paramiko drops a pipelined write's error answer that arrives during the close: on the code before
    this test, a 10 MiB upload to an 8 MiB disk returned as if complete."""
    import os

    from tests.test_deploy import tmpfs_at

    source = tmp_path / "big"
    source.write_bytes(os.urandom(size_mib << 20))
    with tmpfs_at(tmp_path / "small", "8m") as small, open_transport(dev0(trusted_inventory)) as transport:
        with pytest.raises(RemoteCommandError, match=r"cannot write .*up: write failed on the device \(disk full"):
            transport.put(source, str(small / "up"))
        transport.run(["true"])  # the connection is still usable


def test_ssh_config_alias_and_proxy_jump(trusted_inventory, tmp_path):
    """HostName/User/Port/IdentityFile from ~/.ssh/config; ProxyJump through another real sshd."""
    jump = trusted_inventory.devices["dev-1"]
    final = trusted_inventory.devices["dev-0"]
    (trusted_inventory.home / ".ssh" / "config").write_text(
        f"Host bastion\n  HostName {jump.host}\n  Port {jump.port}\n  User {jump.user}\n"
        f"  IdentityFile {jump.client_key}\n"
        f"Host lab-dev\n  HostName {final.host}\n  Port {final.port}\n  User {final.user}\n"
        f"  IdentityFile {final.client_key}\n"
        f"Host lab-dev-via-bastion\n  HostName {final.host}\n  Port {final.port}\n  User {final.user}\n"
        f"  IdentityFile {final.client_key}\n  ProxyJump bastion\n"
        f"Host lab-dev-via-command\n  HostName {final.host}\n  Port {final.port}\n"
        f"  IdentityFile {final.client_key}\n  ProxyCommand {sys.executable} -c \"import socket,sys,threading;"
        f"s=socket.create_connection(('%h',%p));"
        f"threading.Thread(target=lambda:[sys.stdout.buffer.write(b) or sys.stdout.flush() for b in iter(lambda:s.recv(65536),b'')],daemon=True).start();"
        f"[s.sendall(b) for b in iter(lambda:sys.stdin.buffer.read1(65536),b'')]\"\n"
    )
    for alias in ("lab-dev", "lab-dev-via-bastion", "lab-dev-via-command"):
        with open_transport(Target(name=alias, host=alias, profile="x86-avx2")) as transport:
            assert transport.run(["echo", alias]).stdout.strip() == alias
    # inventory fields win over the config: a wrong port in the inventory is used (and refused)
    from tests.lab.sshd import free_port

    with pytest.raises(ConnectError, match="connection refused"):
        open_transport(Target(name="override", host="lab-dev", port=free_port(), profile="x86-avx2"))


def test_bad_proxy_jump_port_is_one_line(ssh_home, tmp_path):
    """A ProxyJump with a non-numeric port is a clear error from the library and from ``targets check``."""
    from click.testing import CliRunner

    from edgeq.cli import cli
    from edgeq.remote.ssh import _parse_jump

    (ssh_home / ".ssh" / "config").write_text("Host behind\n  HostName 127.0.0.1\n  ProxyJump host:abc\n")
    with pytest.raises(ConnectError) as info:
        open_transport(Target(name="behind", host="behind", profile="x86-avx2"))
    assert info.value.message == "~/.ssh/config: ProxyJump 'host:abc': port is not a number"
    inv = tmp_path / "inv.yaml"
    inv.write_text("targets:\n  behind: {host: behind, profile: x86-avx2}\n")
    result = CliRunner().invoke(cli, ["targets", "check", "behind", "-i", str(inv)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "error: ~/.ssh/config: ProxyJump 'host:abc': port is not a number" in result.output
    assert "reachable:        no" in result.output
    assert _parse_jump("ssh://me@[::1]:2222") == ("::1", "me", 2222)
    assert _parse_jump("[fe80::1]") == ("fe80::1", None, None)
    with pytest.raises(ConnectError, match="port must be from 1 to 65535"):
        _parse_jump("gw:70000")


def test_local_transport(tmp_path):
    from edgeq.targets import local_target

    with open_transport(local_target()) as transport:
        assert transport.run(["echo", "$HOME"]).stdout.strip() == "$HOME"
        with pytest.raises(RemoteCommandError, match="timed out"):
            transport.run(["sleep", "5"], timeout=0.5)
        (tmp_path / "a").write_bytes(b"x" * 10)
        transport.put(tmp_path / "a", str(tmp_path / "b"))
        assert (tmp_path / "b").read_bytes() == b"x" * 10
        held = transport.start(["sh", "-c", "echo ready; cat >/dev/null"])
        assert held.readline(5).strip() == "ready"
        closer = threading.Thread(target=held.close)
        closer.start()
        closer.join(10)
        assert not closer.is_alive()


def test_a_transient_connect_failure_is_retried_and_a_lasting_one_is_bounded(ssh_home, tmp_path):
    """A device whose sshd is down for a moment (a reboot, a roaming link) is reached on a retry of the TCP
    connect; a port that stays closed fails after the bounded attempts, as 'connection refused'."""
    from edgeq.remote.ssh import CONNECT_ATTEMPTS, CONNECT_BACKOFF
    from tests.lab.sshd import start_sshd, trust_device

    device = start_sshd(tmp_path / "dev")
    trust_device(device, ssh_home / ".ssh" / "known_hosts")
    target = Target(name="flaky", host=device.host, port=device.port, user=device.user, key=str(device.client_key),
                    profile="x86-avx2")
    device.stop()  # refused from now on
    restarted: list = []
    thread = threading.Timer(0.3, lambda: restarted.append(start_sshd(tmp_path / "dev", port=device.port)))
    started = time.monotonic()
    thread.start()
    try:
        transport = open_transport(target)  # attempt 1 is refused; the retry after 1 s finds it back
        assert time.monotonic() - started >= CONNECT_BACKOFF[0]
        assert transport.run(["true"]).exit_code == 0
        transport.close()
    finally:
        thread.join()
        for again in restarted:
            again.stop()
    started = time.monotonic()
    with pytest.raises(ConnectError, match="connection refused"):
        open_transport(target)
    spent = time.monotonic() - started
    assert sum(CONNECT_BACKOFF[: CONNECT_ATTEMPTS - 1]) <= spent < sum(CONNECT_BACKOFF[: CONNECT_ATTEMPTS - 1]) + 2


def test_a_frozen_device_is_reported_within_the_liveness_bound(ssh_home, tmp_path, monkeypatch):
    """sshd's session processes stopped (SIGSTOP: a hung kernel, a link gone without a reset) while a command
    waits: the keepalive that wants a reply goes unanswered and the command fails as a lost connection after
    interval * count seconds, not at its own time limit."""
    import os
    import signal

    from tests.lab.sshd import start_sshd, trust_device

    monkeypatch.setenv("EDGEQ_ALIVE_INTERVAL", "1")
    monkeypatch.setenv("EDGEQ_ALIVE_COUNT", "3")
    device = start_sshd(tmp_path / "dev")
    trust_device(device, ssh_home / ".ssh" / "known_hosts")
    target = Target(name="frozen", host=device.host, port=device.port, user=device.user,
                    key=str(device.client_key), profile="x86-avx2")
    stopped: list[int] = []

    def freeze() -> None:
        for pid in device.session_pids():
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    try:
        transport = open_transport(target)
        assert transport.run(["sleep", "2"], timeout=30).exit_code == 0  # a quiet command is not "frozen"
        threading.Timer(0.5, freeze).start()
        started = time.monotonic()
        with pytest.raises(ConnectError, match=r"frozen \(.*\): no reply from the device for \d+s while running 'sleep 60'"):
            transport.run(["sleep", "60"], timeout=120)
        assert stopped and time.monotonic() - started < 10
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        device.stop()
