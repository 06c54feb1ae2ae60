//! rolemesh's benchmarks (`make bench`): the drivers in src/bin, and what they share.

pub mod stats;
