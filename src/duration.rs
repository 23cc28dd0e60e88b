//! The spec's durations: one or more `<integer><unit>` with unit d, h, m or s (`90d`, `1h30m`, `0s`).
//!
//! The text is kept as the user wrote it, so a GitOps diff never shows rekey rewriting it; the CRD
//! schema enforces the grammar at admission and [`parse`] accepts exactly that grammar (values that
//! pass the pattern but overflow are reported by validation, not by deserialization, so a bad value
//! becomes a condition instead of an object the controller cannot read).

use std::borrow::Cow;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The grammar as an OpenAPI pattern.
pub const PATTERN: &str = "^([0-9]+[dhms])+$";
/// The longest duration text the schema admits: the CRD's CEL rules scan these strings, and the
/// apiserver refuses a rule whose cost it cannot bound.
pub const MAX_LENGTH: usize = 32;

/// A duration as written in the spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SpecDuration(pub String);

impl SpecDuration {
    pub fn new(text: &str) -> Self {
        Self(text.to_owned())
    }

    pub fn parse(&self) -> Result<Duration, DurationError> {
        parse(&self.0)
    }
}

impl std::fmt::Display for SpecDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for SpecDuration {
    fn schema_name() -> Cow<'static, str> {
        "SpecDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": PATTERN,
            "maxLength": MAX_LENGTH,
            "description": "One or more <integer><unit> with unit d, h, m or s, e.g. 90d, 2160h, 1h30m, 0s.",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("{0:?} is not a duration: expected one or more <integer><unit> with unit d, h, m or s, e.g. 90d or 1h30m")]
    Syntax(String),
    #[error("{0:?} is too long a duration")]
    Overflow(String),
}

/// Parses exactly the grammar of [`PATTERN`].
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(text.to_owned());
    let overflow = || DurationError::Overflow(text.to_owned());
    if text.is_empty() {
        return Err(syntax());
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(n.checked_mul(10).and_then(|n| n.checked_add(u64::from(d))).ok_or_else(overflow)?);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return Err(syntax()),
        };
        let n = number.take().ok_or_else(syntax)?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).ok_or_else(overflow)?;
    }
    if number.is_some() {
        return Err(syntax());
    }
    // Keep every duration representable as a timestamp offset (jiff's range is about ±9999 years).
    if total > 100 * 365 * 86_400 {
        return Err(overflow());
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration in the spec's grammar, largest units first (`1d2h`, `0s`).
pub fn format(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, len) in [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_grammar() {
        assert_eq!(parse("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse("2160h"), Ok(Duration::from_secs(2160 * 3_600)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("1d1d"), Ok(Duration::from_secs(2 * 86_400)));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "90", "d", "-1d", "1.5h", "1w", "1h 30m", "1H", "h1"] {
            assert_eq!(parse(bad), Err(DurationError::Syntax(bad.to_owned())), "{bad:?}");
        }
        assert!(matches!(parse("99999999999999999999d"), Err(DurationError::Overflow(_))));
        assert!(matches!(parse("999999d"), Err(DurationError::Overflow(_))));
    }

    #[test]
    fn format_round_trips() {
        for s in ["0s", "1d2h3m4s", "90d", "45m"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
