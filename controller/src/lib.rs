//! rolemesh controller library (being built)
