//! Support code shared by the whole-system tests in `it/`.
