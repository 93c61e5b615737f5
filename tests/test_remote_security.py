"""Security of the remote layer against real loopback sshd devices and real files.

- known_hosts read line by line: @cert-authority / @revoked markers, broken lines, hashed names, wildcards
  and negations as OpenSSH reads them; ``targets trust`` uses the same parser.
- Bounded reads: command output (``max_output``) and downloads (``max_bytes``), on SSH and locally.
- Host and user names checked as OpenSSH's ssh.c does before they can reach a ProxyCommand (CVE-2023-51385).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.errors import ConnectError, InventoryError
from edgeq.remote import open_transport
from edgeq.remote.base import MAX_DOWNLOAD_BYTES, MAX_OUTPUT_BYTES, SizeLimitError
from edgeq.targets import (
    Target,
    hostname_problem,
    load_inventory,
    local_target,
    resolve_targets,
    user_problem,
)
from tests.lab.sshd import generate_key, write_inventory

MIB = 1 << 20


def public_key(path: Path) -> str:
    """``type base64`` of a key pair's public half."""
    kind, data = path.with_suffix(".pub").read_text().split()[:2]
    return f"{kind} {data}"


def setup_device(tmp_path: Path, device, lines: list[str], name: str = "dev") -> tuple[Path, Path]:
    """An inventory naming ``device`` as ``name`` and ``~/.ssh/known_hosts`` holding exactly ``lines``."""
    inventory = write_inventory(tmp_path / "inv.yaml", {name: device})
    known_hosts = Path.home() / ".ssh" / "known_hosts"
    known_hosts.write_text("".join(line + "\n" for line in lines))
    return inventory, known_hosts


def target_of(inventory: Path, name: str = "dev") -> Target:
    return resolve_targets(load_inventory(inventory), name)[0]


def echo(target: Target) -> str:
    with open_transport(target) as transport:
        return transport.run(["echo", "hello"], timeout=30).stdout.strip()


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    return result


# -- (c) known_hosts ------------------------------------------------------------------------------------------

@pytest.mark.sshd
def test_known_hosts_markers_and_broken_lines_are_skipped_not_fatal(ssh_home, sshd_device, tmp_path, caplog):
    """One @cert-authority / @revoked line or a broken line used to make every connect a traceback
    (paramiko's InvalidHostKey); now the markers are understood, broken lines are skipped with a warning
    naming file and line, and the device's own line still works for connect and trust."""
    ca = public_key(generate_key(tmp_path / "ca"))
    other = public_key(generate_key(tmp_path / "other"))
    key_b64 = sshd_device.host_key_line.split()[1]
    inventory, known_hosts = setup_device(tmp_path, sshd_device, [
        "# a comment",                                                  # 1
        f"@cert-authority *.example.com {ca}",                          # 2
        f"@revoked old.example.com {other}",                            # 3
        "truncated.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI",  # 4: not valid base64
        f"cut.example.com ssh-ed25519 {key_b64[:len(key_b64) // 4 * 4 - 8]}",  # 5: valid base64, cut key
        "new.example.com sk-unknown-type@example.com AAAA",             # 6: unknown key type
        "toofew.example.com ssh-ed25519",                               # 7: too few fields
        f"@bogus {sshd_device.known_hosts_line()}",                     # 8: unknown marker
        "",
        sshd_device.known_hosts_line(),                                 # 10
    ])
    with caplog.at_level(logging.WARNING, logger="edgeq.remote.known_hosts"):
        assert echo(target_of(inventory)) == "hello"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for lineno in (4, 5, 6, 7, 8):
        assert any(m.startswith(f"{known_hosts} line {lineno}: skipping") for m in warned), (lineno, warned)
    assert not any(f"line {n}:" in m for m in warned for n in (1, 2, 3, 10))
    trusted = invoke("targets", "trust", "dev", "-i", str(inventory))
    assert trusted.exit_code == 0 and "already in" in trusted.output, trusted.output


@pytest.mark.sshd
def test_hashed_names_wildcards_lists_and_negations(ssh_home, sshd_device, tmp_path):
    port = sshd_device.port
    key = sshd_device.host_key_line
    inventory, known_hosts = setup_device(tmp_path, sshd_device, [sshd_device.known_hosts_line()])
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    assert known_hosts.read_text().startswith("|1|") and "127.0.0.1" not in known_hosts.read_text()
    target = target_of(inventory)
    assert echo(target) == "hello"  # hashed |1|salt|hash name

    for names in (f"other.example,[127.0.0.?]:{port}", "[127.0.0.*]:*", f"!other.example,[127.0.0.1]:{port}",
                  f"[LOCALHOST]:1,[127.0.0.1]:{str(port)[:-1]}*"):
        known_hosts.write_text(f"{names} {key}\n")
        assert echo(target) == "hello", names
    for names in (f"![127.0.0.1]:{port},[127.0.0.*]:*", f"[127.0.0.1]:{port}0", "127.0.0.1"):
        known_hosts.write_text(f"{names} {key}\n")
        with pytest.raises(ConnectError, match=r"host key is not trusted \(no entry for \[127\.0\.0\.1\]"):
            open_transport(target)


