"""Receiver storage for replication: the vault (vault.py), one replica per
source (replica.py), the chunk index (chunkindex.py) and, for encrypted
sources, the sealed store and its materialisation (sealed.py)."""
from cdpcore.vault.replica import Replica, valid_name
from cdpcore.vault.sealed import materialize
from cdpcore.vault.vault import Vault

__all__ = ["Replica", "Vault", "materialize", "valid_name"]
