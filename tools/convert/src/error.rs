//! One error type for the whole converter: a single line of text.
//!
//! Every failure the converter can meet is a property of the input file (or of the output
//! path), and the user's only move is to read the message, so a string is the right shape.
//! The command line prefixes it with the file name.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl Error {
    /// An error whose text is one line whatever it quotes from the file: control characters
    /// (a tensor name from a damaged pickle may hold newlines) are written as escapes.
    pub fn line(text: String) -> Error {
        if !text.chars().any(char::is_control) {
            return Error(text);
        }
        Error(
            text.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `bail!("...", args)` returns early with a formatted [`Error`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::line(format!($($arg)*)))
    };
}

/// Shorthand for building an [`Error`] from a format string.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::error::Error::line(format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn errors_stay_on_one_line_whatever_they_quote() {
        let e = crate::err!("keys that did not fit: {}", "backbone.\nq\u{7}x");
        assert_eq!(e.0, "keys that did not fit: backbone.\\nq\\u{7}x");
        assert_eq!(Error::line("plain".into()).0, "plain");
    }
}
