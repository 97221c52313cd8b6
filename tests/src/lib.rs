//! Shared helpers for the integration tests live here later.
