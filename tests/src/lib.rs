//! The ground-truth workloads are binaries (`src/bin`); the harness lives in `tests/common`.
