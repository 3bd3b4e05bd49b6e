//! Command-line values and the rules between flags, kept in the library so that the binary's
//! clap definitions, the tests and any other front end share one meaning for each.
//!
//! The value parsers return a `String` error: clap prints it after the flag and the value,
//! so it says only what was wrong and what is accepted.

use crate::addr::ListenSpec;
use crate::models::Model;
use crate::protocol::ProtocolKind;
use std::fmt;
use std::time::Duration;

/// A rule between flags was broken: the contract's usage error (exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    /// What was wrong, naming the flags and values as typed.
    pub message: String,
    /// What to type instead.
    pub hint: String,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {}

/// The `serve` flags that constrain one another.
#[derive(Debug, Clone, Copy)]
pub struct ServeFlags<'a> {
    /// `--protocol`.
    pub protocol: ProtocolKind,
    /// `--prefix`.
    pub prefix: Option<&'a str>,
    /// `--panic-on`.
    pub panic_on: Option<&'a str>,
    /// Every listener, after the defaults were applied.
    pub listeners: &'a [ListenSpec],
}

/// Checks the rules between `serve`'s flags.
///
/// # Errors
///
/// `--prefix` with `--protocol echo` while a stream listener is served (the kernel's
/// segmentation would decide where the prefixes go); `--panic-on` with a protocol other
/// than `lines`; an empty `--panic-on` word or one holding a newline.
pub fn check_serve(flags: &ServeFlags<'_>) -> Result<(), UsageError> {
    let has_stream = flags
        .listeners
        .iter()
        .any(|spec| matches!(spec, ListenSpec::Tcp(_) | ListenSpec::Unix(_)));
    if flags.prefix.is_some() && flags.protocol == ProtocolKind::Echo && has_stream {
        return Err(UsageError {
            message: "--prefix cannot be used with --protocol echo on a stream listener \
                      (segmentation would decide where the prefixes go)"
                .to_string(),
            hint: "add --protocol lines, or serve only datagrams (--udp, --unix-dgram)".to_string(),
        });
    }
    if let Some(word) = flags.panic_on {
        if flags.protocol != ProtocolKind::Lines {
            return Err(UsageError {
                message: format!(
                    "--panic-on works only with --protocol lines, not --protocol {}",
                    protocol_name(flags.protocol)
                ),
                hint: "add --protocol lines".to_string(),
            });
        }
        if word.is_empty() || word.contains('\n') {
            return Err(UsageError {
                message: format!("--panic-on {word:?}: the word must be non-empty, one line"),
                hint: "use a word such as --panic-on boom".to_string(),
            });
        }
    }
    Ok(())
}

/// The `--protocol` name of a protocol.
pub fn protocol_name(kind: ProtocolKind) -> &'static str {
    match kind {
        ProtocolKind::Echo => "echo",
        ProtocolKind::Lines => "lines",
        ProtocolKind::UntilQuit => "until-quit",
    }
}

/// Every `--protocol` value, in the order the help lists them.
pub const PROTOCOLS: [ProtocolKind; 3] = [
    ProtocolKind::Echo,
    ProtocolKind::Lines,
    ProtocolKind::UntilQuit,
];

/// Parses a `--model` name.
///
/// # Errors
///
/// An unknown name; the message lists every model.
pub fn parse_model(text: &str) -> Result<Model, String> {
    Model::from_name(text).ok_or_else(|| {
        let names: Vec<_> = Model::ALL.iter().map(|m| m.name()).collect();
        format!("unknown model; expected one of {}", names.join(", "))
    })
}

/// Parses a `--protocol` name.
///
/// # Errors
///
/// An unknown name; the message lists every protocol.
pub fn parse_protocol(text: &str) -> Result<ProtocolKind, String> {
    PROTOCOLS
        .into_iter()
        .find(|kind| protocol_name(*kind) == text)
        .ok_or_else(|| "unknown protocol; expected echo, lines or until-quit".to_string())
}

