//! `reverb compare`: every model measured side by side (issue 7 builds it).
