"""The node's side of the WireGuard mesh: keys, peers from the catalogue, per-peer sync.

- :mod:`.keys`: the key pair, made on the node; the private key never leaves it.
- :mod:`.peers`: :func:`derive_peers`, the catalogue -> this node's peers and routes (pure).
- :mod:`.diff`: desired vs device -> per-peer changes, never "replace all peers" (pure).
- :mod:`.uapi`, :mod:`.device`: wireguard-go over UAPI, kernel WireGuard over netlink.
- :mod:`.links`: interface address, MTU, pod routes, forwarding (rtnetlink).
- :mod:`.sync`, :mod:`.agent`: one sync; the loop that publishes and watches.
"""
