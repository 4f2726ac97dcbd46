//! How the text log writes fields: a value a caller chose (a message id, a chat id, a uuid, a
//! caller label) can hold a newline, a carriage return, an ANSI escape or a brace. Written
//! raw, it would forge log lines, recolour a terminal or close a span's `{…}` early. So every
//! value that is not plainly safe (letters, digits, `_-.:/@+,#*`) is written as a quoted,
//! escaped string, and an event's message keeps its text but has its control characters
//! escaped. (The JSON format needs none of this: its values are JSON strings.)

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The text format's fields: `name=value`, space-separated, values escaped (module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            writer,
            result: Ok(()),
            empty: true,
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'a> {
    writer: Writer<'a>,
    result: fmt::Result,
    empty: bool,
}

impl Visitor<'_> {
    fn put(&mut self, field: &Field, text: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.empty { "" } else { " " };
        self.empty = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{}", Message(text))
        } else {
            write!(self.writer, "{sep}{}={}", field.name(), Value(text))
        };
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, &format!("{value:?}"));
    }
}

/// A field value: bare when plainly safe, else quoted and escaped.
struct Value<'a>(&'a str);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let safe = !self.0.is_empty()
            && self
                .0
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.:/@+,#*".contains(c));
        if safe {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

/// An event's message: its text, control and bidi characters escaped.
struct Message<'a>(&'a str);

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Control characters, and the invisible ones that reorder or hide text.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_values_are_quoted_and_escaped_safe_ones_bare() {
        assert_eq!(Value("om_abc-1.2").to_string(), "om_abc-1.2");
        assert_eq!(Value("").to_string(), "\"\"");
        assert_eq!(
            Value("a\nb\r\u{1b}[31m}{ x=1").to_string(),
            r#""a\nb\r\u{1b}[31m}{ x=1""#
        );
        assert_eq!(Value("\u{202e}gnp").to_string(), r#""\u{202e}gnp""#);
        assert_eq!(Message("done: ok").to_string(), "done: ok");
        assert_eq!(
            Message("a\nb\u{1b}c\u{202e}").to_string(),
            r"a\nb\u{1b}c\u{202e}"
        );
    }
}
