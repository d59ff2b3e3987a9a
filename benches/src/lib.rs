//! Support crate for the benchmarks in `benches/benches/` and the peer scripts in `benches/`.
