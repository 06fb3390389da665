"""CurveZMQ for the ring: one key file per ring, every rank holds a copy.

    python -m prima_ref.ring.curve [FILE]     # new key file (default ~/.cache/prima-ref/ring-curve.key)
    prima-cli ... --curve [FILE]              # every rank: encrypt and authenticate the ring

The file holds one Curve25519 key pair. Every socket that binds is a CURVE server with its
secret key; every socket that connects is a CURVE client that expects that server key and
presents the same pair. A ZAP handler (run by each rank's control thread) admits only clients
presenting the ring's public key, and CurveZMQ's INITIATE proves the client holds the secret
key, so a peer without this file can neither read the ring nor join it.

A rank with another key fails the handshake: both ends see it through a socket monitor, rank 0
ends ring formation with an error saying so, and the rank with the wrong key leaves.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

KEY_SCHEMA = "prima-ref/curve-key"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # RFC 27: where libzmq sends authentication requests
ZAP_DOMAIN = b"prima-ring"
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class CurveKeyError(ValueError):
    """A key file that is missing, unreadable or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class CurveKeys:
    public: bytes  # Z85, 40 bytes
    secret: bytes  # Z85, 40 bytes
    path: str = ""


def default_key_path() -> Path:
    base = Path(os.environ.get("PRIMA_REF_CACHE", Path.home() / ".cache" / "prima-ref"))
    return base / "ring-curve.key"


def new_key_file(path: str | os.PathLike) -> CurveKeys:
    """Write a fresh key pair to path (mode 0600) and return it."""
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq was built without CURVE support")
    path = Path(path)
    public, secret = zmq.curve_keypair()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"schema": KEY_SCHEMA, "public": public.decode(), "secret": secret.decode()}, f)
        f.write("\n")
    return CurveKeys(public, secret, str(path))


def load_key_file(path: str | os.PathLike) -> CurveKeys:
    path = Path(path)
    hint = f"make one with `python -m prima_ref.ring.curve {path}` and copy it to every device"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CurveKeyError(f"no CurveZMQ key file at {path}; {hint}") from None
    except (OSError, ValueError) as err:
        raise CurveKeyError(f"{path}: not a readable key file ({err}); {hint}") from None
    if not isinstance(doc, dict) or doc.get("schema") != KEY_SCHEMA:
        raise CurveKeyError(f"{path}: not a {KEY_SCHEMA} file; {hint}")
    try:
        public, secret = doc["public"].encode(), doc["secret"].encode()
        derived = zmq.curve_public(secret)
    except (KeyError, AttributeError, ValueError, zmq.ZMQError) as err:
        raise CurveKeyError(f"{path}: bad key fields ({err}); {hint}") from None
    if len(public) != 40 or derived != public:
        raise CurveKeyError(f"{path}: its public key does not belong to its secret key; {hint}")
    return CurveKeys(public, secret, str(path))


def keys_for(arg: str | None) -> CurveKeys | None:
    """--curve's value: None (off), "" (the default file, made on first use) or a path."""
    if arg is None:
        return None
    if arg == "":
        path = default_key_path()
        if not path.exists():
            keys = new_key_file(path)
            print(f"[ring] made a new CurveZMQ key file {path}; copy it to every device of the "
                  "ring", file=sys.stderr, flush=True)
            return keys
        return load_key_file(path)
    return load_key_file(arg)


# ---------------------------------------------------------------------------------------------
# Per context: the keys its sockets use (protocol.py's socket functions look them up here)

_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use(ctx: zmq.Context, keys: CurveKeys) -> None:
    _KEYS[ctx] = keys


def keys_of(ctx: zmq.Context) -> CurveKeys | None:
    return _KEYS.get(ctx)


def secure(s: zmq.Socket, *, server: bool) -> None:
    """CURVE options for a socket of a context that uses curve (before bind/connect)."""
    keys = _KEYS.get(s.context)
    if keys is None:
        return
    if server:
        s.setsockopt(zmq.CURVE_SERVER, 1)
        s.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        s.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        s.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit all
    else:
        s.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
        s.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        s.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


# ---------------------------------------------------------------------------------------------
# ZAP: admit only clients holding the ring's key (the control thread polls this socket)


def zap_socket(ctx: zmq.Context) -> zmq.Socket | None:
    if ctx not in _KEYS:
        return None
    s = ctx.socket(zmq.REP)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(ZAP_ENDPOINT)
    return s


def zap_reply(s: zmq.Socket, keys: CurveKeys) -> str | None:
    """Answer one ZAP request; the reason when it was refused, None when admitted."""
    frames = s.recv_multipart()
    version, request_id, domain, address, _identity, mechanism = frames[:6]
    credentials = frames[6:]
    ok = (mechanism == b"CURVE" and domain == ZAP_DOMAIN and len(credentials) == 1
          and z85.encode(credentials[0]) == keys.public)
    status = (b"200", b"OK") if ok else (b"400", b"not this ring's CurveZMQ key")
    s.send_multipart([version, request_id, *status, b"", b""])
    if ok:
        return None
    return f"refused a peer at {address.decode(errors='replace')}: it holds another CurveZMQ key"


# ---------------------------------------------------------------------------------------------
# Handshake monitors: a wrong key shows up here on both ends, instead of as silence

_EVENT_TEXT = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the peer broke it off (it holds another key, or "
                                          "runs without --curve)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the peer's handshake does not decrypt with this key "
                                         "(it holds another key, or runs without --curve)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the peer refused this key"}


def monitor(s: zmq.Socket) -> zmq.Socket | None:
    """A PAIR socket reporting s's handshakes, for a context that uses curve."""
    if s.context not in _KEYS:
        return None
    return s.get_monitor_socket(HANDSHAKE_EVENTS)


def handshake_failure(mon: zmq.Socket) -> str | None:
    """Read one monitor event; a description when it is a failed handshake."""
    event = recv_monitor_message(mon)
    text = _EVENT_TEXT.get(event["event"])
    if text is None:
        return None
    endpoint = event.get("endpoint", b"")
    endpoint = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else endpoint
    return f"CurveZMQ handshake on {endpoint} failed: {text}"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m prima_ref.ring.curve",
                                description="Make a CurveZMQ key file for a ring (--curve FILE).")
    p.add_argument("path", nargs="?", default=str(default_key_path()))
    args = p.parse_args(argv)
    if Path(args.path).exists():
        print(f"{args.path} exists; remove it first to make a new key", file=sys.stderr)
        return 2
    new_key_file(args.path)
    print(f"wrote {args.path}: copy it to every device and give each rank --curve {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
