//! Checkpoints: the named chain of dirty bitmaps of a volume (libvirt semantics).
