"""Worker processes of stxpar (installed as ``stxpar.workers``).

``stxpar.workers.sender``: reads, encrypts and sends the block ranges its coordinator hands it,
over its own TCP stream. ``stxpar.workers.receiver``: takes authenticated data streams from its
coordinator, checks, decrypts and writes blocks, and acknowledges them once durable.
"""
