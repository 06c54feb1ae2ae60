//! One module per subcommand: its arguments and what it does.

pub mod ca;
pub mod can;
pub mod check;
pub mod inspect;
pub mod revoke;
pub mod rotate;
pub mod status;
pub mod trust_bundle;
pub mod version;
