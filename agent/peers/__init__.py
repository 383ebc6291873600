"""LAN peers: this device's certificate and TLS contexts (`identity`), the revocation
list (`revocation`), the `[peers]` config (`config`), and the peer service that serves
and fetches blocks among one user's devices on the same LAN (protocol/peers.py)."""
