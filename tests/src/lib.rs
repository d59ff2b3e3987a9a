//! The support library of the end-to-end tests in `tests/tests/`: one binary locator
//! ([`tidemark_bin`]), one child guard ([`ChildGuard`]), one timed runner ([`run`]), one
//! image builder ([`Image`]), and the peers, daemons, filesystems and VMs the tests drive.
//!
//! Everything here is `pub`: each test binary uses the part it needs.

pub mod binary;
pub mod child;
pub mod daemon;
pub mod export;
pub mod image;
pub mod paths;
pub mod peers;
pub mod point;
pub mod quiesce;
pub mod run;
pub mod seaweed;
pub mod vm;

pub use binary::tidemark_bin;
pub use child::ChildGuard;
pub use image::{pattern, Image, MIB};
pub use run::{
    run, run_ok, run_ok_within, run_with_input, tidemark, tidemark_env, tidemark_with_input,
    Output, COMMAND_LIMIT,
};
