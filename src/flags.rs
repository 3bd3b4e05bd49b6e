//! Command-line values and the rules between flags, kept in the library so that the binary's
//! clap definitions, the tests and any other front end share one meaning for each.
//!
//! The value parsers return a `String` error: clap prints it after the flag and the value,
//! so it says only what was wrong and what is accepted.

use crate::addr::{ListenSpec, check_unix_path_length};
use crate::models::Model;
use crate::protocol::ProtocolKind;
use std::fmt;
use std::path::PathBuf;
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
/// than `lines`; an empty `--panic-on` word or one holding a newline; a Unix listener path
/// too long for `sun_path`, or one path given to two Unix listeners.
pub fn check_serve(flags: &ServeFlags<'_>) -> Result<(), UsageError> {
    check_unix_paths(flags.listeners)?;
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

/// Each Unix listener's path fits `sun_path`, and no two name one file (as typed, or made
/// absolute): the second would find the first one's socket there and call it in use.
fn check_unix_paths(listeners: &[ListenSpec]) -> Result<(), UsageError> {
    // Each path made absolute, with its flag and path as typed.
    let mut seen: Vec<(PathBuf, String)> = Vec::new();
    for spec in listeners {
        let (flag, path) = match spec {
            ListenSpec::Unix(path) => ("--unix", path),
            ListenSpec::UnixDatagram(path) => ("--unix-dgram", path),
            _ => continue,
        };
        let typed = format!("{flag} {}", path.display());
        check_unix_path_length(path).map_err(|reason| UsageError {
            message: format!("{typed}: {reason}"),
            hint: "give a shorter path (a relative one counts as typed)".to_string(),
        })?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        if let Some((_, first)) = seen.iter().find(|(other, _)| *other == absolute) {
            return Err(UsageError {
                message: format!("{typed}: the path is given twice (also {first})"),
                hint: "each --unix and --unix-dgram needs a path of its own".to_string(),
            });
        }
        seen.push((absolute, typed));
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

/// One line per model for `serve --help`: the technique, and what `--threads` means for it.
pub fn model_help(model: Model) -> &'static str {
    match model {
        Model::Blocking => {
            "accept, serve that client to the end, accept again: one client at a time"
        }
        Model::Threaded => "a thread per connection",
        Model::Pool => "a fixed pool of worker threads; --threads sets its size (default 16)",
        Model::Forking => "a process per connection",
        Model::BusyPoll => "non-blocking sockets polled in a loop; burns a core even while idle",
        Model::Select => "select(2) over fd sets; no descriptor >= 1024",
        Model::Poll => "poll(2) over an array of descriptors",
        Model::Epoll => "epoll(7), an event loop per thread (--threads, default: one per core)",
        Model::Async => {
            "reverb's own async runtime, a task per connection (--threads loops, default: one per core)"
        }
        Model::Tokio => {
            "the tokio runtime, a task per connection (--threads loops, default: one per core)"
        }
        Model::Uring => "io_uring completions (--threads rings, default: one per core)",
    }
}

/// One line per protocol for `serve --help`.
pub fn protocol_help(kind: ProtocolKind) -> &'static str {
    match kind {
        ProtocolKind::Echo => {
            "every byte back as received (RFC 862); a datagram back as one datagram"
        }
        ProtocolKind::Lines => {
            "each line back as PREFIX + line + newline, once its newline arrived"
        }
        ProtocolKind::UntilQuit => {
            "collect until the input ends with quit + newline (or EOF), answer it all once, close"
        }
    }
}

/// The accepted word closest to `typed`, if one is close enough to be a slip of the keyboard
/// (at most a third of its letters wrong, or `typed` is a prefix of it).
pub fn suggest<'a>(typed: &str, accepted: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let typed_lower = typed.to_ascii_lowercase();
    accepted
        .into_iter()
        .map(|word| {
            let distance = if !typed.is_empty() && word.starts_with(&typed_lower) {
                0
            } else {
                edit_distance(&typed_lower, word)
            };
            (distance, word)
        })
        .filter(|(distance, word)| *distance <= word.len().max(typed.len()) / 3)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, word)| word)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Parses a `--tcp` address: `HOST:PORT`, `[V6]:PORT`, or the same after `tcp://`, the form
/// the readiness lines print.
///
/// # Errors
///
/// Another scheme, or an address [`crate::addr::parse_ip_port`] refuses.
pub fn parse_tcp_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    parse_listen(text, "tcp", "udp")
}

/// Parses a `--udp` address, as [`parse_tcp_listen`] does with `udp://`.
///
/// # Errors
///
/// Another scheme, or an address [`crate::addr::parse_ip_port`] refuses.
pub fn parse_udp_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    parse_listen(text, "udp", "tcp")
}

fn parse_listen(text: &str, scheme: &str, other: &str) -> Result<std::net::SocketAddr, String> {
    let address = match text.split_once("://") {
        None => text,
        Some((given, rest)) if given == scheme => rest,
        Some((given, rest)) if given == other => {
            return Err(format!(
                "a {other}:// address after --{scheme}\n\n  tip: use --{other} {rest}, or --{scheme} {rest}"
            ));
        }
        Some((given, _)) => {
            return Err(format!(
                "unknown scheme {given}://; --{scheme} takes HOST:PORT or {scheme}://HOST:PORT"
            ));
        }
    };
    crate::addr::parse_ip_port(address).map_err(|e| e.reason().to_string())
}

