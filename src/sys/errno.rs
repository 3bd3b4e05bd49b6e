//! The errno values code above `sys` sorts errors by (`io::Error::raw_os_error`), so that
//! no other module names libc.

pub use libc::{
    ECANCELED, ECONNABORTED, ECONNREFUSED, ECONNRESET, EHOSTDOWN, EHOSTUNREACH, EINPROGRESS, EINTR,
    EMFILE, ENETDOWN, ENETUNREACH, ENFILE, ENOBUFS, ENOMEM, ENONET, ENOPROTOOPT, EOPNOTSUPP, EPERM,
    EPROTO, EPROTOTYPE,
};
