//! One module per subcommand; each has `Args` (or `Command`) and `run`.

pub mod backup;
pub mod bench;
pub mod checkpoint;
pub mod copy;
pub mod delta;
pub mod demo;
pub mod export;
pub mod info;
pub mod mount;
pub mod pull;
pub mod repo;
pub mod restore;
pub mod serve;
pub mod snapshot;
pub mod update_img;
pub mod verify;
pub mod volume;
pub mod watchdog;
