//! NBD exports of a live volume (read-write) and of a snapshot (read-only).