/// Parses a `--model` name.
///
/// # Errors
///
/// An unknown name; the message lists every model.
pub fn parse_model(text: &str) -> Result<Model, String> {
    Model::from_name(text).ok_or_else(|| {
        let names: Vec<_> = Model::ALL.iter().map(|m| m.name()).collect();
        with_suggestion(
            format!("unknown model; expected one of {}", names.join(", ")),
            suggest(text, names),
        )
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
        .ok_or_else(|| {
            with_suggestion(
                "unknown protocol; expected echo, lines or until-quit".to_string(),
                suggest(text, PROTOCOLS.map(protocol_name)),
            )
        })
}

/// A value error with its hint line, laid out as clap lays out its own tips.
fn with_suggestion(message: String, suggestion: Option<&str>) -> String {
    match suggestion {
        Some(word) => format!("{message}\n\n  tip: did you mean '{word}'?"),
        None => message,
    }
}

/// Parses `serve --threads`: 1 to [`MAX_THREADS`].
///
/// # Errors
///
/// Text that is not a whole number in that range.
pub fn parse_threads(text: &str) -> Result<u32, String> {
    parse_whole(text, 1, u64::from(MAX_THREADS)).map(|n| n as u32)
}

/// The most threads `serve --threads` accepts: far more than any machine has cores, and few
/// enough that a typo cannot exhaust memory with thread stacks.
pub const MAX_THREADS: u32 = 4096;

/// Parses a count that must be at least 1 (`--max-conns`).
///
/// # Errors
///
/// Text that is not a whole number, or zero.
pub fn parse_positive_count(text: &str) -> Result<u64, String> {
    parse_whole(text, 1, u64::MAX)
}

/// Parses a whole number that fits 32 bits; the caller judges its range (`bench --conns`).
///
/// # Errors
///
/// Text that is not a whole number, or one past `u32::MAX`.
pub fn parse_count(text: &str) -> Result<u32, String> {
    parse_whole(text, 0, u64::from(u32::MAX)).map(|n| n as u32)
}

fn parse_whole(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let accepted = if (min, max) == (0, u64::from(u32::MAX)) {
        "a whole number, as in 10".to_string()
    } else if max == u64::MAX {
        format!("a whole number of at least {min}")
    } else {
        format!("a whole number from {min} to {max}")
    };
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected {accepted}")),
    }
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
    fn whole_numbers() {
        assert_eq!(parse_threads("4"), Ok(4));
        assert!(parse_threads("0").unwrap_err().contains("1 to 4096"));
        assert!(parse_threads("4097").is_err());
        assert!(parse_threads("two").is_err());
        assert_eq!(parse_positive_count("1"), Ok(1));
        assert!(
            parse_positive_count("0")
                .unwrap_err()
                .contains("at least 1")
        );
        assert_eq!(parse_count("0"), Ok(0));
        assert!(parse_count("4294967296").is_err());
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
    fn listen_addresses_take_their_own_scheme() {
        let addr: std::net::SocketAddr = "127.0.0.1:7007".parse().unwrap();
        assert_eq!(parse_tcp_listen("tcp://127.0.0.1:7007"), Ok(addr));
        assert_eq!(parse_tcp_listen("127.0.0.1:7007"), Ok(addr));
        assert_eq!(parse_udp_listen("udp://127.0.0.1:7007"), Ok(addr));
        assert!(
            parse_tcp_listen("udp://127.0.0.1:7007")
                .unwrap_err()
                .contains("--udp")
        );
        assert!(
            parse_udp_listen("http://127.0.0.1:7007")
                .unwrap_err()
                .contains("scheme")
        );
        assert!(
            parse_tcp_listen("tcp://::1:7")
                .unwrap_err()
                .contains("brackets")
        );
    }

    #[test]
    fn suggestions_catch_slips_only() {
        let models: Vec<_> = Model::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(suggest("epol", models.clone()), Some("epoll"));
        assert_eq!(suggest("Tokio", models.clone()), Some("tokio"));
        assert_eq!(suggest("busypoll", models.clone()), Some("busy-poll"));
        assert_eq!(suggest("threads", models.clone()), Some("threaded"));
        assert_eq!(suggest("nope", models.clone()), None);
        assert_eq!(suggest("line", PROTOCOLS.map(protocol_name)), Some("lines"));
        assert!(
            parse_model("uring2")
                .unwrap_err()
                .contains("did you mean 'uring'")
        );
        assert!(
            parse_protocol("echoo")
                .unwrap_err()
                .contains("did you mean 'echo'")
        );
    }

    #[test]
    fn names() {
        assert_eq!(parse_model("busy-poll"), Ok(Model::BusyPoll));
        assert!(parse_model("epol").is_err());
        assert_eq!(parse_protocol("until-quit"), Ok(ProtocolKind::UntilQuit));
        assert!(parse_protocol("chat").is_err());
    }
}
