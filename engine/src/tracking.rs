//! Dirty tracking: memory-mapped bitmap files and the durable group commit.
