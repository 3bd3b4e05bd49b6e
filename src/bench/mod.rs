//! `reverb bench`: a verifying load generator (issue 6 builds it).
