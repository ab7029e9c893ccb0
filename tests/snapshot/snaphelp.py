"""Helpers for the snapshot suite on top of the shared mvapi module (real `microvmd` subprocesses, the real
`microvm` client, raw HTTP over Unix sockets and TLS): the snapshot conveniences of a daemon, the export
stream format, and guests built on the fly with guest-sdk/mvcc.

Nothing here fakes the daemon: every VM call goes to a `python -m microvmd.daemon` child process.
"""
from __future__ import annotations

import hashlib
import inspect
import re
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mvapi
from mvapi import REPO


def numbers(text: str) -> list[int]:
    """The counter lines (`1`, `2`, ...) of a console."""
    return [int(x) for x in re.findall(r"^(\d+)$", text, re.M)]


class Daemon(mvapi.Daemon):
    """A real `microvmd` child process (mvapi.Daemon) with the snapshot suite's conveniences."""

    def import_image(self, path: Path, name: str | None = None) -> str:
        """Import the module file `path`; returns its digest."""
        r = self.api.import_image(path.read_bytes(), name)
        assert r.status in (200, 201), r.text
        return r.json()["digest"]  # type: ignore[no-any-return]

    def vm(self, ref: str) -> dict[str, Any]:
        return self.get(ref)

    def snapshots(self) -> list[str]:
        return sorted(s["name"] for s in self.ok("GET", "/v1/snapshots")["snapshots"])

    def wait_count(self, ref: str, above: int, timeout: float = 20.0) -> int:
        """Until the counter VM `ref` has printed a number > above; returns the last one."""
        end = time.monotonic() + timeout
        while True:
            n = numbers(self.logs(ref))
            if n and n[-1] > above:
                return n[-1]
            if time.monotonic() > end:
                raise AssertionError(f"{ref} did not count past {above} in {timeout} s: {n[-5:]}")
            time.sleep(0.05)

    def wait_state(self, ref: str, *states: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.api.wait_state(ref, *states, timeout=timeout)


# ------------------------------------------------------------------------------------------------ export stream
def record(kind: int, payload: bytes) -> bytes:
    """One stream record: u8 type, u32 length, payload, u32 CRC-32 of (type, length, payload)."""
    head = struct.pack("<BI", kind, len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


# What the end record's SHA-256 covers; detected from what the daemon wrote (the format has had both).
DIGEST_SCHEMES = {
    "every byte": lambda raw: raw,                       # each record whole
    "record framing": lambda raw: raw[:5] + raw[-4:],    # each record's type, length and CRC-32
}


@dataclass
class Export:
    """A parsed `snapshot export` stream: header bytes, records (type, payload) without the end record."""

    head: bytes
    records: list[tuple[int, bytes]]
    offsets: list[int]  # byte offset of each record (and of the end record, last)
    scheme: str = "every byte"

    @classmethod
    def parse(cls, data: bytes) -> Export:
        (wlen,) = struct.unpack_from("<H", data, 10)
        pos = 12 + wlen
        (flen,) = struct.unpack_from("<H", data, pos)
        pos += 2 + flen
        head = data[:pos]
        records, offsets = [], []
        while True:
            offsets.append(pos)
            kind, length = struct.unpack_from("<BI", data, pos)
            payload = data[pos + 5:pos + 5 + length]
            pos += 5 + length + 4
            if kind == 255:
                end = payload
                break
            records.append((kind, payload))
        assert pos == len(data), "trailing bytes after the end record"
        ex = cls(head, records, offsets)
        for name in DIGEST_SCHEMES:
            ex.scheme = name
            if ex.end_digest() == end:
                return ex
        raise AssertionError("the export's end digest matches no known scheme: update tests/snapshot/snaphelp.py")

    def end_digest(self) -> bytes:
        cover = DIGEST_SCHEMES[self.scheme]
        d = hashlib.sha256(self.head)
        for kind, payload in self.records:
            d.update(cover(record(kind, payload)))
        return d.digest()

    def build(self) -> bytes:
        """Re-encode with valid CRCs and end digest (so only what the test changed is wrong)."""
        return self.head + b"".join(record(k, p) for k, p in self.records) + record(255, self.end_digest())

    def manifest(self) -> dict[str, Any]:
        from microvmd.snapshot import store

        kw = {"stored": False} if "stored" in inspect.signature(store.decode_manifest).parameters else {}
        return store.decode_manifest(self.records[0][1], "test", **kw)

    def with_manifest(self, m: dict[str, Any]) -> Export:
        from microvmd.snapshot import store

        recs = list(self.records)
        recs[0] = (1, store.encode_manifest(m))
        return Export(self.head, recs, [], self.scheme)


# ------------------------------------------------------------------------------------------------ guests
BUSY_C = r"""
/* busy: an Asyncify (SDK) guest that computes forever without ever reaching a suspension point. */
#include <microvm.h>
#include <stdio.h>
int main(void) {
    printf("busy start\n");
    fflush(stdout);
    volatile unsigned long long x = 1;
    for (;;) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return 0;
}
"""

BURST_C = r"""
/* burst: computes ITERS iterations (long stretches without a suspension point), prints how many bursts
 * it finished, then calls mv_yield() (a suspension point); forever. */
#include <microvm.h>
#include <stdio.h>
int main(void) {
    long iters = mv_env_int("ITERS", 50000000);
    volatile unsigned long long x = 1;
    for (unsigned long n = 1;; n++) {
        for (long i = 0; i < iters; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        printf("%lu\n", n);
        fflush(stdout);
        mv_yield();
    }
}
"""

BIG_C = r"""
/* bigcounter: fills MEM_MB MiB with pseudo-random bytes (no two chunks alike), then counts like
 * images/counter, dirtying one 4 KiB page per tick; CHURN=1 refills the whole buffer every tick, so
 * every snapshot has MEM_MB MiB of new chunks. */
#include <microvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static unsigned long long s;
static void fill(unsigned char *buf, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        memcpy(buf + i, &s, 8);
    }
}
int main(void) {
    long mb = mv_env_int("MEM_MB", 4);
    long interval = mv_env_int("INTERVAL_MS", 20);
    long churn = mv_env_int("CHURN", 0);
    size_t n = (size_t)mb << 20;
    unsigned char *buf = malloc(n);
    if (!buf) { printf("alloc failed\n"); return 1; }
    s = 88172645463325252ULL ^ (unsigned long long)mv_env_int("SEED", 1);
    fill(buf, n);
    printf("filled %ld MiB\n", mb);
    fflush(stdout);
    for (unsigned long long i = 1;; i++) {
        if (churn) fill(buf, n); else buf[(i * 4096) % n] ^= 1;
        printf("%llu\n", i);
        fflush(stdout);
        mv_sleep_ms((int)interval);
    }
    return 0;
}
"""

# Serves one client at a time, blocking in mv_accept (a suspension point) between clients.
GREET_C = r"""
#include <errno.h>
#include <microvm.h>
#include <stdio.h>
#include <string.h>
int main(void) {
    int port = (int)mv_env_int("PORT", 8000);
    int lsd = mv_listen(port, 16);
    if (lsd < 0) { mv_log("listen: %s", strerror(errno)); return 1; }
    mv_log("listening on port %d", port);
    for (int n = 1;; n++) {
        int sd = mv_accept(lsd);
        printf("accepted %d\n", n);
        fflush(stdout);
        if (sd < 0) continue;
        char line[256];
        while (mv_recv_line(sd, line, sizeof line) > 0) {
            char out[300];
            snprintf(out, sizeof out, "hello %d, %s\n", n, line);
            mv_send_all(sd, out, strlen(out));
        }
        mv_close(sd);
    }
}
"""


# tablecounter: changes its function table at run time (a slot overwritten, the table grown by one), then
# counts like counter, calling through both slots first: "calls 2 2" before each number. Restored without
# its table it would print "calls 1 ..." or trap on the grown slot. The table instructions are in wasm
# assembly (C has no syntax for them).
TABLE_C = r"""
#include <microvm.h>
#include <stdint.h>
#include <stdio.h>
void table_copy_slot(int dst, int src);
int table_grow_with(int src);
static int one(void) { return 1; }
static int two(void) { return 2; }
typedef int (*fn)(void);
static volatile fn pa = one, pb = two;
int main(void) {
    long interval = mv_env_int("INTERVAL_MS", 20);
    int ia = (int)(uintptr_t)pa, ib = (int)(uintptr_t)pb;
    table_copy_slot(ia, ib);
    fn pc = (fn)(uintptr_t)table_grow_with(ia);
    printf("changed\n");
    for (unsigned long i = 1;; i++) {
        printf("calls %d %d\n%lu\n", pa(), pc(), i);
        fflush(stdout);
        mv_sleep_ms((int)interval);
    }
}
"""

TABLE_S = """
	.text
	.tabletype	__indirect_function_table, funcref
	.globl	table_copy_slot
	.type	table_copy_slot,@function
table_copy_slot:
	.functype	table_copy_slot (i32, i32) -> ()
	local.get	0
	local.get	1
	table.get	__indirect_function_table
	table.set	__indirect_function_table
	end_function

	.globl	table_grow_with
	.type	table_grow_with,@function
table_grow_with:
	.functype	table_grow_with (i32) -> (i32)
	local.get	0
	table.get	__indirect_function_table
	i32.const	1
	table.grow	__indirect_function_table
	end_function
"""


def build_guests(out: Path) -> dict[str, Path] | str:
    """Build the test guests with guest-sdk/mvcc; a string says why they could not be built."""
    mvcc = REPO / "guest-sdk" / "mvcc"
    for tool in ("clang", "wasm-opt"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: cannot build test guests with guest-sdk/mvcc"
    built = {}
    (out / "tables.s").write_text(TABLE_S)
    table_args = ["-mreference-types", "-Wl,--growable-table", str(out / "tables.s")]
    for name, src, extra in (("busy", BUSY_C, []), ("burst", BURST_C, []), ("bigcounter", BIG_C, []),
                             ("greet", GREET_C, []),
                             ("tablecounter", TABLE_C, table_args)):
        c = out / f"{name}.c"
        c.write_text(src)
        wasm = out / f"{name}.wasm"
        r = subprocess.run([str(mvcc), "-o", str(wasm), str(c), *extra], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            return f"guest-sdk/mvcc cannot build {name}: {r.stderr[-500:]}"
        built[name] = wasm
    return built


def make_tls(out: Path) -> tuple[Path, Path] | str:
    """A self-signed certificate for 127.0.0.1 (and any extra IPs); a string says why not."""
    if shutil.which("openssl") is None:
        return "the openssl CLI is not installed: cannot make a self-signed certificate"
    return make_cert(out, ["127.0.0.1"])


def make_cert(out: Path, ips: list[str]) -> tuple[Path, Path] | str:
    cert, key = out / "cert.pem", out / "key.pem"
    san = ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"])
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", f"/CN={ips[0]}", "-addext",
                        f"subjectAltName={san}"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"openssl could not make a certificate: {r.stderr[-300:]}"
    return cert, key
