"""End-to-end encryption: pure functions over bytes, no I/O. Formats in docs/crypto.md.

    keys     the user's keys and the passphrase-protected key bundle (scrypt, AES-GCM)
    blocks   convergent block encryption within one user; block id = BLAKE3(ciphertext)
    nodes    node metadata sealed with the node key; node keys wrapped by the parent's key
    grants   a node key wrapped for another user (X25519, authenticated by both key pairs)
"""
