//! Bindings for io_uring (the uring model builds them).
