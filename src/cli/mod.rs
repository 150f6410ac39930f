//! Command-line front ends, one file per command family. Business logic lives in the library.

pub mod deid;
pub mod dsa;
pub mod node;
pub mod reidentify;
