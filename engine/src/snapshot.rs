//! Copy-on-write snapshots of a live volume and their COW store.
