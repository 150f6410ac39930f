//! Command-line front ends, one file per command family. Business logic lives in the library.

pub mod audit;
pub mod custody;
pub mod deid;
pub mod dsa;
pub mod node;
pub mod quarantine;
pub mod reidentify;
pub mod returns;