/// Parses seconds, fractions allowed (`5`, `0.25`).
///
/// # Errors
///
/// Text that is not a non-negative number of seconds that fits a `Duration`.
pub fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| "not a number of seconds; expected e.g. 5 or 0.25".to_string())?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| "not a valid duration; expected e.g. 5 or 0.25 seconds".to_string())
}

/// Parses seconds as [`parse_secs`] does, and refuses zero.
///
/// # Errors
///
/// As [`parse_secs`], and zero.
pub fn parse_positive_secs(text: &str) -> Result<Duration, String> {
    let duration = parse_secs(text)?;
    if duration.is_zero() {
        return Err("must be more than 0 seconds".to_string());
    }
    Ok(duration)
}

/// Parses a byte count: plain bytes or a K, M or G suffix in binary units (`256K` is
/// 262,144 bytes; `KiB`, `MiB`, `GiB` and `B` are accepted too).
///
/// # Errors
///
/// An unknown unit, text that is not a count, zero, or a count that overflows `usize`.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let multiplier: usize = match unit {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(format!("unknown unit {unit:?}; expected bytes, K, M or G")),
    };
    let count: usize = digits
        .parse()
        .map_err(|_| "not a byte count; expected e.g. 1024, 64K or 1M".to_string())?;
    let bytes = count
        .checked_mul(multiplier)
        .ok_or_else(|| "too large".to_string())?;
    if bytes == 0 {
        return Err("must be at least 1 byte".to_string());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(
        protocol: ProtocolKind,
        prefix: Option<&str>,
        panic_on: Option<&str>,
        listeners: &[ListenSpec],
    ) -> Result<(), UsageError> {
        check_serve(&ServeFlags {
            protocol,
            prefix,
            panic_on,
            listeners,
        })
    }

    #[test]
    fn prefix_with_stream_echo_is_refused() {
        let tcp = [ListenSpec::Tcp("127.0.0.1:0".parse().unwrap())];
        let udp = [ListenSpec::Udp("127.0.0.1:0".parse().unwrap())];
        let unix = [ListenSpec::Unix("/tmp/x".into())];
        assert!(serve(ProtocolKind::Echo, Some("> "), None, &tcp).is_err());
        assert!(serve(ProtocolKind::Echo, Some("> "), None, &unix).is_err());
        assert!(serve(ProtocolKind::Echo, Some("> "), None, &udp).is_ok());
        assert!(serve(ProtocolKind::Lines, Some("> "), None, &tcp).is_ok());
        assert!(serve(ProtocolKind::Echo, None, None, &tcp).is_ok());
    }

    #[test]
    fn panic_on_needs_lines_and_one_word() {
        let tcp = [ListenSpec::Tcp("127.0.0.1:0".parse().unwrap())];
        let error = serve(ProtocolKind::Echo, None, Some("boom"), &tcp).unwrap_err();
        assert!(error.message.contains("--protocol echo"), "{error}");
        assert!(serve(ProtocolKind::UntilQuit, None, Some("boom"), &tcp).is_err());
        assert!(serve(ProtocolKind::Lines, None, Some("boom"), &tcp).is_ok());
        assert!(serve(ProtocolKind::Lines, None, Some(""), &tcp).is_err());
        assert!(serve(ProtocolKind::Lines, None, Some("a\nb"), &tcp).is_err());
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("262144"), Ok(262_144));
        assert_eq!(parse_bytes("256K"), Ok(262_144));
        assert_eq!(parse_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12Q").unwrap_err().contains("unit"));
        assert!(parse_bytes("K").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").unwrap_err().contains("seconds"));
        assert!(parse_positive_secs("0").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(parse_model("busy-poll"), Ok(Model::BusyPoll));
        assert!(parse_model("epol").is_err());
        assert_eq!(parse_protocol("until-quit"), Ok(ProtocolKind::UntilQuit));
        assert!(parse_protocol("chat").is_err());
    }
}
