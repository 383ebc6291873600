"""A new device admitted from one of the user's devices on the LAN (protocol/pairing.py).

- `request`: the new device's side, `cairn join --lan` (its HTTPS endpoint and mDNS record,
  the first hello, checking the approval, saving what joining saves);
- `session`: the new device's decisions, pure (which hello counts, what an approval must
  prove, expiry);
- `endpoint`: the small threaded HTTPS server `request` runs;
- `approve`: the approver's side, `cairn approve NAME`;
- `pending`: finding requests on the LAN (`cairn devices pending`) and the ignore list;
- `sealing`: the user's keys sealed to the new device's wrap key;
- `mdns`: the `_cairn-join._tcp` record, advertised and browsed.
"""
