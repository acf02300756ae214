# A client for tests/harness_socklb.rs, run by support/sockclient.rs in the
# test's child cgroup and node namespace (so that the socket programs see
# its sockets and nothing else of the test's does). One JSON command per
# line on stdin, one JSON answer per line on stdout. Addresses with a ':'
# use an IPv6 socket (IPv4-mapped ones included).
import errno, json, socket, sys, time

udp_socks = {}
tcp_socks = {}

def fam(addr):
    return socket.AF_INET6 if ':' in addr else socket.AF_INET

def err(e, t0):
    return {"error": errno.errorcode.get(e.errno, str(e.errno)) if getattr(e, "errno", None) else repr(e),
            "ms": (time.monotonic() - t0) * 1000}

def tcp_connect(cmd):
    # A TCP connection to the command's address, "hi" sent and the answer
    # line read: (socket, ms to connect, its peer right after the connect,
    # answer). The caller closes it.
    s = socket.socket(fam(cmd["addr"]), socket.SOCK_STREAM)
    s.settimeout(cmd.get("timeout", 2.0))
    try:
        t0 = time.monotonic()
        s.connect((cmd["addr"], cmd["port"]))
        ms = (time.monotonic() - t0) * 1000
        peer = list(s.getpeername()[:2])
        s.sendall(b"hi\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            answer += chunk
    except OSError:
        s.close()
        raise
    return s, ms, peer, answer.decode().strip()

def tcp(cmd):
    t0 = time.monotonic()
    try:
        s, ms, peer, answer = tcp_connect(cmd)
    except OSError as e:
        return err(e, t0)
    s.close()
    return {"peer": peer, "answer": answer, "ms": ms}

def tcp_open(cmd):
    # As tcp, but the connection stays open until tcp_close.
    t0 = time.monotonic()
    try:
        s, _, peer, answer = tcp_connect(cmd)
    except OSError as e:
        return err(e, t0)
    tcp_socks[cmd["id"]] = s
    # SO_COOKIE (57): which slots the socket programs may have used.
    cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")
    return {"peer": peer, "answer": answer, "cookie": cookie}

def tcp_peer(cmd):
    return {"peer": list(tcp_socks[cmd["id"]].getpeername()[:2])}

def tcp_close(cmd):
    tcp_socks.pop(cmd["id"]).close()
    return {}

def udp(cmd):
    t0 = time.monotonic()
    s = socket.socket(fam(cmd["addr"]), socket.SOCK_DGRAM)
    s.settimeout(cmd.get("timeout", 2.0))
    try:
        s.sendto(b"hi\n", (cmd["addr"], cmd["port"]))
        data, frm = s.recvfrom(512)
        return {"from": list(frm[:2]), "answer": data.decode().strip(), "ms": (time.monotonic() - t0) * 1000}
    except OSError as e:
        return err(e, t0)
    finally:
        s.close()

def udp_open(cmd):
    t0 = time.monotonic()
    s = socket.socket(fam(cmd["addr"]), socket.SOCK_DGRAM)
    s.settimeout(cmd.get("timeout", 2.0))
    try:
        s.connect((cmd["addr"], cmd["port"]))
    except OSError as e:
        s.close()
        return err(e, t0)
    udp_socks[cmd["id"]] = s
    return {"peer": list(s.getpeername()[:2])}

def udp_ask(cmd):
    t0 = time.monotonic()
    s = udp_socks[cmd["id"]]
    try:
        s.send(b"hi\n")
        data, frm = s.recvfrom(512)
        return {"from": list(frm[:2]), "answer": data.decode().strip(), "ms": (time.monotonic() - t0) * 1000}
    except OSError as e:
        return err(e, t0)

def udp_close(cmd):
    udp_socks.pop(cmd["id"]).close()
    return {}

def tcp_loop(cmd):
    # COUNT connections, one every INTERVAL_MS: how many got an answer.
    ok, failed, errors = 0, 0, {}
    for _ in range(cmd["count"]):
        r = tcp(cmd)
        if "answer" in r and r["answer"]:
            ok += 1
        else:
            failed += 1
            key = r.get("error", "no answer")
            errors[key] = errors.get(key, 0) + 1
        time.sleep(cmd["interval_ms"] / 1000)
    return {"ok": ok, "failed": failed, "errors": errors}

def bind(cmd):
    t0 = time.monotonic()
    s = socket.socket(fam(cmd["addr"]), socket.SOCK_DGRAM if cmd.get("udp") else socket.SOCK_STREAM)
    try:
        s.bind((cmd["addr"], cmd["port"]))
        return {"bound": True}
    except OSError as e:
        return err(e, t0)
    finally:
        s.close()

OPS = {"tcp": tcp, "tcp_open": tcp_open, "tcp_peer": tcp_peer, "tcp_close": tcp_close,
       "udp": udp, "udp_open": udp_open, "udp_ask": udp_ask,
       "udp_close": udp_close, "tcp_loop": tcp_loop, "bind": bind}

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    print(json.dumps(OPS[cmd["op"]](cmd)), flush=True)