def test_host_matching_follows_openssh():
    from edgeq.remote.known_hosts import host_matches

    assert host_matches("[10.0.0.5]:2222", ["[10.0.0.5]:2222"])
    assert host_matches("Rpi-01.Lab", ["rpi-0?.LAB"])  # case-insensitive, ? is one character
    assert not host_matches("rpi-010.lab", ["rpi-0?.lab"])
    assert host_matches("a.b.c", ["x", "*.c"])
    assert not host_matches("a.b.c", ["*.c", "!a.*"])  # a matching negation wins whatever its position
    assert not host_matches("a.b.c", ["!x.*"])  # negations alone match nothing
    assert not host_matches("[h]:22", ["[h]"])  # brackets are literal, not a character class


@pytest.mark.sshd
def test_revoked_key_is_refused_even_where_also_trusted(ssh_home, sshd_device, tmp_path):
    key = sshd_device.host_key_line
    inventory, known_hosts = setup_device(tmp_path, sshd_device, [
        sshd_device.known_hosts_line(),
        f"@revoked unrelated.example.com {key}",  # revoked for every host, whatever names the line has
    ])
    with pytest.raises(ConnectError) as info:
        open_transport(target_of(inventory))
    assert f"is marked @revoked in {known_hosts} line 2; refusing to connect" in info.value.message
    assert info.value.message.startswith("dev (") and "\n" not in info.value.message
    checked = invoke("targets", "check", "dev", "-i", str(inventory))
    assert checked.exit_code == 1 and "host key trusted: NO" in checked.output
    assert f"@revoked in {known_hosts} line 2" in checked.output

    # trust never records a revoked key
    known_hosts.write_text(f"@revoked * {key}\n")
    refused = invoke("targets", "trust", "dev", "-i", str(inventory))
    assert refused.exit_code == 1
    assert f"is marked @revoked in {known_hosts} line 1; not recording it" in refused.output
    assert known_hosts.read_text() == f"@revoked * {key}\n"


@pytest.mark.sshd
def test_host_known_only_through_a_cert_authority(ssh_home, sshd_device, tmp_path):
    ca = public_key(generate_key(tmp_path / "ca"))
    inventory, known_hosts = setup_device(tmp_path, sshd_device, [f"@cert-authority [127.0.0.1]:* {ca}"])
    checked = invoke("targets", "check", "dev", "-i", str(inventory))
    assert checked.exit_code == 1
    assert "host certificates are not supported" in checked.output
    assert f"@cert-authority ({known_hosts} line 1)" in checked.output
    assert "edgeq targets trust dev" in checked.output  # the hint: record the plain key
    trusted = invoke("targets", "trust", "dev", "-i", str(inventory))
    assert trusted.exit_code == 0 and "added to" in trusted.output, trusted.output
    assert known_hosts.read_text().splitlines()[1] == sshd_device.known_hosts_line()
    assert echo(target_of(inventory)) == "hello"


# -- (d) bounded output and downloads -------------------------------------------------------------------------

FLOOD = "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); [os.write({fd}, b'x' * 65536) for _ in iter(int, 1)]"


def gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def check_output_caps(transport, tmp_path: Path, label: str) -> None:
    assert MAX_OUTPUT_BYTES == 16 * MIB
    exact = transport.run([sys.executable, "-c", f"import sys; sys.stdout.write('y' * {MIB})"],
                          timeout=60, max_output=MIB)
    assert len(exact.stdout) == MIB  # at the cap is fine
    too_much = [sys.executable, "-c", f"import sys; sys.stdout.write('y' * {MIB + 1})"]
    with pytest.raises(SizeLimitError) as info:
        transport.run(too_much, timeout=60, max_output=MIB)
    assert info.value.message.startswith(f"{label}: '{sys.executable} -c ")
    assert "wrote more than 1 MiB to stdout (max_output); stopped it" in info.value.message
    assert info.value.limit == MIB and info.value.host == label
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        pid_file = tmp_path / f"flood-{stream}.pid"
        started = time.monotonic()
        with pytest.raises(SizeLimitError, match=f"more than 256 KiB to {stream}"):
            transport.run([sys.executable, "-c", FLOOD.format(fd=fd), str(pid_file)], timeout=120,
                          max_output=256 << 10)
        assert time.monotonic() - started < 30
        assert gone(int(pid_file.read_text())), f"the flooding command on {stream} was not stopped"
    assert transport.run(["echo", "still usable"], timeout=30).stdout.strip() == "still usable"


