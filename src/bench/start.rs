//! `--start-at TIME` and the agent index: what lets several bench processes (Kubernetes
//! pods of one Indexed Job) load a server together and be told apart afterwards.

use std::time::{Duration, SystemTime};

/// The environment variable Kubernetes sets in each pod of an Indexed Job.
pub const AGENT_INDEX_VARIABLE: &str = "JOB_COMPLETION_INDEX";

/// Parses `--start-at`: seconds since the Unix epoch (`1764432000`, `1764432000.25`),
/// `+SECS` from now, or an RFC 3339 time with a zone (`2026-11-29T16:30:00Z`,
/// `2026-11-29T17:30:00.5+01:00`).
///
/// # Errors
///
/// A message naming the value and the accepted forms.
pub fn parse_start_at(text: &str) -> Result<SystemTime, String> {
    let expected = "expected seconds since the Unix epoch (1764432000.5), +SECS from now \
                    (+30), or an RFC 3339 time with a zone (2026-11-29T16:30:00Z)";
    let bad = || format!("{text:?} is not a start time; {expected}");
    let seconds = |s: &str| -> Result<Duration, String> {
        let value: f64 = s.parse().map_err(|_| bad())?;
        Duration::try_from_secs_f64(value).map_err(|_| bad())
    };
    if let Some(relative) = text.strip_prefix('+') {
        return Ok(SystemTime::now() + seconds(relative)?);
    }
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Ok(SystemTime::UNIX_EPOCH + seconds(text)?);
    }
    let unix = rfc3339_unix_s(text).ok_or_else(bad)?;
    if unix < 0.0 {
        return Err(bad());
    }
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(unix))
}

/// Seconds since the Unix epoch of `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn rfc3339_unix_s(text: &str) -> Option<f64> {
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: i64 = parts.next()?.parse().ok()?;
    let day: i64 = parts.next()?.parse().ok()?;
    let (clock, offset_s) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (clock, zone) = time.split_at(at);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (hours, minutes) = zone[1..].split_once(':')?;
        let hours: i64 = hours.parse().ok()?;
        let minutes: i64 = minutes.parse().ok()?;
        (clock, sign * (hours * 3600 + minutes * 60))
    };
    let mut fields = clock.splitn(3, ':');
    let hour: i64 = fields.next()?.parse().ok()?;
    let minute: i64 = fields.next()?.parse().ok()?;
    let second: f64 = fields.next()?.parse().ok()?;
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&hour)
        && (0..60).contains(&minute)
        && (0.0..61.0).contains(&second);
    if !valid {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let whole = days * 86_400 + hour * 3600 + minute * 60 - offset_s;
    Some(whole as f64 + second)
}

/// This process's agent index from [`AGENT_INDEX_VARIABLE`], when it is set.
///
/// # Errors
///
/// A message when the variable is set but is not a number.
pub fn agent_from_env() -> Result<Option<u32>, String> {
    match std::env::var(AGENT_INDEX_VARIABLE) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            format!("{AGENT_INDEX_VARIABLE}={text:?} is not an agent index (0, 1, 2, ...)")
        }),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(t: SystemTime) -> f64 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    }

    #[test]
    fn start_times() {
        assert_eq!(
            unix(parse_start_at("1764432000.5").unwrap()),
            1_764_432_000.5
        );
        assert_eq!(unix(parse_start_at("1970-01-01T00:00:10Z").unwrap()), 10.0);
        assert_eq!(
            unix(parse_start_at("2026-11-29T16:30:00Z").unwrap()),
            1_795_969_800.0
        );
        assert_eq!(
            unix(parse_start_at("2026-11-29T17:30:00.5+01:00").unwrap()),
            1_795_969_800.5
        );
        let soon = unix(parse_start_at("+5").unwrap()) - unix(SystemTime::now());
        assert!((4.0..=5.5).contains(&soon));
        for bad in ["soon", "2026-13-01T00:00:00Z", "2026-11-29T16:30:00", "-5"] {
            assert!(parse_start_at(bad).is_err(), "{bad}");
        }
    }
}
