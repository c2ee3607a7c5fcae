"""A deterministic simulation of a pacsmesh cluster (TigerBeetle's VOPR, in small).

One seed drives the real membership, placement, safety, repair and anti-entropy
code over a simulated clock and network with loss, delay, partitions, crashes,
restarts and a lost disk; checkers compare every node's store against the truth
of the world. ``world.py`` is the world (clock, network, faults, invariants),
``simnode.py`` one member, driven the way cluster/gossip.py and
cluster/workers.py drive the real one (the same machines), ``archive.py`` an
archive of any size loaded onto the disks. A failure names the seed that replays it.
"""
