//! Paths shown to a user with their control characters escaped: a COW
//! header can name any bytes as its backing file, and printing an escape
//! sequence or a newline from it raw would let a hostile file rewrite the
//! user's terminal or forge lines of output.

use std::fmt;
use std::path::Path;

/// Displays a string with control characters escaped (`\n`, `\u{1b}`).
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// A path for messages: lossily UTF-8, control characters escaped.
pub fn escape_path(p: &Path) -> String {
    Escaped(&p.to_string_lossy()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            escape_path(Path::new("/img/a\u{1b}[2Jb\nc\td")),
            "/img/a\\u{1b}[2Jb\\nc\\td"
        );
        assert_eq!(
            escape_path(Path::new("/ok/päth ünicode")),
            "/ok/päth ünicode"
        );
    }
}