def check_download_caps(transport, tmp_path: Path, label: str) -> None:
    assert MAX_DOWNLOAD_BYTES == 256 * MIB
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(2 * MIB))
    transport.get(str(source), tmp_path / "default")  # the old two-argument call
    transport.get(str(source), tmp_path / "exact", max_bytes=2 * MIB)
    assert (tmp_path / "default").read_bytes() == (tmp_path / "exact").read_bytes() == source.read_bytes()
    with pytest.raises(SizeLimitError) as info:
        transport.get(str(source), tmp_path / "big", max_bytes=MIB)
    assert info.value.message == (f"{label}: {source} is larger than the 1 MiB download cap (max_bytes): "
                                  f"it is {2 * MIB} bytes; not downloaded")
    assert info.value.path == str(source) and info.value.limit == MIB
    assert not (tmp_path / "big").exists()
    # /dev/zero: stat says 0 bytes and reading never ends, so only counting while reading catches it
    started = time.monotonic()
    with pytest.raises(SizeLimitError, match=r"/dev/zero is larger than the 1 MiB download cap .*grew past"):
        transport.get("/dev/zero", tmp_path / "zero", max_bytes=MIB)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "zero").exists()  # the partial copy is removed


@pytest.mark.sshd
def test_ssh_command_output_is_capped(trusted_inventory, tmp_path):
    target = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")[0]
    with open_transport(target) as transport:
        check_output_caps(transport, tmp_path, target.label)


def test_local_command_output_is_capped(tmp_path):
    target = local_target()
    with open_transport(target) as transport:
        check_output_caps(transport, tmp_path, target.label)
        assert transport.run(["cat"], input=b"abc", max_output=3).stdout == "abc"


@pytest.mark.sshd
def test_ssh_downloads_are_capped(trusted_inventory, tmp_path):
    target = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")[0]
    with open_transport(target) as transport:
        check_download_caps(transport, tmp_path, target.label)


def test_local_downloads_are_capped(tmp_path):
    target = local_target()
    with open_transport(target) as transport:
        check_download_caps(transport, tmp_path, target.label)


# -- (e) host and user names ----------------------------------------------------------------------------------

def test_host_and_user_rules_match_openssh():
    for good in ("10.0.0.31", "rpi-01.lab", "[::1]", "fe80::1%eth0", "host_1", "xn--bcher-kva.example"):
        assert hostname_problem(good) is None, good
    for bad, why in (("-oProxyCommand=x", "starts with '-'"), ("a b", "whitespace"), ("a\tb", "whitespace"),
                     ("a\x01b", "control"), ("a;b", "';'"), ("a$b", "'$'"), ("a`b", "'`'"), ("a'b", "\"'\""),
                     ('a"b', "'\"'"), ("a\\b", "'\\\\'"), ("a&b", "'&'"), ("a|b", "'|'"), ("a(b", "'('"),
                     ("a{b", "'{'"), ("a<b", "'<'")):
        problem = hostname_problem(bad)
        assert problem is not None and why in problem, (bad, problem)
    for good in ("ubuntu", "first.last", "DOMAIN\\user", "a b", "a$b"):
        assert user_problem(good) is None, good
    for bad, why in (("-oX", "starts with '-'"), ("a -oX", "whitespace followed by '-'"), ("u\\", "backslash"),
                     ("a;b", "';'"), ("a`b", "'`'"), ("a|b", "'|'"), ("", "empty")):
        problem = user_problem(bad)
        assert problem is not None and why in problem, (bad, problem)


@pytest.fixture
def proxy_everything(ssh_home, tmp_path) -> Path:
    """A ~/.ssh/config whose ProxyCommand runs through a shell with %h / %r spliced in (as many real
    configs do): any shell syntax in a name would run on the controller."""
    (ssh_home / ".ssh" / "config").write_text('Host *\n  ProxyCommand sh -c "echo %r >/dev/null; nc %h %p"\n')
    return tmp_path / "pwned"


@pytest.mark.parametrize("field, value, why", [
    ("host", "x;touch {marker};", "it contains ';'"),
    ("host", "y:1 -oProxyCommand=touch {marker}", "whitespace"),
    ("host", "-oProxyCommand=touch {marker}", "it starts with '-'"),
    ("host", "$(touch {marker})", "it contains '$'"),
    ("user", "-oProxyCommand=touch {marker}", "it starts with '-'"),
    ("user", "u;touch {marker};", "it contains ';'"),
    ("user", "u -oProxyCommand=x", "whitespace followed by '-'"),
    ("user", "u\\", "it ends with a backslash"),
])
def test_inventory_rejects_names_openssh_rejects(proxy_everything, tmp_path, field, value, why):
    marker = proxy_everything
    value = value.format(marker=marker)
    entry = {"host": "127.0.0.1", "profile": "x86-avx2", field: value}
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump({"targets": {"evil": entry}}))
    expected = f"{inventory}: targets.evil.{field}: Value error, {field} {value!r} is not a valid "
    for command in (["targets", "list"], ["targets", "check", "evil"]):
        result = invoke(*command, "-i", str(inventory))
        assert result.exit_code == 1, result.output
        line = next(line for line in result.output.splitlines() if line.startswith("error: "))
        assert line.startswith(f"error: {expected}") and why in line, line
    with pytest.raises(InventoryError):
        load_inventory(inventory)
    time.sleep(0.2)
    assert not marker.exists(), "the injected command ran on the controller"


