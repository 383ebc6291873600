"""The Cairn agent: runs on each Linux device, finds the appliance on the LAN, syncs folders
both ways, mounts the remote tree with FUSE, and encrypts everything end to end before it
leaves the device. Only the command-line shell exists so far; see agent.cli."""
