//! `--greeting` as a template: `{peer}` and `{local}` are filled in per connection, so a
//! client behind a load balancer sees from the first bytes which address arrived.

use std::fmt::{self, Display};

/// A parsed `--greeting`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    /// The client's address (after a PROXY header, the one it carried).
    Peer,
    /// The address the client reached (after a PROXY header, its destination).
    Local,
}

/// Why a greeting template was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GreetingError {
    /// A `{` that does not open `{peer}` or `{local}` and is not doubled.
    #[error(
        "unknown placeholder {0:?} in the greeting; accepted: {{peer}}, {{local}}, and {{{{ or }}}} for a literal brace"
    )]
    UnknownPlaceholder(String),
    /// A `}` that closes nothing and is not doubled.
    #[error("a lone '}}' in the greeting; write }}}} for a literal brace")]
    LoneClosingBrace,
}

impl Greeting {
    /// Parses a template: `{peer}`, `{local}`, `{{` (a literal `{`), `}}` (a literal `}`),
    /// and any other text, sent as written.
    ///
    /// # Errors
    ///
    /// A [`GreetingError`] for any other brace.
    pub fn parse(template: &str) -> Result<Self, GreetingError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(at) = rest.find(['{', '}']) {
            text.push_str(&rest[..at]);
            let tail = &rest[at..];
            let (part, used) = if tail.starts_with("{{") || tail.starts_with("}}") {
                (None, 2)
            } else if tail.starts_with("{peer}") {
                (Some(Part::Peer), "{peer}".len())
            } else if tail.starts_with("{local}") {
                (Some(Part::Local), "{local}".len())
            } else if tail.starts_with('{') {
                let end = tail.find('}').map_or(tail.len(), |end| end + 1);
                return Err(GreetingError::UnknownPlaceholder(tail[..end].to_string()));
            } else {
                return Err(GreetingError::LoneClosingBrace);
            };
            match part {
                None => text.push_str(&tail[..1]),
                Some(part) => {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                }
            }
            rest = &tail[used..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Greeting { parts })
    }

    /// Whether the greeting sends nothing.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The greeting for one connection.
    pub fn render(&self, peer: &dyn Display, local: &dyn Display) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Text(text) => text.clone(),
                Part::Peer => peer.to_string(),
                Part::Local => local.to_string(),
            })
            .collect()
    }
}

impl Display for Greeting {
    /// The greeting as a template again, braces doubled.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(text) => f.write_str(&text.replace('{', "{{").replace('}', "}}"))?,
                Part::Peer => f.write_str("{peer}")?,
                Part::Local => f.write_str("{local}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn placeholders_and_escapes() {
        let greeting = Greeting::parse("hello {peer} via {local} {{x}}\n").unwrap();
        assert_eq!(
            greeting.render(&"192.0.2.1:5000", &"127.0.0.1:7007"),
            "hello 192.0.2.1:5000 via 127.0.0.1:7007 {x}\n"
        );
        assert_eq!(Greeting::parse("plain").unwrap().render(&"", &""), "plain");
        assert!(Greeting::parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_braces_say_what_is_accepted() {
        let error = Greeting::parse("hi {user}!").unwrap_err();
        assert_eq!(error, GreetingError::UnknownPlaceholder("{user}".into()));
        assert!(error.to_string().contains("{peer}, {local}, and {{ or }}"));
        assert_eq!(
            Greeting::parse("hi {").unwrap_err(),
            GreetingError::UnknownPlaceholder("{".into())
        );
        assert_eq!(
            Greeting::parse("a } b").unwrap_err(),
            GreetingError::LoneClosingBrace
        );
    }

    proptest! {
        /// Text without braces is sent as written; any text survives a round trip through
        /// its escaped form.
        #[test]
        fn escaped_text_renders_as_itself(text in ".*") {
            let escaped = text.replace('{', "{{").replace('}', "}}");
            let greeting = Greeting::parse(&escaped).unwrap();
            prop_assert_eq!(greeting.render(&"p", &"l"), text);
            prop_assert_eq!(greeting.to_string(), escaped);
        }
    }
}
