//! Volumes under management: manifest, lock, the write path.
