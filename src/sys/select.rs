//! Bindings for `select(2)` (the select model builds them).
