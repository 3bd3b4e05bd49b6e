//! reverb's own async runtime, from scratch (issue 5 builds it).
