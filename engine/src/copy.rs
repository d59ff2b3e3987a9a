//! The copy engine jobs: full copy, update-img, delta create and restore, verify.
