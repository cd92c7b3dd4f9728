"""Chained block hashes: hash(parent_hash, token ids of the block, extra keys).

sha256, not Python's hash(): stable across processes (a disk tier can key on it) and collision-resistant,
so a crafted prompt cannot alias another request's cached prefix.
"""
import hashlib
from array import array

BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids, extra_keys: tuple | None = None) -> BlockHash:
    h = hashlib.sha256(parent_hash or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()