def test_ssh_config_names_are_checked_before_any_proxycommand(ssh_home, tmp_path):
    """What ~/.ssh/config resolves (HostName, User, ProxyJump hops) is checked before %h / %r reach a
    ProxyCommand; the error names the target and the field, in one line, through ``targets check``."""
    marks = {name: tmp_path / f"pwned-{name}" for name in ("hostname", "user", "jump", "jumpuser")}
    (ssh_home / ".ssh" / "config").write_text(
        f"Host evil-hostname\n  HostName x;touch {marks['hostname']};\n  ProxyCommand sh -c \"nc %h %p\"\n"
        f"Host evil-user\n  HostName 127.0.0.1\n  User u;touch {marks['user']};\n"
        f"  ProxyCommand sh -c \"echo %r >/dev/null; nc %h %p\"\n"
        f"Host evil-jump\n  HostName 127.0.0.1\n  ProxyJump x;touch {marks['jump']}\n"
        f"Host evil-jumpuser\n  HostName 127.0.0.1\n  ProxyJump me;touch${{IFS}}{marks['jumpuser']}@x\n"
        "Host x*\n  ProxyCommand sh -c \"echo %r >/dev/null; nc %h %p\"\n"
    )
    targets = {name: {"host": name, "profile": "x86-avx2"} for name in
               ("evil-hostname", "evil-user", "evil-jump", "evil-jumpuser")}
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(yaml.safe_dump({"targets": targets}))
    expected = {
        "evil-hostname": f"error: evil-hostname: ~/.ssh/config HostName 'x;touch {marks['hostname']};' is not a "
                         "valid host name: it contains ';'",
        "evil-user": f"error: evil-user: ~/.ssh/config User 'u;touch {marks['user']};' is not a valid user name: "
                     "it contains ';'",
        "evil-jump": f"error: evil-jump: ~/.ssh/config ProxyJump host 'x;touch {marks['jump']}' is not a valid "
                     "host name: it contains ';'",
        "evil-jumpuser": f"error: evil-jumpuser: ~/.ssh/config ProxyJump user 'me;touch${{IFS}}{marks['jumpuser']}' "
                         "is not a valid user name: it contains ';'",
    }
    for name, message in expected.items():
        result = invoke("targets", "check", name, "-i", str(inventory))
        assert result.exit_code == 1, result.output
        assert message in result.output.splitlines(), result.output
        with pytest.raises(ConnectError):
            open_transport(target_of(inventory, name))
    time.sleep(0.2)
    assert not [m for m in marks.values() if m.exists()], "an injected command ran on the controller"


@pytest.mark.sshd
def test_proxycommand_tokens_use_the_inventory_port_and_user(ssh_home, sshd_device, tmp_path):
    """ProxyCommand's %h %p %r are expanded by edgeq after the checks, with the inventory's values winning
    (as OpenSSH does; paramiko's own expansion used the config's port, here the default 22)."""
    seen = tmp_path / "seen"
    (ssh_home / ".ssh" / "config").write_text(
        "Host via-proxy\n  HostName 127.0.0.1\n"
        f"  ProxyCommand {sys.executable} -c \"import socket,sys,threading;"
        f"open('{seen}','w').write('%r@%h:%p %n %%');"
        f"s=socket.create_connection(('%h',%p));"
        f"threading.Thread(target=lambda:[sys.stdout.buffer.write(b) or sys.stdout.flush() for b in iter(lambda:s.recv(65536),b'')],daemon=True).start();"
        f"[s.sendall(b) for b in iter(lambda:sys.stdin.buffer.read1(65536),b'')]\"\n"
    )
    (ssh_home / ".ssh" / "known_hosts").write_text(sshd_device.known_hosts_line() + "\n")
    target = Target(name="proxied", host="via-proxy", port=sshd_device.port, user=sshd_device.user,
                    key=str(sshd_device.client_key), profile="x86-avx2")
    assert echo(target) == "hello"
    assert seen.read_text() == f"{sshd_device.user}@127.0.0.1:{sshd_device.port} via-proxy %"
