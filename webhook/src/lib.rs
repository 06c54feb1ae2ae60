//! rolemesh's mutating admission webhook: on pod CREATE it decides from the pod, its namespace and
//! the MTLSPolicy covering its ServiceAccount whether and how to inject the mTLS proxy, and
//! answers with a JSON patch. The decision is [`inject::injection_patch`], a pure function; the
//! HTTP layer ([`server`]) only decodes, calls it and encodes.

pub mod error;
pub mod fallback;
pub mod inject;
pub mod limits;
pub mod lookup;
pub mod metrics;
pub mod selection;
pub mod server;
pub mod serving;

pub use error::{Error, Result};
