"""The Cairn agent: runs on each Linux device, finds the appliance on the LAN, joins it,
holds the user's keys, moves files to and from it (`cairn put/get/…`) and syncs folders both
ways (`cairn sync`), encrypting everything end to end before it leaves the device. The FUSE
drive (`fuse/`) will build on it. The command line is agent.cli; the wire contract it shares
with the appliance is the `protocol` package."""
