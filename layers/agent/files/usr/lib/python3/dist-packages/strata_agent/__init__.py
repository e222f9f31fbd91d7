"""stratad: the strata first-boot agent (our olaresd).

It waits for an activation, makes the machine its own (hostname, admin user, identity, node IP, GPU),
brings up K3s, deploys the baked apps and then serves a small local API. Runs with Debian's python3,
the standard library, python3-yaml and python3-cryptography only.
"""

__version__ = "0.1.0"
