"""Wire limits: what one request may carry. The appliance enforces them; the agent sizes its
own batches and thresholds from them, so the two never disagree.

Block sizes: a file is cut into plaintext blocks of BLOCK_SIZE (the last one shorter);
encryption adds a little (the AEAD tag), so a stored block may be up to MAX_BLOCK_BYTES.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

BLOCK_SIZE = 4 * MiB                       # plaintext bytes per block (the last is shorter)
MAX_BLOCK_BYTES = BLOCK_SIZE + 4096        # a stored (ciphertext) block, with AEAD overhead
MAX_BLOCKS_PER_NODE = 12_800               # 50 GiB in 4 MiB blocks, with room to spare
MAX_METADATA_BYTES = 2 * MiB               # sealed node metadata: block keys of 50 GB fit
MAX_METADATA_B64 = 3_000_000               # the same, as base64 in a JSON body
MAX_WRAPPED_KEY_BYTES = 1024
MAX_WRAPPED_KEY_B64 = 2048

# POST /batch/files: operations applied in one transaction.
MAX_BATCH_OPERATIONS = 1000
# POST /blocks and POST /blocks/read: small blocks inline in one JSON body.
MAX_BATCH_BLOCKS = 1000
MAX_INLINE_BLOCK_BYTES = 64 * KiB          # a block sent inline (POST /blocks) at most
MAX_BLOCKS_BODY_BYTES = 16 * MiB           # a POST /blocks body
MAX_BATCH_BODY_BYTES = 32 * MiB            # a POST /batch/files body
MAX_BATCH_READ_BYTES = 16 * MiB            # block bytes one POST /blocks/read answers with

# Pages of listings and of the changes feed.
MAX_CHILDREN_PAGE = 5000
MAX_HISTORY_PAGE = 5000
MAX_CHANGES_PAGE = 5000
MAX_TRASH_PAGE = 5000

MAX_SHARE_GRANTS = 100
MAX_USER_NAME = 32
MAX_DEVICE_NAME = 64
MAX_KEY_BUNDLE_B64 = 65536

# SQLite integers are signed 64-bit: a bigger cursor, version or offset in a query parameter
# would fail inside the query (500), so validation refuses it (422).
MAX_SQL_INT = 2**63 - 1
