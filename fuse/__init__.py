"""Cairn's FUSE file system (future home; nothing here yet).

It will mount a user's remote tree (`cairn mount MOUNTPOINT`) with pyfuse3 on trio:
directory listings come from the agent's synced metadata, file reads fetch and decrypt
blocks on demand (from a LAN peer or the appliance) through a local block cache, and writes
go to a local staging file that is uploaded as new blocks when the file is closed. The
agent owns sync and keys; this package only translates FUSE requests into agent calls.
"""
