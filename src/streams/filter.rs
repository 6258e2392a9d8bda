//! Which events a subscriber wants: `type` patterns and a `source`.

use crate::domain::FieldError;

/// Longest pattern accepted, in bytes.
const MAX_PATTERN: usize = 256;
/// Most `type` patterns one stream may carry.
pub const MAX_PATTERNS: usize = 16;

/// An event type pattern: dot-separated tokens where `*` matches one token and a final `>`
/// matches one or more. Parsed once per stream: a pattern without wildcards is matched as one
/// string comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypePattern {
    /// No wildcard: the type itself.
    Exact(String),
    /// Its tokens, at least one of them `*` or `>`.
    Tokens(Vec<String>),
}

impl TypePattern {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let invalid = |reason: &str| FieldError::new("type", format!("{raw:?}: {reason}"));
        if raw.is_empty() || raw.len() > MAX_PATTERN {
            return Err(invalid("must be 1 to 256 bytes"));
        }
        let tokens: Vec<String> = raw.split('.').map(str::to_owned).collect();
        for (i, token) in tokens.iter().enumerate() {
            if token.is_empty() {
                return Err(invalid("has an empty token"));
            }
            if token == ">" && i + 1 != tokens.len() {
                return Err(invalid("'>' must be the last token"));
            }
            if token.len() > 1 && (token.contains('*') || token.contains('>')) {
                return Err(invalid("'*' and '>' stand alone as a token"));
            }
        }
        if tokens.iter().any(|t| t == "*" || t == ">") {
            Ok(Self::Tokens(tokens))
        } else {
            Ok(Self::Exact(raw.to_owned()))
        }
    }

    pub fn matches(&self, kind: &str) -> bool {
        let patterns = match self {
            Self::Exact(exact) => return kind == exact,
            Self::Tokens(patterns) => patterns,
        };
        let mut tokens = kind.split('.');
        for (i, pattern) in patterns.iter().enumerate() {
            match pattern.as_str() {
                ">" => return tokens.next().is_some(),
                "*" => {
                    if tokens.next().is_none() {
                        return false;
                    }
                }
                exact => {
                    if tokens.next() != Some(exact) {
                        return false;
                    }
                }
            }
            if i + 1 == patterns.len() {
                return tokens.next().is_none();
            }
        }
        false
    }
}

/// What one subscriber wants to see. Empty: everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Any of these types (none: every type).
    pub types: Vec<TypePattern>,
    /// Only events from this source.
    pub source: Option<String>,
}

impl Filter {
    pub fn accepts(&self, kind: &str, source: &str) -> bool {
        (self.types.is_empty() || self.types.iter().any(|p| p.matches(kind)))
            && self.source.as_deref().is_none_or(|s| s == source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, kind: &str) -> bool {
        TypePattern::parse(pattern).unwrap().matches(kind)
    }

    #[test]
    fn type_patterns_match_like_nats_subjects() {
        assert!(matches("task.done", "task.done"));
        assert!(!matches("task.done", "task.done.late"));
        assert!(!matches("task.done", "task"));
        assert!(matches("task.*", "task.done"));
        assert!(!matches("task.*", "task.done.late"));
        assert!(!matches("task.*", "task"));
        assert!(matches("task.>", "task.done.late"));
        assert!(!matches("task.>", "task"));
        assert!(matches("*.done", "job.done"));
        assert!(matches(">", "anything.at.all"));
        assert!(!matches("demo", "demo.started"));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["", "a..b", "a.>.b", "a.b*", ".a", "a."] {
            assert!(TypePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_filter_needs_a_type_match_and_the_source() {
        let filter = Filter {
            types: vec![
                TypePattern::parse("a.*").unwrap(),
                TypePattern::parse("b").unwrap(),
            ],
            source: Some("agent-1".into()),
        };
        assert!(filter.accepts("a.x", "agent-1"));
        assert!(filter.accepts("b", "agent-1"));
        assert!(!filter.accepts("c", "agent-1"));
        assert!(!filter.accepts("b", "agent-2"));
        assert!(Filter::default().accepts("anything", "anyone"));
    }
}
