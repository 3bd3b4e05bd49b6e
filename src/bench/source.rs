//! `--source`: the local addresses connections are spread over, so one process can hold
//! more connections to one server than one address's ephemeral ports allow.

use std::net::{IpAddr, Ipv4Addr};

/// At most this many source addresses (a range is counted address by address).
pub const MAX_SOURCES: usize = 65_536;

/// Parses `ADDR[,ADDR...]`, where an item may also be an inclusive IPv4 range
/// (`127.0.0.2-127.0.0.9`).
///
/// # Errors
///
/// A message naming the item that is not an IP address or a range, a range that runs
/// backwards, or more than [`MAX_SOURCES`] addresses.
pub fn parse_sources(text: &str) -> Result<Vec<IpAddr>, String> {
    let mut sources = Vec::new();
    for item in text.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!(
                "{text:?} has an empty item; expected ADDR[,ADDR...] or a range such as \
                 127.0.0.2-127.0.0.9"
            ));
        }
        if let Some((first, last)) = item.split_once('-') {
            let parse = |part: &str| {
                part.trim().parse::<Ipv4Addr>().map_err(|_| {
                    format!(
                        "{part:?} in {item:?} is not an IPv4 address (ranges are IPv4 only, \
                         such as 127.0.0.2-127.0.0.9)"
                    )
                })
            };
            let (first, last) = (u32::from(parse(first)?), u32::from(parse(last)?));
            if last < first {
                return Err(format!("the range {item:?} runs backwards"));
            }
            if (last - first) as usize >= MAX_SOURCES {
                return Err(format!(
                    "the range {item:?} has more than {MAX_SOURCES} addresses"
                ));
            }
            sources.extend((first..=last).map(|a| IpAddr::V4(Ipv4Addr::from(a))));
        } else {
            let ip = item.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{item:?} is not an IP address"))?;
            sources.push(ip);
        }
        if sources.len() > MAX_SOURCES {
            return Err(format!("more than {MAX_SOURCES} source addresses"));
        }
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges() {
        let s = parse_sources("127.0.0.2-127.0.0.4,::1,10.0.0.1").unwrap();
        let text: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            ["127.0.0.2", "127.0.0.3", "127.0.0.4", "::1", "10.0.0.1"]
        );
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_sources("127.0.0.1,").is_err());
        assert!(parse_sources("localhost").is_err());
        assert!(parse_sources("10.0.0.0-10.2.0.0").is_err());
    }
}
