"""The TLS + bearer-token remote API, migration over it, and two network namespaces as two hosts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mvapi import cli, free_port, https_request, short_root
from snaphelp import Daemon, make_cert, numbers

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture
def remote(make_daemon, tls: tuple[Path, Path]) -> tuple[Daemon, int, Path, Path]:  # type: ignore[no-untyped-def]
    cert, key = tls
    tok = make_daemon.root / "token"
    tok.write_text(TOKEN + "\n")
    port = free_port()
    d = make_daemon("r", "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key),
                    "--token-file", str(tok), images=())
    return d, port, tok, cert


def test_remote_api_needs_the_token(remote: tuple[Daemon, int, Path, Path]) -> None:
    d, port, tok, cert = remote
    r = https_request("127.0.0.1", port, "GET", "/v1/info", cafile=str(cert))
    assert r.status == 401 and r.code == "unauthorized"
    r = https_request("127.0.0.1", port, "GET", "/v1/info", cafile=str(cert), token="wrong-token-0123456789")
    assert r.status == 401 and r.code == "unauthorized"
    r = https_request("127.0.0.1", port, "GET", "/v1/snapshots", cafile=str(cert))
    assert r.status == 401
    r = https_request("127.0.0.1", port, "GET", "/v1/info", cafile=str(cert), token=TOKEN)
    assert r.status == 200 and r.json()["api_version"] == "v1"
    assert d.api("GET", "/v1/info").status == 200  # the Unix socket needs no token


def test_client_over_https(remote: tuple[Daemon, int, Path, Path]) -> None:
    d, port, tok, cert = remote
    url = f"https://127.0.0.1:{port}"
    r = cli(url, "--token-file", str(tok), "--tls-ca", str(cert), "info")
    assert r.returncode == 0, r.stderr
    assert "Daemon version" in r.stdout
    r = cli(url, "--tls-ca", str(cert), "info")
    assert r.returncode == 125 and "unauthorized" in r.stderr
    r = cli(url, "--token-file", str(tok), "info")  # a self-signed certificate is not trusted by default
    assert r.returncode == 125 and "certificate" in r.stderr.lower(), r.stderr
    r = cli(url, "--tls-ca", str(cert), "ps", env={"MICROVM_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr


def test_export_import_restore_over_https(make_daemon, remote: tuple[Daemon, int, Path, Path]) -> None:  # type: ignore[no-untyped-def]
    d, port, tok, cert = remote
    a = make_daemon("ha", images=("counter",))
    a.mv("run", "-d", "--name", "hc", "--env", "INTERVAL_MS=30", "counter")
    v = a.wait_count("hc", 3)
    a.mv("snapshot", "create", "hc", "--name", "s-hc")
    f = make_daemon.root / "hc.snap"
    a.mv("snapshot", "export", "s-hc", "-o", str(f))
    url = f"https://127.0.0.1:{port}"
    common = ["--token-file", str(tok), "--tls-ca", str(cert)]
    r = cli(url, *common, "snapshot", "import", str(f))
    assert r.returncode == 0 and r.stdout.strip() == "s-hc", r.stderr
    r = cli(url, *common, "restore", "s-hc", "--name", "hc2", "--start")
    assert r.returncode == 0, r.stderr
    assert d.wait_count("hc2", 0) > v


def test_migrate_over_https(make_daemon, remote: tuple[Daemon, int, Path, Path]) -> None:  # type: ignore[no-untyped-def]
    """`migrate --to https://... --token-file F --to-ca CERT`: the source daemon verifies the self-signed target."""
    d, port, tok, cert = remote
    a = make_daemon("src", images=("counter",))
    a.mv("run", "-d", "--name", "mh", "--env", "INTERVAL_MS=30", "counter")
    v = a.wait_count("mh", 3)
    to = f"https://127.0.0.1:{port}"
    # without the CA the target's certificate is not trusted: nothing changes
    r = a.cli("migrate", "mh", "--to", to, "--token-file", str(tok))
    assert r.returncode == 125 and "migration_failed" in r.stderr and "certificate" in r.stderr.lower(), r.stderr
    assert a.vm("mh")["state"] == "running"
    bad = make_daemon.root / "bad-token"
    bad.write_text("not-the-token-0123456789")
    r = a.cli("migrate", "mh", "--to", to, "--token-file", str(bad), "--to-ca", str(cert))
    assert r.returncode == 125 and "401" in r.stderr and "migration_failed" in r.stderr, r.stderr
    assert a.vm("mh")["state"] == "running"
    r = a.cli("migrate", "mh", "--to", to, "--token-file", str(tok), "--to-ca", str(cert))
    assert r.returncode == 0, r.stderr
    new_id = r.stdout.strip()
    assert a.api("GET", "/v1/vms/mh").status == 404
    assert d.vm("mh")["id"] == new_id
    got = numbers(d.logs("mh")) or [d.wait_count("mh", 0)]
    assert got[0] > v
    r = cli(to, "--token-file", str(tok), "--tls-ca", str(cert), "--json", "ps")
    assert r.returncode == 0 and "mh" in r.stdout, r.stderr


def test_migrate_ca_file_in_the_api(make_daemon, remote: tuple[Daemon, int, Path, Path]) -> None:  # type: ignore[no-untyped-def]
    d, port, tok, cert = remote
    a = make_daemon("src2", images=("counter",))
    a.mv("create", "--name", "mca", "counter")
    to = f"https://127.0.0.1:{port}"
    for ca, code in (("cert.pem", "invalid_field"), (7, "invalid_field"),
                     (str(make_daemon.root / "no-such.pem"), "invalid_destination"),
                     (str(make_daemon.root / "bad-token-not-pem"), "invalid_destination")):
        (make_daemon.root / "bad-token-not-pem").write_text("not a certificate")
        r = a.api("POST", "/v1/vms/mca/migrate", {"to": to, "token": TOKEN, "ca_file": ca})
        assert r.status == 400 and r.code == code, (ca, r.status, r.text)
    assert a.vm("mca")["state"] == "created"
    r = a.api("POST", "/v1/vms/mca/migrate", {"to": to, "token": TOKEN, "ca_file": str(cert)})
    assert r.status == 200, r.text
    assert d.vm("mca")["state"] == "created" and a.api("GET", "/v1/vms/mca").status == 404


# ---------------------------------------------------------------------------------------------- two hosts
def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str, str]]:
    """Network namespaces A and B joined by a veth pair: (nsA, nsB, ipA, ipB); the 10.x addresses exist only
    inside the namespaces."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed: cannot make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"mvsnapA{tag}", f"mvsnapB{tag}"
    va, vb = f"mvsa{tag}", f"mvsb{tag}"
    ip_a, ip_b = "10.231.77.1", "10.231.77.2"
    made: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {r.stderr.strip()}")
            made.append(ns)
        steps = [
            ("link", "add", va, "type", "veth", "peer", "name", vb),
            ("link", "set", va, "netns", ns_a), ("link", "set", vb, "netns", ns_b),
            ("-n", ns_a, "addr", "add", f"{ip_a}/24", "dev", va), ("-n", ns_b, "addr", "add", f"{ip_b}/24", "dev", vb),
            ("-n", ns_a, "link", "set", va, "up"), ("-n", ns_b, "link", "set", vb, "up"),
            ("-n", ns_a, "link", "set", "lo", "up"), ("-n", ns_b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the veth pair ({' '.join(step)}): {r.stderr.strip()}")
        yield ns_a, ns_b, ip_a, ip_b
    finally:
        _ip("link", "del", va)  # only if it never moved into a namespace
        for ns in made:
            _ip("netns", "del", ns)


def test_migrate_between_two_network_namespaces_over_tls(make_daemon, two_hosts) -> None:  # type: ignore[no-untyped-def]
    ns_a, ns_b, ip_a, ip_b = two_hosts
    certdir = short_root("mvsnap-nscert-")
    try:
        got = make_cert(certdir, [ip_b])
        if isinstance(got, str):
            pytest.skip(got)
        cert, key = got
        tok = certdir / "token"
        tok.write_text(TOKEN)
        b = make_daemon("nb", "--listen", f"{ip_b}:7443", "--tls-cert", str(cert), "--tls-key", str(key),
                        "--token-file", str(tok), images=(), prefix=["ip", "netns", "exec", ns_b])
        a = make_daemon("na", images=("counter", "echo"), prefix=["ip", "netns", "exec", ns_a])
        url = f"https://{ip_b}:7443"
        in_a = ["ip", "netns", "exec", ns_a]
        # host A reaches B's remote API over the veth, with the token
        r = cli(url, "--token-file", str(tok), "--tls-ca", str(cert), "info", prefix=in_a)
        assert r.returncode == 0, r.stderr
        r = cli(url, "--tls-ca", str(cert), "info", prefix=in_a)
        assert r.returncode == 125 and "unauthorized" in r.stderr
        a.mv("run", "-d", "--name", "nc", "--env", "INTERVAL_MS=30", "counter")
        v = a.wait_count("nc", 3)
        r = a.cli("--json", "migrate", "nc", "--to", url, "--token-file", str(tok), "--to-ca", str(cert))
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["stats"]["chunks_sent"] == answer["stats"]["chunks_total"] > 0  # B had nothing
        assert a.api("GET", "/v1/vms/nc").status == 404
        first = numbers(b.logs("nc")) or [b.wait_count("nc", 0)]
        assert first[0] > v
        b.wait_count("nc", first[0] + 2)
        # only the chunks the target lacks travel: give B a snapshot of an identical created VM first
        for name in ("nc2", "nc3"):
            a.mv("create", "--name", name, "counter")
        a.mv("snapshot", "create", "nc3", "--name", "s-nc3")
        a.mv("snapshot", "export", "s-nc3", "-o", str(certdir / "nc3.snap"))
        b.mv("snapshot", "import", str(certdir / "nc3.snap"))
        r = a.cli("--json", "migrate", "nc2", "--to", url, "--token-file", str(tok), "--to-ca", str(cert))
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout)["stats"]
        assert stats["chunks_sent"] == 0 < stats["chunks_total"], stats
        assert b.vm("nc2")["state"] == "created"
        # and an unreachable address in A's namespace fails cleanly, the VM stays
        a.mv("run", "-d", "--name", "nc4", "--env", "INTERVAL_MS=30", "counter")
        r = a.cli("migrate", "nc4", "--to", f"https://{ip_a}:7443", "--token-file", str(tok), "--to-ca", str(cert))
        assert r.returncode == 125 and "migration_failed" in r.stderr
        assert a.vm("nc4")["state"] == "running"
    finally:
        shutil.rmtree(certdir, ignore_errors=True)
