//! Shared data generators for the criterion benches in `benches/`.
